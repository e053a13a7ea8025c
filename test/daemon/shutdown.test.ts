import assert from "node:assert/strict";
import { join } from "node:path";
import { test } from "node:test";
import { callApi } from "../../src/client/transport.js";
import { Store } from "../../src/store/store.js";
import { isGone, spawnDaemon, startEngine, tempDir, until, writeDaemonConfig } from "../helpers.js";

type ErrorBody = { error: { code: string } };

function config(dir: string, graceSec: number): { file: string; socket: string; db: string } {
  const { file, socket, db } = writeDaemonConfig(
    dir,
    `[reaper]
shutdown_grace_sec = ${graceSec}
[profiles.default]
close_hook = "/shutdown"
step_timeout_sec = 1.5
grace_period_sec = 1
allowed_roots = ["${dir}"]
`,
  );
  return { file, socket, db };
}

test("SIGTERM: shutting_down at once, reads and heartbeats keep answering, in-flight reaps finish, live sessions stay, exit 0", async (t) => {
  const dir = tempDir(t);
  const { file, socket, db } = config(dir, 15);
  const daemon = await spawnDaemon(t, file, socket);
  const live = await startEngine(t);
  const hanging = await startEngine(t, ["--hang-shutdown"], join(dir, "hanging"));
  await callApi(socket, "POST", "/v1/sessions", { id: "live", engine: { pid: live.pid }, heartbeatTimeoutSec: 30 });
  await callApi(socket, "POST", "/v1/sessions", {
    id: "inflight",
    engine: { pid: hanging.pid },
    ports: [hanging.port],
    paths: [hanging.dir],
  });
  assert.equal((await callApi(socket, "POST", "/v1/sessions/inflight/reap")).status, 202);

  daemon.proc.kill("SIGTERM");
  await until(
    async () => (await callApi<{ state: string }>(socket, "GET", "/v1/daemon")).body.state === "shutting_down",
    5_000,
    "shutting_down",
  );
  // The reap of "inflight" is still in its close hook (1.5 s): the daemon must keep serving.
  assert.equal((await callApi(socket, "GET", "/readyz")).status, 503);
  assert.equal((await callApi(socket, "GET", "/healthz")).status, 200);
  assert.equal((await callApi(socket, "POST", "/v1/sessions/live/heartbeat", { activity: "busy" })).status, 200);
  assert.equal((await callApi<{ state: string }>(socket, "GET", "/v1/sessions/live")).body.state, "live");
  const refused = await callApi<ErrorBody>(socket, "POST", "/v1/sessions", { engine: { pid: live.pid } });
  assert.deepEqual([refused.status, refused.body.error.code], [503, "SR_SHUTTING_DOWN"]);

  assert.equal(await daemon.exit, 0);
  const out = daemon.output();
  assert.ok(out.indexOf('"daemon.stopping"') < out.indexOf('"reap.finished"'));
  assert.ok(out.indexOf('"reap.finished"') < out.indexOf('"daemon.stopped"'));

  const store = new Store(db, Date.now());
  t.after(() => store.close());
  assert.equal(store.getSession("live")?.state, "live");
  assert.equal(store.getSession("inflight")?.state, "reaped");
  assert.ok(!isGone(live.pid), "a live session was reaped because the daemon stopped");
  assert.ok(isGone(hanging.pid));
});

test("SIGTERM with a short grace: the reap pauses at a step boundary and resumes at the next start", async (t) => {
  const dir = tempDir(t);
  const { file, socket, db } = config(dir, 0.2);
  const first = await spawnDaemon(t, file, socket);
  const hanging = await startEngine(t, ["--hang-shutdown"], join(dir, "hanging"));
  await callApi(socket, "POST", "/v1/sessions", {
    id: "paused",
    engine: { pid: hanging.pid },
    ports: [hanging.port],
    paths: [hanging.dir],
  });
  await callApi(socket, "POST", "/v1/sessions/paused/reap");
  first.proc.kill("SIGTERM");
  assert.equal(await first.exit, 0);

  const mid = new Store(db, Date.now());
  assert.equal(mid.getSession("paused")?.state, "reaping");
  assert.deepEqual(
    mid.steps("paused").map((s) => s.name),
    ["fence", "close-environment"],
  );
  mid.close();
  assert.ok(!isGone(hanging.pid));

  const second = await spawnDaemon(t, file, socket);
  await until(
    async () => (await callApi<{ state: string }>(socket, "GET", "/v1/sessions/paused")).body.state === "reaped",
    10_000,
    "resumed reap finished",
  );
  const steps = (await callApi<{ steps: { name: string }[] }>(socket, "GET", "/v1/sessions/paused")).body.steps;
  assert.deepEqual(
    steps.map((s) => s.name),
    ["fence", "close-environment", "terminate", "release-connections-and-ports", "remove-paths", "finish"],
  );
  assert.ok(isGone(hanging.pid));
  second.proc.kill("SIGTERM");
  assert.equal(await second.exit, 0);
});

test("a second SIGTERM forces the exit; the journal stays consistent and the reap resumes", async (t) => {
  const dir = tempDir(t);
  const { file, socket, db } = config(dir, 30);
  const first = await spawnDaemon(t, file, socket);
  const hanging = await startEngine(t, ["--hang-shutdown"]);
  await callApi(socket, "POST", "/v1/sessions", {
    id: "forced-exit",
    engine: { pid: hanging.pid },
    ports: [hanging.port],
  });
  await callApi(socket, "POST", "/v1/sessions/forced-exit/reap");
  first.proc.kill("SIGTERM");
  await until(
    async () => (await callApi<{ state: string }>(socket, "GET", "/v1/daemon")).body.state === "shutting_down",
    5_000,
    "shutting_down",
  );
  first.proc.kill("SIGTERM");
  assert.equal(await first.exit, 1);
  const store = new Store(db, Date.now());
  assert.equal(store.getSession("forced-exit")?.state, "reaping");
  store.close();
  const second = await spawnDaemon(t, file, socket);
  await until(
    async () => (await callApi<{ state: string }>(socket, "GET", "/v1/sessions/forced-exit")).body.state === "reaped",
    10_000,
    "resumed",
  );
  second.proc.kill("SIGTERM");
  assert.equal(await second.exit, 0);
});

test("SIGTERM with 20 reaps in flight while engines heartbeat: every answer keeps coming, exit 0 well before TimeoutStopSec", async (t) => {
  const dir = tempDir(t);
  const { file, socket, db } = writeDaemonConfig(
    dir,
    `[reaper]
concurrency = 20
shutdown_grace_sec = 15
[profiles.default]
close_hook = "/shutdown"
step_timeout_sec = 1.5
grace_period_sec = 0.5
allowed_roots = ["${dir}"]
`,
  );
  const daemon = await spawnDaemon(t, file, socket);
  const hanging = await Promise.all(Array.from({ length: 20 }, () => startEngine(t, ["--hang-shutdown"])));
  const live = await Promise.all(Array.from({ length: 3 }, () => startEngine(t)));
  for (const [i, e] of hanging.entries()) {
    await callApi(socket, "POST", "/v1/sessions", { id: `r${i}`, engine: { pid: e.pid }, ports: [e.port] });
  }
  for (const [i, e] of live.entries()) {
    await callApi(socket, "POST", "/v1/sessions", { id: `l${i}`, engine: { pid: e.pid }, heartbeatTimeoutSec: 30 });
  }
  for (let i = 0; i < 20; i++) assert.equal((await callApi(socket, "POST", `/v1/sessions/r${i}/reap`)).status, 202);

  // The engines keep heartbeating and an operator keeps reading, every 50 ms, until the end.
  const answers: number[] = [];
  const errors: string[] = [];
  let stopped = false;
  const traffic = (async () => {
    while (!stopped) {
      try {
        for (let i = 0; i < 3; i++)
          answers.push((await callApi(socket, "POST", `/v1/sessions/l${i}/heartbeat`)).status);
        answers.push((await callApi(socket, "GET", "/v1/sessions?state=reaping")).status);
      } catch (err) {
        errors.push(String(err));
        stopped = true; // the socket closed: the daemon is gone
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  })();

  const t0 = Date.now();
  daemon.proc.kill("SIGTERM");
  assert.equal(await daemon.exit, 0);
  const stopMs = Date.now() - t0;
  stopped = true;
  await traffic;
  t.diagnostic(
    `stopped in ${stopMs} ms with 20 reaps in flight; ${answers.length} answers during the stop; ended by ${errors.join(", ") || "the exit"}`,
  );
  // At least one full round (3 heartbeats and a read) during the stop; how many more depends
  // on the machine's load, so no count beyond that is asserted.
  assert.ok(answers.length >= 4, "heartbeats and reads kept being answered");
  assert.deepEqual([...new Set(answers)], [200], "every answer during the stop was a 200");
  assert.ok(stopMs < 60_000, "exit before TimeoutStopSec=60s");

  const store = new Store(db, Date.now());
  t.after(() => store.close());
  for (let i = 0; i < 20; i++) assert.equal(store.getSession(`r${i}`)?.state, "reaped", `r${i}`);
  for (let i = 0; i < 3; i++) assert.equal(store.getSession(`l${i}`)?.state, "live", `l${i} was reaped by the stop`);
  for (const e of hanging) assert.ok(isGone(e.pid));
  for (const e of live) assert.ok(!isGone(e.pid));
});

test("the grace budget forces the exit when a step will not reach a boundary; the journal stays consistent", async (t) => {
  const dir = tempDir(t);
  const { file, socket, db } = writeDaemonConfig(
    dir,
    `[reaper]
shutdown_grace_sec = 0.5
[profiles.default]
close_hook = "/shutdown"
step_timeout_sec = 60
allowed_roots = ["${dir}"]
`,
  );
  const first = await spawnDaemon(t, file, socket);
  const engine = await startEngine(t, ["--hang-shutdown"]);
  await callApi(socket, "POST", "/v1/sessions", { id: "stuck", engine: { pid: engine.pid }, ports: [engine.port] });
  await callApi(socket, "POST", "/v1/sessions/stuck/reap");
  const t0 = Date.now();
  first.proc.kill("SIGTERM");
  assert.equal(await first.exit, 1, "forced exit");
  const forcedMs = Date.now() - t0;
  t.diagnostic(`forced exit after ${forcedMs} ms (grace 0.5 s + 5 s margin)`);
  assert.ok(forcedMs >= 5_000, `forced too early (${forcedMs} ms)`);
  assert.match(first.output(), /graceful stop took too long: forced exit/);
  const store = new Store(db, Date.now());
  assert.equal(store.getSession("stuck")?.state, "reaping");
  assert.deepEqual(
    store.steps("stuck").map((s) => s.name),
    ["fence"],
  );
  store.close();
  assert.ok(!isGone(engine.pid));
});
