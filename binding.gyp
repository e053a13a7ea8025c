{
  "targets": [
    {
      "target_name": "reaper_native",
      "sources": ["src/native/reaper_native.c"],
      "cflags": ["-Wall", "-Wextra", "-Werror", "-O2"],
      "defines": ["NAPI_VERSION=8"]
    }
  ]
}
