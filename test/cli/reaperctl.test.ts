import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { parseDuration, relativeTime, table } from "../../src/cli/format.js";
import { REAPERD, sleeper, startDaemon, startEngine, tempDir, testConfig } from "../helpers.js";
import { ctl } from "./ctl.js";

test("reaperctl status, list, show, events, close: tables, --json, exit codes", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  const engine = await startEngine(t, [], join(dir, "engine"));
  await d.api("POST", "/v1/sessions", {
    id: "cli-1",
    engine: { pid: engine.pid },
    owner: "bob",
    paths: [engine.dir],
    labels: { team: "data" },
  });
  const s = ["--socket", d.socket];

  // update: a port the engine holds, a label; show prints both.
  const updated = await ctl(["update", "cli-1", "--port", String(engine.port), "--label", "stage=2", ...s]);
  assert.equal(updated.code, 0, updated.stderr);
  assert.match(updated.stdout, new RegExp(`^ports\\s+${engine.port}$`, "m"));
  assert.match(updated.stdout, /^labels\s+team=data, stage=2$/m);
  const notHeld = await ctl(["update", "cli-1", "--port", "1", ...s]);
  assert.equal(notHeld.code, 1);
  assert.match(notHeld.stderr, /SR_PORT_NOT_OWNED/);
  assert.equal((await ctl(["update", "cli-1", ...s])).code, 2, "nothing to add is a usage error");
  assert.equal((await ctl(["update", "nope", "--label", "a=b", ...s])).code, 3);

  const status = await ctl(["status", ...s]);
  assert.equal(status.code, 0, status.stderr);
  assert.match(status.stdout, /^state\s+running$/m);
  assert.match(status.stdout, /^live\s+1$/m);

  const list = await ctl(["list", ...s]);
  assert.equal(list.code, 0);
  assert.match(list.stdout, /^ID\s+STATE\s+PROFILE\s+OWNER\s+PID\s+CREATED\s+EXPIRES/m);
  assert.match(
    list.stdout,
    new RegExp(`^cli-1\\s+live\\s+default\\s+bob\\s+${engine.pid}\\s+\\d+s ago\\s+in \\d+s$`, "m"),
  );

  const json = await ctl(["list", "--json", "--state", "live"], { REAPER_SOCKET: d.socket });
  assert.equal(json.code, 0);
  assert.deepEqual(
    (JSON.parse(json.stdout) as { sessions: { id: string }[] }).sessions.map((x) => x.id),
    ["cli-1"],
  );

  const close = await ctl(["close", "cli-1", ...s]);
  assert.equal(close.code, 0, close.stderr);
  await d.reaped("cli-1");
  const show = await ctl(["show", "cli-1", ...s]);
  assert.equal(show.code, 0);
  assert.match(show.stdout, /^state\s+reaped \(closed\)$/m);
  assert.match(show.stdout, /^labels\s+team=data, stage=2$/m);
  assert.match(show.stdout, /^remove-paths\s+ok\s+\d+$/m);
  const events = await ctl(["events", "cli-1", ...s]);
  assert.match(events.stdout, /reap\.finished/);

  const missing = await ctl(["show", "nope", ...s]);
  assert.equal(missing.code, 3);
  assert.match(missing.stderr, /SR_SESSION_NOT_FOUND/);
  const again = await ctl(["close", "cli-1", ...s]);
  assert.equal(again.code, 1);
  assert.match(again.stderr, /SR_SESSION_NOT_LIVE/);
});

test("reaperctl show: the session's tracking after its containment, and '1 process' in the singular", async (t) => {
  const dir = tempDir(t);
  // Started before the daemon, uncontained: no lineage and no cgroup, so walks of /proc only.
  const before = sleeper(t);
  const d = await startDaemon(t, testConfig(dir, { profiles: { default: { containment: "none" } } }));
  const after = sleeper(t);
  const s = ["--socket", d.socket];
  await d.api("POST", "/v1/sessions", { id: "snap-1", engine: { pid: before.pid } });
  await d.api("POST", "/v1/sessions", { id: "late-1", engine: { pid: after.pid } });

  const live = await ctl(["show", "snap-1", ...s]);
  assert.equal(live.code, 0, live.stderr);
  assert.match(live.stdout, /^containment\s+none \(.+\)\ntracking\s+snapshots$/m);
  // Whatever this host gives a session born after the daemon, show prints what the API says.
  const lateTracking = (await d.api<{ tracking: string }>("GET", "/v1/sessions/late-1")).body.tracking;
  const late = await ctl(["show", "late-1", ...s]);
  assert.match(late.stdout, new RegExp(`^tracking\\s+${lateTracking}$`, "m"));
  const json = await ctl(["show", "snap-1", "--json", ...s]);
  assert.equal((JSON.parse(json.stdout) as { tracking: string }).tracking, "snapshots");

  // Reaped: a lone `sleep` was one process at most.
  assert.equal((await ctl(["reap", "snap-1", ...s])).code, 0);
  await d.reaped("snap-1");
  const reaped = await ctl(["show", "snap-1", ...s]);
  assert.equal(reaped.code, 0, reaped.stderr);
  assert.match(reaped.stdout, /^used\s+.*, 1 process at most, lived \d+ s$/m);
  assert.doesNotMatch(reaped.stdout, /\b1 processes\b/);
  assert.match(reaped.stdout, /^tracking\s+snapshots$/m);
});

test("reaperctl expiring: soonest first, with the timeout that fires; --within; --json", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  const s = ["--socket", d.socket];
  await d.api("POST", "/v1/sessions", {
    id: "hb",
    engine: { pid: sleeper(t).pid },
    owner: "bob",
    heartbeatTimeoutSec: 20,
  });
  await d.api("POST", "/v1/sessions", {
    id: "idle",
    engine: { pid: sleeper(t).pid },
    heartbeatTimeoutSec: 30,
    idleTimeoutSec: 15,
  });
  await d.api("POST", "/v1/sessions", { id: "later", engine: { pid: sleeper(t).pid }, heartbeatTimeoutSec: 30 });

  // Deadlines: idle in 15 s (idle timeout), hb in 20 s, later in 30 s (heartbeat timeouts).
  const soon = await ctl(["expiring", "--within", "20s", ...s]);
  assert.equal(soon.code, 0, soon.stderr);
  assert.match(
    soon.stdout,
    /^ID\s+PROFILE\s+OWNER\s+EXPIRES\s+REASON\nidle\s+default\s+-\s+in \d+s\s+idle_timeout\nhb\s+default\s+bob\s+in \d+s\s+heartbeat_timeout\n$/,
  );
  const all = await ctl(["expiring", ...s]); // default: 10m
  assert.deepEqual(
    all.stdout
      .split("\n")
      .slice(1, -1)
      .map((l) => l.split(/\s+/)[0]),
    ["idle", "hb", "later"],
  );
  const none = await ctl(["expiring", "--within", "2s", ...s]);
  assert.equal(none.stdout, "ID  PROFILE  OWNER  EXPIRES  REASON\n(none)\n");
  const json = await ctl(["expiring", "--within", "1m", "--json", ...s]);
  const body = JSON.parse(json.stdout) as { sessions: { id: string; expiresBy: string; inSec: number }[] };
  assert.deepEqual(
    body.sessions.map((x) => [x.id, x.expiresBy]),
    [
      ["idle", "idle_timeout"],
      ["hb", "heartbeat_timeout"],
      ["later", "heartbeat_timeout"],
    ],
  );
  assert.ok(body.sessions[0]!.inSec > 0 && body.sessions[0]!.inSec <= 15);

  const bad = await ctl(["expiring", "--within", "soon", ...s]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--within: "soon" is not a duration/);
  assert.equal((await ctl(["expiring", "extra", ...s])).code, 2);
});

test("reaperctl COMMAND --help: every command explains itself", async () => {
  const commands = ["status", "list", "show", "events", "expiring", "close", "reap", "update", "audit verify", "run"];
  for (const c of commands) {
    const words = c.split(" ");
    for (const args of c === "run"
      ? [
          [...words, "--help"],
          ["help", ...words],
        ]
      : [[...words, "--help"]]) {
      const r = await ctl(args);
      assert.equal(r.code, 0, `${args.join(" ")}: ${r.stderr}`);
      assert.ok(r.stdout.startsWith(`Usage: reaperctl [--socket PATH] [--json] ${c}`), r.stdout);
      assert.match(r.stdout, /Example/);
      assert.match(r.stdout, /Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 daemon unreachable,\n5 audit verify/);
    }
  }
  const top = await ctl(["--help"]);
  for (const c of commands) assert.match(top.stdout, new RegExp(`^  ${c}`, "m"));
  const wrong = await ctl(["list", "--within", "3"]);
  assert.equal(wrong.code, 2);
  assert.equal(wrong.stderr, 'reaperctl: unknown option --within for list\nRun "reaperctl list --help" for usage.\n');
});

test("reaperctl: usage errors exit 2, an absent daemon exits 4 with one line", async (t) => {
  const dir = tempDir(t);
  assert.equal((await ctl([])).code, 2);
  const unknown = await ctl(["frobnicate"]);
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /unknown command "frobnicate"/);
  assert.equal((await ctl(["show"])).code, 2);
  // A state that does not exist: usage, naming the states, before any call to the daemon.
  const bogus = await ctl(["list", "--state", "bogus", "--socket", join(dir, "absent.sock")]);
  assert.equal(bogus.code, 2);
  assert.match(bogus.stderr, /--state: "bogus" is not a state; use one of live, reaping, reaped/);
  assert.equal((await ctl(["--bogus", "status"])).code, 2);
  const help = await ctl(["--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /Exit codes/);
  const down = await ctl(["status", "--socket", join(dir, "absent.sock")]);
  assert.equal(down.code, 4);
  assert.equal(down.stderr.trim().split("\n").length, 1);
  assert.match(down.stderr, /is it running\?/);
});

test("reaperctl: an unknown option or a typo is named, with the nearest command or option; --version; bad numbers caught before any request", async (t) => {
  const dir = tempDir(t);
  const absent = ["--socket", join(dir, "absent.sock")]; // any request would exit 4, not 2
  const usage = (r: { code: number | null; stderr: string }, line: string): void => {
    assert.equal(r.code, 2, r.stderr);
    assert.equal(r.stderr.split("\n")[0], `reaperctl: ${line}`);
    assert.ok(r.stderr.length < 200, `one line and a pointer to --help, not the whole usage: ${r.stderr}`);
  };
  usage(await ctl(["--bogus"]), "unknown option --bogus");
  usage(await ctl(["stauts", ...absent]), 'unknown command "stauts"; did you mean "status"?');
  usage(await ctl(["lsit", ...absent]), 'unknown command "lsit"; did you mean "list"?');
  usage(await ctl(["audit", "verfy", ...absent]), 'unknown command "audit verfy"; did you mean "audit verify"?');
  usage(await ctl(["frobnicate", ...absent]), 'unknown command "frobnicate"');
  usage(await ctl(["list", "--stat", "live", ...absent]), "unknown option --stat for list; did you mean --state?");
  usage(await ctl(["list", "--limit", "abc", ...absent]), '--limit: "abc" is not a number from 1 to 1000');
  usage(await ctl(["list", "--limit", "0", ...absent]), '--limit: "0" is not a number from 1 to 1000');
  usage(await ctl(["list", "--limit", "1001", ...absent]), '--limit: "1001" is not a number from 1 to 1000');
  const { version } = JSON.parse(readFileSync(new URL("../../../package.json", import.meta.url), "utf8")) as {
    version: string;
  };
  for (const args of [["--version"], ["-V"], ["status", "--version"]]) {
    const v = await ctl(args);
    assert.equal(v.code, 0, args.join(" "));
    assert.equal(v.stdout, `reaperctl ${version}\n`);
  }
});

test("reaperd: --help, --version, and a bad config exits 78 naming the key", async (t) => {
  const dir = tempDir(t);
  const run = (args: string[]) =>
    new Promise<{ code: number | null; out: string }>((resolve) => {
      const p = spawn(process.execPath, [REAPERD, ...args], { env: { ...process.env, REAPER_CONFIG: "" } });
      let out = "";
      p.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
      p.stderr.setEncoding("utf8").on("data", (d: string) => (out += d));
      p.on("close", (code) => resolve({ code, out }));
    });
  assert.match((await run(["--version"])).out, /^\d+\.\d+\.\d+\n$/);
  assert.equal((await run(["--help"])).code, 0);
  const { writeFileSync } = await import("node:fs");
  const file = join(dir, "bad.toml");
  writeFileSync(file, "[profiles.gpu]\ngrace_perod_sec = 3\n");
  const bad = await run(["--config", file]);
  assert.equal(bad.code, 78);
  assert.match(bad.out, /profiles\.gpu\.grace_perod_sec: unknown key/);
  const missing = await run(["--config", join(dir, "missing.toml")]);
  assert.equal(missing.code, 78);
});

test("format: aligned tables and relative times", () => {
  assert.equal(
    table([
      ["a", "bb"],
      ["ccc", "d"],
    ]),
    "a    bb\nccc  d\n",
  );
  assert.equal(table([["ID", "STATE"]], true), "ID  STATE\n(none)\n");
  const now = Date.parse("2026-01-01T00:00:00Z");
  assert.equal(relativeTime("2026-01-01T00:00:12Z", now), "in 12s");
  assert.equal(relativeTime("2025-12-31T23:57:00Z", now), "3m ago");
  assert.equal(relativeTime("2025-12-31T22:00:00Z", now), "2h ago");
  assert.equal(relativeTime("2026-01-02T00:00:00Z", now), "in 1d");
});

test("format: durations as operators write them", () => {
  assert.equal(parseDuration("30s"), 30_000);
  assert.equal(parseDuration("10m"), 600_000);
  assert.equal(parseDuration("2h"), 7_200_000);
  assert.equal(parseDuration("1d"), 86_400_000);
  assert.equal(parseDuration("1h30m"), 5_400_000);
  assert.equal(parseDuration("500ms"), 500);
  assert.equal(parseDuration("45"), 45_000);
  assert.equal(parseDuration("1.5s"), 1500);
  for (const bad of ["", "s", "10x", "-5s", "5 s", "m10"]) assert.equal(parseDuration(bad), null, bad);
});

test("systemd/config.example.toml is a valid configuration", async () => {
  const { loadConfig } = await import("../../src/config/load.js");
  const { fileURLToPath } = await import("node:url");
  const file = fileURLToPath(new URL("../../../systemd/config.example.toml", import.meta.url));
  const config = loadConfig({ configPath: file, env: {}, cwd: "/tmp" });
  assert.deepEqual(Object.keys(config.profiles).sort(), ["default"]);
});
