import assert from "node:assert/strict";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { buildConfig, loadConfig, DEFAULT_CONFIG_PATH, type Config } from "../../src/config/load.js";
import { DEFAULTS, PROFILE_DEFAULTS } from "../../src/config/schema.js";
import { ReaperError } from "../../src/errors.js";
import { tempDir } from "../helpers.js";

type Env = Record<string, string | undefined>;

/** Writes `toml` to `dir/name` and returns the absolute file name. */
function toml(dir: string, text: string, name = "config.toml"): string {
  const file = join(dir, name);
  writeFileSync(file, text);
  return file;
}

/** Asserts `fn` throws SR_CONFIG_INVALID whose message names every one of `keys`. */
function assertInvalid(fn: () => unknown, ...keys: string[]): ReaperError {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof ReaperError, `expected a ReaperError, got ${String(caught)}`);
  assert.equal(caught.code, "SR_CONFIG_INVALID");
  for (const key of keys) assert.ok(caught.message.includes(key), `message does not name ${key}: ${caught.message}`);
  return caught;
}

/** A document validated with no environment, as if read from a file in `cwd`. */
function build(doc: Record<string, unknown>, env: Env = {}, cwd = "/srv/reaper"): Config {
  return buildConfig(doc, null, { env, cwd });
}

function assertDeepFrozen(value: unknown, path = "config"): void {
  if (value === null || typeof value !== "object") return;
  assert.ok(Object.isFrozen(value), `${path} is not frozen`);
  for (const [k, v] of Object.entries(value)) assertDeepFrozen(v, `${path}.${k}`);
}

// --- no file at all: embedded defaults ---------------------------------------------------

test("no config file: embedded defaults, socket and db under the working directory", (t) => {
  const cwd = tempDir(t);
  const c = loadConfig({ env: {}, cwd });
  assert.equal(c.source, null, `${DEFAULT_CONFIG_PATH} exists on this host and was picked up`);
  assert.equal(c.api.socket, join(cwd, "reaper.sock"));
  assert.equal(c.api.socketMode, 0o660);
  assert.equal(c.api.bodyLimitBytes, DEFAULTS.api.body_limit_bytes);
  assert.equal(c.store.path, join(cwd, "reaper.db"));
  assert.equal(c.store.flushIntervalMs, DEFAULTS.store.flush_interval_ms);
  assert.equal(c.log.level, "info");
  assert.equal(c.log.file, "");
  assert.equal(c.detect.livenessSchedule, DEFAULTS.detect.liveness_schedule);
  assert.equal(c.reaper.concurrency, DEFAULTS.reaper.concurrency);
  assert.equal(c.reaper.shutdownGraceSec, DEFAULTS.reaper.shutdown_grace_sec);
  assert.deepEqual(Object.keys(c.profiles), ["default"]);
  assert.deepEqual(c.profiles.default, {
    name: "default",
    heartbeatTimeoutSec: PROFILE_DEFAULTS.heartbeat_timeout_sec,
    idleTimeoutSec: PROFILE_DEFAULTS.idle_timeout_sec,
    maxLifetimeSec: PROFILE_DEFAULTS.max_lifetime_sec,
    gracePeriodSec: PROFILE_DEFAULTS.grace_period_sec,
    stepTimeoutSec: PROFILE_DEFAULTS.step_timeout_sec,
    unkillableTimeoutSec: PROFILE_DEFAULTS.unkillable_timeout_sec,
    unkillableHook: null,
    warnBeforeSec: 0,
    warnHooks: [],
    maxExtendSec: 28800,
    allowedRoots: [...PROFILE_DEFAULTS.allowed_roots],
    allowedUids: null,
    closeHook: null,
    releaseHooks: [],
    busyCpuPercent: null,
    containment: "auto",
    removeIpc: false,
    hookPath: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    orphans: null,
  });
});

test("no config file: socket under $RUNTIME_DIRECTORY, db under $STATE_DIRECTORY (first of a ':' list)", (t) => {
  const cwd = tempDir(t);
  const c = loadConfig({
    env: { RUNTIME_DIRECTORY: "/run/session-reaper", STATE_DIRECTORY: "/var/lib/session-reaper:/var/lib/other" },
    cwd,
  });
  assert.equal(c.source, null);
  assert.equal(c.api.socket, "/run/session-reaper/reaper.sock");
  assert.equal(c.store.path, "/var/lib/session-reaper/reaper.db");
});

test("a default profile always exists, even when the file only defines others", () => {
  const c = build({ profiles: { gpu: { heartbeat_timeout_sec: 5 } } });
  assert.deepEqual(Object.keys(c.profiles).sort(), ["default", "gpu"]);
  assert.equal(c.profiles.default?.heartbeatTimeoutSec, PROFILE_DEFAULTS.heartbeat_timeout_sec);
  assert.equal(c.profiles.gpu?.name, "gpu");
});

test("$CONFIGURATION_DIRECTORY/config.toml is found without an explicit path", (t) => {
  const dir = tempDir(t);
  const file = toml(dir, '[log]\nlevel = "debug"\n');
  const c = loadConfig({ env: { CONFIGURATION_DIRECTORY: dir }, cwd: "/" });
  assert.equal(c.source, file);
  assert.equal(c.log.level, "debug");
});

test("$CONFIGURATION_DIRECTORY listing several dirs (systemd joins them with ':') finds config.toml in the first", (t) => {
  // systemd: with ConfigurationDirectory=a b, $CONFIGURATION_DIRECTORY is "/etc/a:/etc/b" (as for
  // RuntimeDirectory= and StateDirectory=, which load.ts already splits). The admin's file must
  // not be silently ignored in favour of the embedded defaults.
  const first = tempDir(t);
  const second = tempDir(t);
  const file = toml(first, '[log]\nlevel = "debug"\n');
  const c = loadConfig({ env: { CONFIGURATION_DIRECTORY: `${first}:${second}` }, cwd: "/" });
  assert.equal(c.source, file);
  assert.equal(c.log.level, "debug");
});

// --- environment overrides -----------------------------------------------------------------

test("REAPER_SOCKET, REAPER_DB and REAPER_LOG_LEVEL override the file", (t) => {
  const dir = tempDir(t);
  const file = toml(
    dir,
    '[api]\nsocket = "/file/reaper.sock"\n[store]\npath = "/file/reaper.db"\n[log]\nlevel = "warn"\n',
  );
  const fromFile = loadConfig({ configPath: file, env: {}, cwd: dir });
  assert.equal(fromFile.api.socket, "/file/reaper.sock");
  assert.equal(fromFile.store.path, "/file/reaper.db");
  assert.equal(fromFile.log.level, "warn");

  const c = loadConfig({
    configPath: file,
    env: { REAPER_SOCKET: "/env/r.sock", REAPER_DB: "/env/r.db", REAPER_LOG_LEVEL: "trace" },
    cwd: dir,
  });
  assert.equal(c.api.socket, "/env/r.sock");
  assert.equal(c.store.path, "/env/r.db");
  assert.equal(c.log.level, "trace");
});

test("REAPER_DB is resolved against the working directory; :memory: is kept as is", () => {
  assert.equal(build({}, { REAPER_DB: "data/r.db" }, "/srv/reaper").store.path, "/srv/reaper/data/r.db");
  assert.equal(build({}, { REAPER_DB: ":memory:" }).store.path, ":memory:");
});

test("empty REAPER_DB, REAPER_SOCKET, REAPER_LOG_LEVEL are treated as unset, never as the working directory", () => {
  // systemd's `Environment=REAPER_DB=` sets it to "": that clears the override.
  const config = build({}, { REAPER_DB: "", REAPER_SOCKET: "", REAPER_LOG_LEVEL: "" }, "/srv/reaper");
  assert.equal(config.store.path, "/srv/reaper/reaper.db");
  assert.equal(config.api.socket, "/srv/reaper/reaper.sock");
  assert.equal(config.log.level, "info");
});

test("a relative REAPER_SOCKET is an error naming it", () => {
  assertInvalid(() => build({}, { REAPER_SOCKET: "run/reaper.sock" }), "REAPER_SOCKET");
});

test("an invalid REAPER_LOG_LEVEL is an error naming it", () => {
  assertInvalid(() => build({}, { REAPER_LOG_LEVEL: "loud" }), "REAPER_LOG_LEVEL");
});

test("REAPER_CONFIG selects the file (relative to the working directory)", (t) => {
  const dir = tempDir(t);
  const file = toml(dir, "[reaper]\nconcurrency = 3\n", "env.toml");
  const c = loadConfig({ env: { REAPER_CONFIG: "env.toml" }, cwd: dir });
  assert.equal(c.source, file);
  assert.equal(c.reaper.concurrency, 3);
});

test("--config (configPath) wins over REAPER_CONFIG", (t) => {
  const dir = tempDir(t);
  const fromEnv = toml(dir, "[reaper]\nconcurrency = 3\n", "env.toml");
  const fromFlag = toml(dir, "[reaper]\nconcurrency = 5\n", "flag.toml");
  const c = loadConfig({ configPath: fromFlag, env: { REAPER_CONFIG: fromEnv }, cwd: dir });
  assert.equal(c.source, fromFlag);
  assert.equal(c.reaper.concurrency, 5);
});

// --- file errors ---------------------------------------------------------------------------

test("an explicit config file that does not exist is an error (not a fallback to defaults)", (t) => {
  const dir = tempDir(t);
  const missing = join(dir, "nope.toml");
  assertInvalid(() => loadConfig({ configPath: missing, env: {}, cwd: dir }), missing);
  assertInvalid(() => loadConfig({ env: { REAPER_CONFIG: missing }, cwd: dir }), missing);
});

test("a file that is not valid TOML is SR_CONFIG_INVALID", (t) => {
  const dir = tempDir(t);
  const file = toml(dir, "[api\nsocket = \n");
  assertInvalid(() => loadConfig({ configPath: file, env: {}, cwd: dir }), file);
});

test("an empty file is valid and gives the defaults", (t) => {
  const dir = tempDir(t);
  const file = toml(dir, "");
  const c = loadConfig({ configPath: file, env: {}, cwd: dir });
  assert.equal(c.source, file);
  assert.equal(c.api.socket, join(dir, "reaper.sock"));
  assert.deepEqual(Object.keys(c.profiles), ["default"]);
});

// --- unknown keys --------------------------------------------------------------------------

test("an unknown top-level key is an error naming it", (t) => {
  const dir = tempDir(t);
  const file = toml(dir, 'colour = "blue"\n');
  assertInvalid(() => loadConfig({ configPath: file, env: {}, cwd: dir }), "colour");
});

test("an unknown key in [api] is an error naming api.<key>", (t) => {
  const dir = tempDir(t);
  const file = toml(dir, '[api]\nsockt = "/run/x.sock"\n');
  assertInvalid(() => loadConfig({ configPath: file, env: {}, cwd: dir }), "api.sockt");
});

test("an unknown key in [store], [log], [detect] and [reaper] is an error naming it", () => {
  assertInvalid(() => build({ store: { pth: "/x.db" } }), "store.pth");
  assertInvalid(() => build({ log: { lvl: "info" } }), "log.lvl");
  assertInvalid(() => build({ detect: { schedule: "* * * * *" } }), "detect.schedule");
  assertInvalid(() => build({ reaper: { workers: 2 } }), "reaper.workers");
});

test("an unknown key in [profiles.gpu] is an error naming profiles.gpu.<key>", (t) => {
  const dir = tempDir(t);
  const file = toml(dir, "[profiles.gpu]\ngrace_perod_sec = 5\n");
  assertInvalid(() => loadConfig({ configPath: file, env: {}, cwd: dir }), "profiles.gpu.grace_perod_sec");
});

test("an invalid profile name is an error naming it", () => {
  assertInvalid(() => build({ profiles: { "bad name": {} } }), "bad name");
});

// --- bad values ----------------------------------------------------------------------------

test("a negative or zero timeout is an error naming the key", (t) => {
  const dir = tempDir(t);
  const file = toml(dir, "[profiles.gpu]\nheartbeat_timeout_sec = -5\n");
  assertInvalid(() => loadConfig({ configPath: file, env: {}, cwd: dir }), "profiles.gpu.heartbeat_timeout_sec");
  assertInvalid(() => build({ profiles: { default: { idle_timeout_sec: 0 } } }), "profiles.default.idle_timeout_sec");
  assertInvalid(() => build({ profiles: { default: { max_lifetime_sec: -1 } } }), "profiles.default.max_lifetime_sec");
  assertInvalid(() => build({ profiles: { x: { grace_period_sec: -0.5 } } }), "profiles.x.grace_period_sec");
  assertInvalid(() => build({ reaper: { shutdown_grace_sec: -1 } }), "reaper.shutdown_grace_sec");
});

test("a value of the wrong type is an error naming the key", (t) => {
  const dir = tempDir(t);
  const file = toml(dir, '[profiles.default]\nheartbeat_timeout_sec = "30"\n');
  assertInvalid(() => loadConfig({ configPath: file, env: {}, cwd: dir }), "profiles.default.heartbeat_timeout_sec");
  assertInvalid(() => build({ profiles: { x: { idle_timeout_sec: 1.5 } } }), "profiles.x.idle_timeout_sec");
  assertInvalid(() => build({ api: { body_limit_bytes: "big" } }), "api.body_limit_bytes");
  assertInvalid(() => build({ reaper: { concurrency: 0 } }), "reaper.concurrency");
  assertInvalid(() => build({ api: "socket" }), "api");
  assertInvalid(() => build({ profiles: { x: { allowed_roots: "/tmp" } } }), "profiles.x.allowed_roots");
});

test("a bad log level in the file is an error naming log.level", (t) => {
  const dir = tempDir(t);
  const file = toml(dir, '[log]\nlevel = "loud"\n');
  assertInvalid(() => loadConfig({ configPath: file, env: {}, cwd: dir }), "log.level");
});

test("a bad cron schedule in detect.liveness_schedule is an error naming the key", (t) => {
  const dir = tempDir(t);
  const file = toml(dir, '[detect]\nliveness_schedule = "every two seconds"\n');
  assertInvalid(() => loadConfig({ configPath: file, env: {}, cwd: dir }), "detect.liveness_schedule");
  assertInvalid(() => build({ detect: { liveness_schedule: "61 * * * *" } }), "detect.liveness_schedule");
  assertInvalid(() => build({ detect: { liveness_schedule: "" } }), "detect.liveness_schedule");
});

test("detect.liveness_cpu_percent: a share of one core above 0 and at most 100", () => {
  assert.equal(build({}).detect.livenessCpuPercent, 0.25);
  assert.equal(build({ detect: { liveness_cpu_percent: 2 } }).detect.livenessCpuPercent, 2);
  assertInvalid(() => build({ detect: { liveness_cpu_percent: 0 } }), "detect.liveness_cpu_percent");
  assertInvalid(() => build({ detect: { liveness_cpu_percent: 101 } }), "detect.liveness_cpu_percent");
  assertInvalid(() => build({ detect: { liveness_cpu_percent: "1" } }), "detect.liveness_cpu_percent");
});

test("a valid cron schedule is kept", () => {
  assert.equal(build({ detect: { liveness_schedule: "*/5 * * * * *" } }).detect.livenessSchedule, "*/5 * * * * *");
});

test('allowed_roots "/" is an error naming the key', (t) => {
  const dir = tempDir(t);
  const file = toml(dir, '[profiles.default]\nallowed_roots = ["/"]\n');
  assertInvalid(() => loadConfig({ configPath: file, env: {}, cwd: dir }), "profiles.default.allowed_roots");
  assertInvalid(() => build({ profiles: { x: { allowed_roots: ["//"] } } }), "profiles.x.allowed_roots");
});

test("non-normalized or relative allowed_roots are errors naming the key", () => {
  for (const root of ["/tmp/../etc", "/tmp//a", "/tmp/./a", "//tmp", "tmp", "./tmp"]) {
    assertInvalid(() => build({ profiles: { scratch: { allowed_roots: [root] } } }), "profiles.scratch.allowed_roots");
  }
});

test("a trailing slash on an allowed root is dropped", () => {
  assert.deepEqual(build({ profiles: { x: { allowed_roots: ["/srv/tmp/"] } } }).profiles.x?.allowedRoots, ["/srv/tmp"]);
});

test("a bad close_hook is an error naming the key", () => {
  assertInvalid(() => build({ profiles: { x: { close_hook: "shutdown" } } }), "profiles.x.close_hook");
  assertInvalid(() => build({ profiles: { x: { close_hook: [] } } }), "profiles.x.close_hook");
  assertInvalid(() => build({ profiles: { x: { close_hook: 7 } } }), "profiles.x.close_hook");
});

test("release_hooks: loopback URLs and argv arrays, in order; inherited from default; [] turns them off", () => {
  const c = build({
    profiles: {
      default: {
        release_hooks: [
          "http://127.0.0.1:8500/v1/deregister?from=reaper",
          ["/usr/local/bin/release-lock", "--quiet"],
          "http://[::1]:9000/locks/release",
          "http://127.0.0.2/x",
        ],
      },
      web: {},
      none: { release_hooks: [] },
    },
  });
  const expected = [
    { kind: "http", url: "http://127.0.0.1:8500/v1/deregister?from=reaper" },
    { kind: "command", argv: ["/usr/local/bin/release-lock", "--quiet"] },
    { kind: "http", url: "http://[::1]:9000/locks/release" },
    { kind: "http", url: "http://127.0.0.2/x" },
  ];
  assert.deepEqual(c.profiles.default?.releaseHooks, expected);
  assert.deepEqual(c.profiles.web?.releaseHooks, expected);
  assert.deepEqual(c.profiles.none?.releaseHooks, []);
  assert.deepEqual(build({}).profiles.default?.releaseHooks, []);
});

test("release_hooks from a TOML file", (t) => {
  const dir = tempDir(t);
  const file = toml(dir, '[profiles.a]\nrelease_hooks = ["http://127.0.0.1:1234/release", ["/bin/true", "x"]]\n');
  const c = loadConfig({ configPath: file, env: {}, cwd: dir });
  assert.deepEqual(c.profiles.a?.releaseHooks, [
    { kind: "http", url: "http://127.0.0.1:1234/release" },
    { kind: "command", argv: ["/bin/true", "x"] },
  ]);
});

test("a release hook URL that is not plain http to a loopback address is an error naming the key", () => {
  const bad = [
    "http://10.0.0.5:8500/deregister", // another host
    "http://192.168.1.1/x",
    "http://localhost:8500/x", // a name: resolution can be changed, only literals are loopback
    "http://registry.internal/x",
    "http://[::ffff:127.0.0.1]:80/x", // IPv4-mapped: not one of the two accepted forms
    "http://[fe80::1]/x",
    "http://user:secret@127.0.0.1:8500/x", // credentials would be journaled
    "http://127.0.0.1.nip.io/x",
    "http://127.0.0.1:8500/x#frag",
    "http://127.0.0.999/x", // not a valid URL
  ];
  for (const url of bad) {
    const err = assertInvalid(() => build({ profiles: { x: { release_hooks: [url] } } }), "profiles.x.release_hooks.0");
    assert.ok(err.message.includes(url), err.message);
  }
  // Shapes the schema refuses: a bare path (the engine is gone: no port to send it to), an
  // empty argv, an empty argument, another scheme (https too: loopback needs no TLS), a number.
  for (const hook of ["/deregister", [], [""], "https://127.0.0.1:8443/x", "ftp://127.0.0.1/x", 7]) {
    assertInvalid(() => build({ profiles: { x: { release_hooks: [hook] } } }), "profiles.x.release_hooks.0");
  }
  assertInvalid(
    () => build({ profiles: { x: { release_hooks: "http://127.0.0.1:1/x" } } }),
    "profiles.x.release_hooks",
  );
  // The index names the offending item.
  assertInvalid(
    () => build({ profiles: { x: { release_hooks: ["http://127.0.0.1:1/ok", "http://10.1.1.1/no"] } } }),
    "profiles.x.release_hooks.1",
  );
});

test("busy_cpu_percent: off unless set; inherited from default; 0 turns it off; fractions allowed", () => {
  assert.equal(build({}).profiles.default?.busyCpuPercent, null);
  const c = build({
    profiles: {
      default: { busy_cpu_percent: 30 },
      spark: { busy_cpu_percent: 100 }, // one whole core
      web: {},
      notebook: { busy_cpu_percent: 0 },
      tiny: { busy_cpu_percent: 0.5 },
    },
  });
  assert.equal(c.profiles.default?.busyCpuPercent, 30);
  assert.equal(c.profiles.spark?.busyCpuPercent, 100);
  assert.equal(c.profiles.web?.busyCpuPercent, 30);
  assert.equal(c.profiles.notebook?.busyCpuPercent, null);
  assert.equal(c.profiles.tiny?.busyCpuPercent, 0.5);
});

test("busy_cpu_percent: negative, not a number, or above 100 × the host's cores is an error naming the key", (t) => {
  const dir = tempDir(t);
  const file = toml(dir, '[profiles.gpu]\nbusy_cpu_percent = "50"\n');
  assertInvalid(() => loadConfig({ configPath: file, env: {}, cwd: dir }), "profiles.gpu.busy_cpu_percent");
  assertInvalid(() => build({ profiles: { x: { busy_cpu_percent: -1 } } }), "profiles.x.busy_cpu_percent");
  const cores = availableParallelism();
  const err = assertInvalid(
    () => build({ profiles: { x: { busy_cpu_percent: 100 * cores + 1 } } }),
    "profiles.x.busy_cpu_percent",
  );
  assert.ok(err.message.includes(String(100 * cores)), err.message);
  assert.equal(build({ profiles: { x: { busy_cpu_percent: 100 * cores } } }).profiles.x?.busyCpuPercent, 100 * cores);
});

test("every offending key is named when several are wrong", () => {
  assertInvalid(
    () => build({ api: { sockt: "/x" }, profiles: { gpu: { grace_perod_sec: 1, heartbeat_timeout_sec: -1 } } }),
    "api.sockt",
    "profiles.gpu.grace_perod_sec",
    "profiles.gpu.heartbeat_timeout_sec",
  );
});

// --- profiles --------------------------------------------------------------------------------

test("a named profile inherits missing keys from [profiles.default], which inherits built-in defaults", (t) => {
  const dir = tempDir(t);
  const file = toml(
    dir,
    [
      "[profiles.default]",
      "heartbeat_timeout_sec = 60",
      "grace_period_sec = 2",
      'allowed_roots = ["/srv/scratch"]',
      "",
      "[profiles.gpu]",
      "heartbeat_timeout_sec = 15",
      "max_lifetime_sec = 7200",
      "",
    ].join("\n"),
  );
  const c = loadConfig({ configPath: file, env: {}, cwd: dir });
  assert.deepEqual(c.profiles.default, {
    name: "default",
    heartbeatTimeoutSec: 60,
    idleTimeoutSec: PROFILE_DEFAULTS.idle_timeout_sec,
    maxLifetimeSec: PROFILE_DEFAULTS.max_lifetime_sec,
    gracePeriodSec: 2,
    stepTimeoutSec: PROFILE_DEFAULTS.step_timeout_sec,
    unkillableTimeoutSec: PROFILE_DEFAULTS.unkillable_timeout_sec,
    unkillableHook: null,
    warnBeforeSec: 0,
    warnHooks: [],
    maxExtendSec: 28800,
    allowedRoots: ["/srv/scratch"],
    allowedUids: null,
    closeHook: null,
    releaseHooks: [],
    busyCpuPercent: null,
    containment: "auto",
    removeIpc: false,
    hookPath: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    orphans: null,
  });
  assert.deepEqual(c.profiles.gpu, {
    name: "gpu",
    heartbeatTimeoutSec: 15, // its own
    idleTimeoutSec: PROFILE_DEFAULTS.idle_timeout_sec, // built-in, through default
    maxLifetimeSec: 7200, // its own
    gracePeriodSec: 2, // from [profiles.default]
    stepTimeoutSec: PROFILE_DEFAULTS.step_timeout_sec,
    unkillableTimeoutSec: PROFILE_DEFAULTS.unkillable_timeout_sec,
    unkillableHook: null,
    warnBeforeSec: 0,
    warnHooks: [],
    maxExtendSec: 28800,
    allowedRoots: ["/srv/scratch"], // from [profiles.default]
    allowedUids: null,
    closeHook: null,
    releaseHooks: [],
    busyCpuPercent: null,
    containment: "auto",
    removeIpc: false,
    hookPath: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    orphans: null,
  });
});

test('close_hook "/shutdown" is an HTTP hook, an array is a command; both are inherited from default', () => {
  const c = build({
    profiles: {
      default: { close_hook: "/shutdown" },
      cli: { close_hook: ["/usr/bin/engine-ctl", "stop", "--now"] },
      web: {},
    },
  });
  assert.deepEqual(c.profiles.default?.closeHook, { kind: "http", path: "/shutdown" });
  assert.deepEqual(c.profiles.cli?.closeHook, { kind: "command", argv: ["/usr/bin/engine-ctl", "stop", "--now"] });
  assert.deepEqual(c.profiles.web?.closeHook, { kind: "http", path: "/shutdown" });
});

test("close_hook from a TOML file", (t) => {
  const dir = tempDir(t);
  const file = toml(dir, '[profiles.a]\nclose_hook = "/shutdown"\n[profiles.b]\nclose_hook = ["/bin/true", "x"]\n');
  const c = loadConfig({ configPath: file, env: {}, cwd: dir });
  assert.deepEqual(c.profiles.a?.closeHook, { kind: "http", path: "/shutdown" });
  assert.deepEqual(c.profiles.b?.closeHook, { kind: "command", argv: ["/bin/true", "x"] });
  assert.equal(c.profiles.default?.closeHook, null);
});

test("a full file is mapped to camelCase values", (t) => {
  const dir = tempDir(t);
  mkdirSync(join(dir, "state"));
  const file = toml(
    dir,
    [
      "[api]",
      'socket = "/run/sr/api.sock"',
      'socket_mode = "0600"',
      "body_limit_bytes = 2048",
      "[store]",
      'path = "state/r.db"',
      "flush_interval_ms = 250",
      "retain_reaped_sec = 86400",
      "retain_tombstones_sec = 604800",
      "[log]",
      'level = "error"',
      'file = "/var/log/sr.log"',
      "[reaper]",
      "concurrency = 2",
      "shutdown_grace_sec = 1.5",
      "",
    ].join("\n"),
  );
  const c = loadConfig({ configPath: file, env: {}, cwd: dir });
  assert.deepEqual(c.api, {
    socket: "/run/sr/api.sock",
    socketMode: 0o600,
    socketGid: null,
    bodyLimitBytes: 2048,
    adminGid: null,
    maxSessionsPerUid: DEFAULTS.api.max_sessions_per_uid,
    headerTimeoutMs: DEFAULTS.api.header_timeout_ms,
    requestTimeoutMs: DEFAULTS.api.request_timeout_ms,
    keepAliveTimeoutMs: DEFAULTS.api.keep_alive_timeout_ms,
    maxConnections: DEFAULTS.api.max_connections,
    maxConnectionsPerUid: DEFAULTS.api.max_connections_per_uid,
    tcp: null,
  });
  assert.deepEqual(c.store, {
    path: join(dir, "state/r.db"),
    flushIntervalMs: 250,
    retainReapedSec: 86400,
    retainTombstonesSec: 604800,
  });
  assert.deepEqual(c.log, { level: "error", file: "/var/log/sr.log" });
  assert.deepEqual(c.reaper, { concurrency: 2, shutdownGraceSec: 1.5 });
});

test("the shipped systemd/config.example.toml loads and matches the built-in defaults", (t) => {
  const example = fileURLToPath(new URL("../../../systemd/config.example.toml", import.meta.url));
  const c = loadConfig({ configPath: example, env: {}, cwd: "/srv/reaper" });
  const defaults = build({}, {}, "/srv/reaper");
  assert.equal(c.source, example);
  assert.deepEqual(c.api, defaults.api);
  assert.deepEqual(c.store, defaults.store);
  assert.deepEqual(c.log, defaults.log);
  assert.deepEqual(c.detect, defaults.detect);
  assert.deepEqual(c.reaper, defaults.reaper);
  assert.deepEqual(c.orphans, defaults.orphans);
  assert.deepEqual(c.containment, defaults.containment);
  assert.deepEqual(c.pressure, defaults.pressure);
  assert.deepEqual(c.profiles.default, defaults.profiles.default);
  // Copied as it ships, it defines no other profile (and no orphan sweep): the example
  // profile is commented out, and uncommented it loads as documented.
  assert.deepEqual(Object.keys(c.profiles), ["default"]);
  const text = readFileSync(example, "utf8");
  const marker = text.indexOf("# --- An example profile");
  assert.ok(marker > 0, "the example profile's marker");
  const uncommented = text
    .slice(marker)
    .split("\n")
    .map((l) => (l.startsWith("## ") ? l.slice(1) : /^# (\[|[a-z_]+ = )/.test(l) ? l.slice(2) : l))
    .join("\n");
  const dir = tempDir(t);
  const withSpark = join(dir, "config.toml");
  writeFileSync(withSpark, text.slice(0, marker) + uncommented);
  const e = loadConfig({ configPath: withSpark, env: {}, cwd: "/srv/reaper" });
  assert.deepEqual(e.profiles.spark, {
    name: "spark",
    heartbeatTimeoutSec: 60,
    idleTimeoutSec: PROFILE_DEFAULTS.idle_timeout_sec,
    maxLifetimeSec: 86400,
    gracePeriodSec: 30,
    stepTimeoutSec: PROFILE_DEFAULTS.step_timeout_sec,
    unkillableTimeoutSec: PROFILE_DEFAULTS.unkillable_timeout_sec,
    unkillableHook: null,
    allowedRoots: ["/tmp", "/var/tmp/spark"],
    allowedUids: [1001, 1002],
    closeHook: { kind: "http", path: "/api/v1/shutdown" },
    releaseHooks: [{ kind: "http", url: "http://127.0.0.1:7077/v1/engines/deregister" }],
    busyCpuPercent: 50,
    containment: "auto",
    removeIpc: false,
    hookPath: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    warnBeforeSec: 0,
    warnHooks: [],
    maxExtendSec: 28800,
    orphans: {
      mode: "report",
      exe: null,
      cmdline: "org\\.apache\\.spark\\.deploy\\.SparkSubmit",
      uids: [1001],
      minAgeSec: 600,
      paths: ["/var/tmp/spark/driver-*"],
    },
  });
});

// --- immutability ----------------------------------------------------------------------------

test("the result is deeply frozen", (t) => {
  const dir = tempDir(t);
  const file = toml(
    dir,
    '[profiles.default]\nallowed_roots = ["/srv/a", "/srv/b"]\n[profiles.cmd]\nclose_hook = ["/bin/stop", "now"]\n',
  );
  const c = loadConfig({ configPath: file, env: {}, cwd: dir });
  assertDeepFrozen(c);
  assert.throws(() => {
    (c.profiles.default?.allowedRoots as string[]).push("/");
  }, TypeError);
  assert.throws(() => {
    (c.api as { socket: string }).socket = "/elsewhere";
  }, TypeError);
  assertDeepFrozen(build({}));
});

test("hook templates: an unknown placeholder or one inside a shell -c script is an error naming the key", () => {
  const profile = (hooks: Record<string, unknown>) => ({ profiles: { gw: hooks } });
  const e1 = assertInvalid(
    () => build(profile({ close_hook: ["redis-cli", "-p", "{prot}", "shutdown"] })),
    "profiles.gw.close_hook",
  );
  assert.match(
    e1.message,
    /item 2: unknown placeholder "\{prot\}" \(known: \{id\}, \{pid\}, \{uid\}, \{port\}, \{ports\}, \{path\}, \{paths\}, \{label:NAME\}\)/,
  );
  assertInvalid(
    () => build(profile({ release_hooks: [["/bin/true"], ["x", "{label:}"]] })),
    "profiles.gw.release_hooks.1",
  );
  const e3 = assertInvalid(
    () => build(profile({ release_hooks: [["/bin/sh", "-c", "redis-cli -p {port} shutdown"]] })),
    "profiles.gw.release_hooks.0",
  );
  assert.match(e3.message, /would be run as shell code; pass it as a positional parameter/);
  // Accepted: placeholders as items or inside items, shell variables with braces, a script
  // that takes a placeholder as a positional parameter; and hook_path.
  const ok = build(
    profile({
      close_hook: ["redis-cli", "-p", "{port}", "-n", "{label:db}", "shutdown", "nosave"],
      release_hooks: [
        ["sh", "-c", 'exec redis-cli -p "${SESSION_PORTS%%,*}" ping'],
        ["sh", "-c", 'rm -f "$1/lock"', "sh", "{path}"],
        ["curl", "-d", '{"json": true}', "http://127.0.0.1:9/x?id={id}"],
      ],
      hook_path: "/opt/gw/bin:/usr/bin",
    }),
  );
  const gw = ok.profiles.gw!;
  assert.deepEqual(gw.closeHook, {
    kind: "command",
    argv: ["redis-cli", "-p", "{port}", "-n", "{label:db}", "shutdown", "nosave"],
  });
  assert.equal(gw.hookPath, "/opt/gw/bin:/usr/bin");
  assert.equal(ok.profiles.default!.hookPath, "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
  assertInvalid(() => build(profile({ hook_path: "bin:/usr/bin" })), "hook_path");
});

test("warnings, extensions and [pressure]: defaults, checks naming the key, {reason} and {in_sec} only in warn_hooks", () => {
  const d = build({});
  assert.equal(d.profiles.default!.warnBeforeSec, 0);
  assert.deepEqual(d.profiles.default!.warnHooks, []);
  assert.equal(d.profiles.default!.maxExtendSec, 28800);
  assert.deepEqual(d.pressure, {
    file: "/proc/pressure/memory",
    someAvg10: 0,
    durationSec: 30,
    cooldownSec: 60,
    spareActiveSec: 300,
    spareCpuPercent: 5,
  });
  const ok = build({
    pressure: { some_avg10: 20, file: "/sys/fs/cgroup/engines/memory.pressure", duration_sec: 10 },
    profiles: {
      default: { warn_before_sec: 300, max_extend_sec: 0 },
      nb: {
        idle_timeout_sec: 1800,
        warn_hooks: [["/usr/local/bin/notify", "{id}", "{reason}", "{in_sec}"], "http://127.0.0.1:8081/warn"],
      },
    },
  });
  assert.equal(ok.pressure.someAvg10, 20);
  assert.equal(ok.pressure.file, "/sys/fs/cgroup/engines/memory.pressure");
  assert.equal(ok.pressure.cooldownSec, 60);
  const nb = ok.profiles.nb!;
  assert.equal(nb.warnBeforeSec, 300, "inherited from default");
  assert.equal(nb.maxExtendSec, 0);
  assert.deepEqual(nb.warnHooks, [
    { kind: "command", argv: ["/usr/local/bin/notify", "{id}", "{reason}", "{in_sec}"] },
    { kind: "http", url: "http://127.0.0.1:8081/warn" },
  ]);
  const e1 = assertInvalid(
    () => build({ profiles: { nb: { idle_timeout_sec: 60, warn_before_sec: 60 } } }),
    "profiles.nb.warn_before_sec",
  );
  assert.match(e1.message, /not shorter than idle_timeout_sec \(60\)/);
  assertInvalid(
    () => build({ profiles: { nb: { max_lifetime_sec: 100, warn_before_sec: 200 } } }),
    "profiles.nb.warn_before_sec",
    "max_lifetime_sec",
  );
  assertInvalid(() => build({ profiles: { nb: { warn_hooks: [["x", "{prot}"]] } } }), "profiles.nb.warn_hooks.0");
  assertInvalid(
    () => build({ profiles: { nb: { warn_hooks: ["http://example.com/x"] } } }),
    "profiles.nb.warn_hooks.0",
  );
  // {reason} means nothing to a release hook.
  assertInvalid(
    () => build({ profiles: { nb: { release_hooks: [["x", "{reason}"]] } } }),
    "profiles.nb.release_hooks.0",
  );
  assertInvalid(() => build({ pressure: { some_avg10: 101 } }), "pressure.some_avg10");
  assertInvalid(() => build({ pressure: { file: "relative" } }), "pressure.file");
  assertInvalid(() => build({ pressure: { threshold: 1 } }), "pressure.threshold");
  assertInvalid(() => build({ profiles: { nb: { max_extend_sec: -1 } } }), "profiles.nb.max_extend_sec");
});

test("api.socket_group: a name or a gid; an unknown name is an error naming the key", () => {
  assert.equal(build({ api: { socket_group: "0" } }).api.socketGid, 0);
  assert.equal(build({ api: { socket_group: "root" } }).api.socketGid, 0);
  assert.equal(build({}).api.socketGid, null);
  assertInvalid(() => build({ api: { socket_group: "no-such-group-here" } }), "api.socket_group");
});

test("unkillable_timeout_sec and unkillable_hook: defaults, inheritance, {pids}, and errors naming the key", () => {
  const c = build({
    profiles: {
      default: { unkillable_timeout_sec: 2.5 },
      nfs: { unkillable_hook: ["/usr/local/bin/page", "--session", "{id}", "--pids", "{pids}"] },
    },
  });
  assert.equal(PROFILE_DEFAULTS.unkillable_timeout_sec, 5);
  assert.equal(build({}).profiles.default?.unkillableTimeoutSec, 5);
  assert.equal(c.profiles.default?.unkillableTimeoutSec, 2.5);
  assert.equal(c.profiles.nfs?.unkillableTimeoutSec, 2.5, "inherited from [profiles.default]");
  assert.equal(c.profiles.default?.unkillableHook, null);
  assert.deepEqual(c.profiles.nfs?.unkillableHook, ["/usr/local/bin/page", "--session", "{id}", "--pids", "{pids}"]);
  assertInvalid(() => build({ profiles: { x: { unkillable_timeout_sec: 0 } } }), "profiles.x.unkillable_timeout_sec");
  assertInvalid(() => build({ profiles: { x: { unkillable_hook: [] } } }), "profiles.x.unkillable_hook");
  assertInvalid(() => build({ profiles: { x: { unkillable_hook: "/page" } } }), "profiles.x.unkillable_hook");
  const e = assertInvalid(
    () => build({ profiles: { x: { unkillable_hook: ["/page", "{reason}"] } } }),
    "profiles.x.unkillable_hook",
  );
  assert.match(e.message, /unknown placeholder "\{reason\}".*\{pids\}/);
  // {pids} is the unkillable hook's own: no other hook may name it.
  assertInvalid(() => build({ profiles: { x: { close_hook: ["/stop", "{pids}"] } } }), "profiles.x.close_hook");
});
