import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { FakeClock } from "../../src/clock.js";
import type { Reason } from "../../src/model/session.js";
import {
  isGone,
  isGoneProcess,
  portFree,
  startDaemon,
  startEngine,
  tempDir,
  testConfig,
  until,
  type Engine,
  type TestDaemon,
} from "../helpers.js";

type SessionJson = {
  id: string;
  state: string;
  reason: string;
  outcome: string;
  leftovers: unknown[];
  steps: { name: string; outcome: string }[];
};

const STEPS = ["fence", "close-environment", "terminate", "release-connections-and-ports", "remove-paths", "finish"];

/** The full proof that a session ended completely. */
async function assertReapedCompletely(d: TestDaemon, id: string, engine: Engine, reason: Reason): Promise<void> {
  const finished = await d.reaped(id);
  assert.equal(finished.outcome, "clean", JSON.stringify(finished.detail));
  // By identity: another test file may have been given a pid of these since (ns_last_pid tests).
  for (const p of engine.started) assert.ok(isGoneProcess(p), `process ${p.pid} still running`);
  assert.ok(await portFree(engine.port), `port ${engine.port} still taken`);
  assert.ok(engine.dir && !existsSync(engine.dir), `dir ${engine.dir} still exists`);

  const { status, body } = await d.api<SessionJson>("GET", `/v1/sessions/${id}`);
  assert.equal(status, 200);
  assert.equal(body.state, "reaped");
  assert.equal(body.reason, reason);
  assert.equal(body.outcome, "clean");
  assert.deepEqual(body.leftovers, []);
  assert.deepEqual(
    body.steps.map((s) => s.name),
    STEPS,
  );
  assert.ok(body.steps.every((s) => s.outcome === "ok"));

  const events = await d.api<{ events: { event: string; step: string | null; reason: string | null }[] }>(
    "GET",
    `/v1/sessions/${id}/events`,
  );
  const names = events.body.events.map((e) => e.event);
  assert.deepEqual(names, [
    "session.registered",
    reason === "closed" ? "session.closed" : "session.expired",
    "reap.started",
    ...STEPS.slice(0, -1).map(() => "reap.step"),
    "reap.finished",
  ]);
  assert.deepEqual(
    events.body.events.filter((e) => e.event === "reap.step").map((e) => e.step),
    STEPS.slice(0, -1),
  );
  // The same events reached the JSON log lines.
  const logged = d.lines
    .map((l) => JSON.parse(l) as { event?: string; sessionId?: string })
    .filter((l) => l.sessionId === id && l.event);
  assert.deepEqual(
    logged.map((l) => l.event),
    names,
  );
}

async function setup(t: Parameters<typeof startDaemon>[0], clock?: FakeClock, profile: Record<string, unknown> = {}) {
  const dir = tempDir(t);
  const d = await startDaemon(
    t,
    testConfig(dir, { profiles: { default: { close_hook: "/shutdown", ...profile } } }),
    clock,
  );
  return { dir, d };
}

async function register(d: TestDaemon, engine: Engine, extra: Record<string, unknown> = {}): Promise<string> {
  const res = await d.api<{ id: string }>("POST", "/v1/sessions", {
    engine: { pid: engine.pid },
    ports: [engine.port],
    paths: [engine.dir],
    ...extra,
  });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return res.body.id;
}

test("heartbeat_timeout: reaped at the deadline, not before", async (t) => {
  const clock = new FakeClock();
  const { dir, d } = await setup(t, clock);
  const engine = await startEngine(t, ["--fork", "2"], join(dir, "engine"));
  const id = await register(d, engine, { heartbeatTimeoutSec: 10 });

  clock.advance(6_000);
  assert.equal((await d.api("POST", `/v1/sessions/${id}/heartbeat`, { activity: "busy" })).status, 200);
  clock.advance(9_999); // 10 s after the heartbeat, less 1 ms
  assert.equal((await d.api<SessionJson>("GET", `/v1/sessions/${id}`)).body.state, "live");
  clock.advance(1);
  await assertReapedCompletely(d, id, engine, "heartbeat_timeout");
});

test("idle_timeout: idle heartbeats keep the session alive but do not move activity", async (t) => {
  const clock = new FakeClock();
  const { dir, d } = await setup(t, clock);
  const engine = await startEngine(t, [], join(dir, "engine"));
  const id = await register(d, engine, { heartbeatTimeoutSec: 10, idleTimeoutSec: 25 });
  for (let i = 0; i < 4; i++) {
    clock.advance(5_000);
    const hb = await d.api<{ expiresBy: string }>("POST", `/v1/sessions/${id}/heartbeat`, { activity: "idle" });
    assert.equal(hb.status, 200);
  }
  // 20 s in: heartbeats kept the heartbeat deadline at 30 s, activity stayed at 0 → idle at 25 s.
  assert.equal((await d.api<SessionJson>("GET", `/v1/sessions/${id}`)).body.state, "live");
  clock.advance(5_000);
  await assertReapedCompletely(d, id, engine, "idle_timeout");
});

test("max_lifetime: reaped however busy it is", async (t) => {
  const clock = new FakeClock();
  const { dir, d } = await setup(t, clock, { max_lifetime_sec: 3600 });
  const engine = await startEngine(t, [], join(dir, "engine"));
  const id = await register(d, engine, { heartbeatTimeoutSec: 10, maxLifetimeSec: 20 });
  for (let i = 0; i < 3; i++) {
    clock.advance(6_000);
    assert.equal((await d.api("POST", `/v1/sessions/${id}/heartbeat`)).status, 200);
  }
  clock.advance(2_000);
  await assertReapedCompletely(d, id, engine, "max_lifetime");
});

test("owner_gone: the client process dies, its engine is reaped", async (t) => {
  const { dir, d } = await setup(t);
  const owner = await startEngine(t);
  const engine = await startEngine(t, [], join(dir, "engine"));
  const id = await register(d, engine, { ownerPid: owner.pid });
  owner.child.kill("SIGKILL");
  await owner.exited;
  await assertReapedCompletely(d, id, engine, "owner_gone"); // through the owner's pidfd
});

test("engine_gone: an engine's exit is seen at once; its orphaned children are still cleaned", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir, { detect: { liveness_schedule: "* * * * * *" } }));
  const engine = await startEngine(t, ["--fork", "1"], join(dir, "engine"), { detached: true });
  const id = await register(d, engine);
  // The engine dies at once, before any liveness pass saw its tree; its child is
  // re-parented but lives on in the engine's process group.
  engine.child.kill("SIGKILL");
  await engine.exited;
  const finished = await d.reaped(id, 5_000);
  assert.equal(finished.reason, "engine_gone");
  await until(() => isGone(engine.children[0] as number), 3_000, "child gone");
  assert.ok(await portFree(engine.port));
  assert.ok(!existsSync(engine.dir as string));
  assert.equal(finished.outcome, "clean");
});

test("engine_gone: children of an engine that leads no group are known from the last liveness pass", async (t) => {
  const { dir, d } = await setup(t);
  const engine = await startEngine(t, ["--fork", "2"], join(dir, "engine"));
  const id = await register(d, engine);
  assert.equal(d.daemon.detector.checkLiveness(), 0); // snapshots the tree
  engine.child.kill("SIGKILL");
  await engine.exited;
  const finished = await d.reaped(id); // the held pidfd reports the exit at once
  assert.equal(finished.reason, "engine_gone");
  assert.equal(finished.outcome, "clean");
  for (const pid of engine.children) assert.ok(isGone(pid), `child ${pid} still running`);
  assert.ok(!existsSync(engine.dir as string));
});

test("closed: DELETE runs the full cleanup, with the close hook", async (t) => {
  const { dir, d } = await setup(t);
  const engine = await startEngine(t, [], join(dir, "engine"));
  const id = await register(d, engine);
  const res = await d.api<SessionJson>("DELETE", `/v1/sessions/${id}`);
  assert.equal(res.status, 202);
  assert.equal(res.body.state, "reaping");
  await assertReapedCompletely(d, id, engine, "closed");
  const steps = (
    await d.api<{ steps: { name: string; detail: { engineExited?: boolean } }[] }>("GET", `/v1/sessions/${id}`)
  ).body.steps;
  // The engine exited on its own through the close hook: terminate found nothing to signal.
  assert.equal(steps.find((s) => s.name === "close-environment")?.detail.engineExited, true);
  assert.equal((await d.api("DELETE", `/v1/sessions/${id}`)).status, 409);
});

test("forced: an operator's reap of an engine with a setsid grandchild", async (t) => {
  const { dir, d } = await setup(t);
  const engine = await startEngine(t, ["--setsid-grandchild", "--fork", "1"], join(dir, "engine"));
  assert.equal(engine.children.length, 3);
  const id = await register(d, engine);
  assert.equal((await d.api("POST", `/v1/sessions/${id}/reap`)).status, 202);
  await assertReapedCompletely(d, id, engine, "forced");
});
