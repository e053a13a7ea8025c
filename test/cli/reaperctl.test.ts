import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { join } from "node:path";
import { test } from "node:test";
import { relativeTime, table } from "../../src/cli/format.js";
import { REAPERCTL, REAPERD, startDaemon, startEngine, tempDir, testConfig } from "../helpers.js";

function ctl(
  args: string[],
  env: NodeJS.ProcessEnv = {},
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [REAPERCTL, ...args], { env: { ...process.env, ...env } });
    let stdout = "";
    let stderr = "";
    p.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    p.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    p.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}

test("reaperctl status, list, show, events, close: tables, --json, exit codes", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  const engine = await startEngine(t, [], join(dir, "engine"));
  await d.api("POST", "/v1/sessions", { id: "cli-1", engine: { pid: engine.pid }, owner: "bob", paths: [engine.dir] });
  const s = ["--socket", d.socket];

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

test("reaperctl: usage errors exit 2, an absent daemon exits 4 with one line", async (t) => {
  const dir = tempDir(t);
  assert.equal((await ctl([])).code, 2);
  const unknown = await ctl(["frobnicate"]);
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /unknown command "frobnicate"/);
  assert.equal((await ctl(["show"])).code, 2);
  assert.equal((await ctl(["--bogus", "status"])).code, 2);
  const help = await ctl(["--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /Exit codes/);
  const down = await ctl(["status", "--socket", join(dir, "absent.sock")]);
  assert.equal(down.code, 4);
  assert.equal(down.stderr.trim().split("\n").length, 1);
  assert.match(down.stderr, /is it running\?/);
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

test("systemd/config.example.toml is a valid configuration", async () => {
  const { loadConfig } = await import("../../src/config/load.js");
  const { fileURLToPath } = await import("node:url");
  const file = fileURLToPath(new URL("../../../systemd/config.example.toml", import.meta.url));
  const config = loadConfig({ configPath: file, env: {}, cwd: "/tmp" });
  assert.deepEqual(Object.keys(config.profiles).sort(), ["default", "spark"]);
  assert.equal(config.profiles.spark?.idleTimeoutSec, 3600);
  assert.deepEqual(config.profiles.spark?.closeHook, { kind: "http", path: "/api/v1/shutdown" });
});
