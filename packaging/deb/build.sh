#!/usr/bin/env bash
# npm run package:deb: builds session-reaper_<version>_<arch>.deb with Debian's own dpkg-deb,
# from this checkout's build (dist/, the compiled addons), into the current directory (or
# $1). Layout:
#   /usr/lib/session-reaper/          the built daemon and CLI, migrations, production
#                                     node_modules (better-sqlite3's compiled addon included),
#                                     the reaper_native addon
#   /usr/bin/reaperd, /usr/bin/reaperctl
#   /lib/systemd/system/session-reaper.{service,socket}
#   /usr/lib/sysusers.d/session-reaper.conf, /usr/lib/tmpfiles.d/session-reaper.conf
#   /etc/session-reaper/config.toml   a conffile
#   /usr/share/doc/session-reaper/    copyright, changelog, README
# The maintainer scripts (packaging/deb/{postinst,prerm,postrm}) make the user and the
# directories, enable the socket unit, and start it only where systemd runs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$(cd "${1:-.}" && pwd)"
cd "$repo"

[ -f dist/src/main.js ] || npx tsc -p tsconfig.json
[ -f build/Release/reaper_native.node ] || { echo "build/Release/reaper_native.node missing: run npm ci" >&2; exit 1; }
version="$(node -p 'require("./package.json").version')"
arch="$(dpkg --print-architecture)"
node_min="$(node -p 'require("./package.json").engines.node.replace(/^>=\s*/, "")')"
deb="$out/session-reaper_${version}_${arch}.deb"

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
root="$stage/root"
lib="$root/usr/lib/session-reaper"
mkdir -p "$lib/build/Release" "$root/usr/bin" "$root/lib/systemd/system" "$root/usr/lib/sysusers.d" \
  "$root/usr/lib/tmpfiles.d" "$root/etc/session-reaper" "$root/usr/share/doc/session-reaper" "$root/DEBIAN"

# The daemon: built JavaScript (no tests, benches or source maps), migrations, the addon.
cp package.json package-lock.json "$lib/"
mkdir -p "$lib/dist"
cp -r dist/src "$lib/dist/"
find "$lib/dist" -name '*.map' -delete
find "$lib/dist" -name '*.d.ts' -delete
cp -r migrations "$lib/"
cp build/Release/reaper_native.node "$lib/build/Release/"
# Production dependencies only, as built here (better-sqlite3 compiled against this node).
cp -a node_modules "$lib/"
(cd "$lib" && npm prune --omit=dev --ignore-scripts --no-audit --no-fund >/dev/null)
rm -f "$lib/package-lock.json" "$lib/node_modules/.package-lock.json"
# What the compiled addons leave that a running daemon never reads: their sources and objects.
find "$lib/node_modules" \( -name '*.o' -o -name '*.a' -o -name '*.mk' -o -name 'Makefile' -o -name '*.gyp*' \
  -o -name 'obj.target' -o -name '.deps' -o -name '*.md' -o -name '*.markdown' -o -name 'CHANGELOG*' \
  -o -name '.npmignore' -o -name '.eslintrc*' -o -name '.travis.yml' -o -name '*.ts' -o -name '*.map' \) \
  -prune -exec rm -rf {} +
rm -rf "$lib/node_modules/better-sqlite3/deps" "$lib/node_modules/better-sqlite3/src" \
  "$lib/node_modules/better-sqlite3/build/Release/test_extension.node"
# Their tests, examples, benchmarks and repository files: never loaded.
find "$lib/node_modules" -mindepth 2 -type d \( -name test -o -name tests -o -name integration -o -name example \
  -o -name examples -o -name benchmarks -o -name bench -o -name .husky -o -name .github -o -name docs \) \
  -prune -exec rm -rf {} +
find "$lib/node_modules" \( -name .gitattributes -o -name .gitignore -o -name '*.html' -o -name '*.sh' \) -delete
find "$lib/node_modules" -type d -empty -delete
find "$lib" -name '*.node' -exec strip --strip-unneeded {} +

# Commands on PATH.
for cmd in reaperd:dist/src/main.js reaperctl:dist/src/cli/reaperctl.js; do
  name="${cmd%%:*}"
  printf '#!/bin/sh\nexec /usr/bin/node /usr/lib/session-reaper/%s "$@"\n' "${cmd#*:}" >"$root/usr/bin/$name"
done
sed -i 's#^exec /usr/bin/node /usr/lib/session-reaper/dist/src/main.js#exec /usr/bin/node --max-semi-space-size=2 /usr/lib/session-reaper/dist/src/main.js#' "$root/usr/bin/reaperd"

# Units, pointed at the package's paths.
for u in service socket; do
  sed -e 's#/opt/session-reaper/dist/src/main.js#/usr/lib/session-reaper/dist/src/main.js#' \
    -e 's#^Documentation=.*#Documentation=file:///usr/share/doc/session-reaper/README.md#' \
    "systemd/session-reaper.$u" >"$root/lib/systemd/system/session-reaper.$u"
done
cp systemd/session-reaper.sysusers.conf "$root/usr/lib/sysusers.d/session-reaper.conf"
cp systemd/session-reaper.tmpfiles.conf "$root/usr/lib/tmpfiles.d/session-reaper.conf"
cp systemd/config.example.toml "$root/etc/session-reaper/config.toml"
mkdir -p "$root/etc/logrotate.d"
cp deploy/logrotate/session-reaper "$root/etc/logrotate.d/session-reaper"

# Documentation.
doc="$root/usr/share/doc/session-reaper"
cp README.md "$doc/"
cp "$here/copyright" "$doc/copyright"
sed -e "s/@VERSION@/$version/" -e "s/@DATE@/$(date -R -d @"${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}")/" \
  "$here/changelog" | gzip -9n >"$doc/changelog.gz"

# Control files. The compiled addons' libraries, as dpkg-shlibdeps finds them (libc, libstdc++).
mkdir -p "$stage/debian"
printf 'Source: session-reaper\n\nPackage: session-reaper\nArchitecture: any\n' >"$stage/debian/control"
shlibs="$(cd "$stage" && find root -name '*.node' -print0 | xargs -0 dpkg-shlibdeps -O 2>/dev/null | sed -n 's/^shlibs:Depends=//p')"
[ -n "$shlibs" ] || { echo "dpkg-shlibdeps found no library dependency" >&2; exit 1; }
installed="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@NODE@/$node_min/" -e "s/@SIZE@/$installed/" \
  -e "s/@SHLIBS@/$shlibs/" \
  "$here/control" >"$root/DEBIAN/control"
printf '/etc/session-reaper/config.toml\n/etc/logrotate.d/session-reaper\n' >"$root/DEBIAN/conffiles"
for s in postinst prerm postrm; do install -m 0755 "$here/$s" "$root/DEBIAN/$s"; done
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum >DEBIAN/md5sums)

# Modes dpkg and lintian expect; every file owned by root.
find "$root" -type d -exec chmod 0755 {} +
find "$root" -type f ! -path "$root/DEBIAN/*" -exec chmod 0644 {} +
chmod 0755 "$root/usr/bin/reaperd" "$root/usr/bin/reaperctl"
# Scripts with an interpreter line keep it usable.
find "$lib" -type f -name '*.js' -print0 | while IFS= read -r -d '' f; do
  if [ "$(head -c 2 "$f")" = '#!' ]; then chmod 0755 "$f"; fi
done
find "$lib" -name '*.node' -exec chmod 0644 {} +
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
