import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { callApi } from "../../src/client/transport.js";
import { FakeClock } from "../../src/clock.js";
import { Daemon } from "../../src/daemon/daemon.js";
import { listenUnix } from "../../src/http/listen.js";
import {
  isGone,
  portFree,
  spawnDaemon,
  startDaemon,
  startEngine,
  tempDir,
  testConfig,
  until,
  writeDaemonConfig,
} from "../helpers.js";

type SessionJson = { state: string; reason: string; outcome: string; steps: { name: string; outcome: string }[] };

test("daemon down longer than the heartbeat timeout: nothing is reaped until the timeout elapses again", async (t) => {
  const dir = tempDir(t);
  const config = testConfig(dir);
  const clock = new FakeClock();
  const first = await startDaemon(t, config, clock);
  const alive = await startEngine(t, [], join(dir, "alive"));
  const dies = await startEngine(t, [], join(dir, "dies"));
  await first.api("POST", "/v1/sessions", { id: "alive", engine: { pid: alive.pid }, heartbeatTimeoutSec: 10 });
  await first.api("POST", "/v1/sessions", { id: "dies", engine: { pid: dies.pid }, paths: [dies.dir] });
  clock.advance(5_000);
  await first.stop();

  // While the daemon is down: one engine dies, and a minute passes.
  dies.child.kill("SIGKILL");
  await dies.exited;
  clock.advance(60_000);

  const second = await startDaemon(t, config, clock);
  // Evidence reaps at once...
  const gone = await second.reaped("dies");
  assert.equal(gone.reason, "engine_gone");
  assert.ok(!existsSync(dies.dir as string));
  // ...time does not: the heartbeat timeout restarts from the recovery.
  assert.equal((await second.api<SessionJson>("GET", "/v1/sessions/alive")).body.state, "live");
  clock.advance(9_999);
  assert.equal((await second.api<SessionJson>("GET", "/v1/sessions/alive")).body.state, "live");
  assert.equal(second.daemon.reaper.inFlight, 0);
  clock.advance(1);
  const expired = await second.reaped("alive");
  assert.equal(expired.reason, "heartbeat_timeout");
  assert.ok(isGone(alive.pid));
});

test("killed with SIGKILL mid-reap, the daemon resumes after the last journaled step", async (t) => {
  const dir = tempDir(t);
  const { file, socket } = writeDaemonConfig(
    dir,
    `[profiles.default]
close_hook = "/shutdown"
step_timeout_sec = 1
grace_period_sec = 4
allowed_roots = ["${dir}"]
`,
  );
  const first = await spawnDaemon(t, file, socket);
  const engine = await startEngine(t, ["--hang-shutdown", "--ignore-term"], join(dir, "engine"));
  const reg = await callApi(socket, "POST", "/v1/sessions", {
    id: "crash",
    engine: { pid: engine.pid },
    ports: [engine.port],
    paths: [engine.dir],
  });
  assert.equal(reg.status, 201);
  assert.equal((await callApi(socket, "POST", "/v1/sessions/crash/reap")).status, 202);
  // close-environment times out after 1 s and is journaled; terminate then waits out the
  // grace period of an engine that ignores SIGTERM: kill the daemon right there.
  await until(
    async () =>
      (await callApi<SessionJson>(socket, "GET", "/v1/sessions/crash")).body.steps.some(
        (s) => s.name === "close-environment",
      ),
    10_000,
    "close-environment journaled",
  );
  first.proc.kill("SIGKILL");
  await first.exit;
  assert.ok(!isGone(engine.pid), "the engine should still run: the reap was cut short");

  const second = await spawnDaemon(t, file, socket);
  await until(
    async () => (await callApi<SessionJson>(socket, "GET", "/v1/sessions/crash")).body.state === "reaped",
    15_000,
    "reap resumed and finished",
  );
  const s = (await callApi<SessionJson>(socket, "GET", "/v1/sessions/crash")).body;
  assert.deepEqual(
    s.steps.map((x) => [x.name, x.outcome]),
    [
      ["fence", "ok"],
      ["close-environment", "timeout"],
      ["terminate", "ok"],
      ["release-connections-and-ports", "ok"],
      ["remove-paths", "ok"],
      ["finish", "ok"],
    ],
  );
  assert.equal(s.outcome, "partial"); // the close hook timed out
  const events = (
    await callApi<{ events: { event: string; step: string | null }[] }>(socket, "GET", "/v1/sessions/crash/events")
  ).body.events;
  assert.equal(events.filter((e) => e.step === "close-environment").length, 1, "a journaled step ran twice");
  assert.equal(events.filter((e) => e.event === "reap.finished").length, 1);
  assert.ok(isGone(engine.pid));
  assert.ok(await portFree(engine.port));
  assert.ok(!existsSync(engine.dir as string));
  assert.match(second.output(), /"resumedReaps":1/);
  second.proc.kill("SIGTERM");
  assert.equal(await second.exit, 0);
});

test("a stale socket file is replaced; a socket another daemon answers on is not", async (t) => {
  const dir = tempDir(t);
  const config = testConfig(dir);
  // A crashed daemon's leftover: a socket file nobody listens on.
  const crashed = spawn(
    process.execPath,
    ["-e", `require("net").createServer().listen(${JSON.stringify(config.api.socket)}, () => console.log("up"))`],
    {
      stdio: ["ignore", "pipe", "inherit"],
    },
  );
  await new Promise((r) => crashed.stdout.once("data", r));
  crashed.kill("SIGKILL");
  await new Promise((r) => crashed.once("exit", r));
  assert.ok(existsSync(config.api.socket));

  const d = await startDaemon(t, config);
  assert.equal((await d.api("GET", "/healthz")).status, 200);

  const rival = new Daemon({
    config: testConfig(dir, { store: { path: join(dir, "other.db") } }),
    logStream: { write: () => undefined },
  });
  t.after(() => rival.stop());
  await rival.start();
  await assert.rejects(listenUnix(rival.app, config.api.socket, 0o660, null), { code: "SR_CONFIG_INVALID" });
  assert.equal((await d.api("GET", "/healthz")).status, 200);
});
