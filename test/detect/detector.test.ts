import assert from "node:assert/strict";
import { test } from "node:test";
import { exited, sleeper, until } from "../helpers.js";
import { pino } from "pino";
import { FakeClock } from "../../src/clock.js";
import { Detector, type LiveSession } from "../../src/detect/detector.js";
import { identify } from "../../src/proc/identity.js";
import type { ProcessIdentity, Reason } from "../../src/sessions/types.js";

const S = 1000;
const SCHEDULE = "*/2 * * * * *";
const log = pino({ level: "silent" });

type Cleanup = { after: (fn: () => void) => void };

/** A FakeClock that counts the timers armed on it. */
class CountingClock extends FakeClock {
  armed = 0;
  override at(at: number, fn: () => void): () => void {
    this.armed++;
    return super.at(at, fn);
  }
}

interface Call {
  id: string;
  reason: Reason;
  detail: Record<string, unknown>;
}

/** A detector on a fake clock whose expire callback records calls and fences (removes) the session. */
function setup(t: Cleanup, opts: { start?: boolean; schedule?: string } = {}) {
  const clock = new CountingClock();
  const calls: Call[] = [];
  const detector: Detector = new Detector(clock, opts.schedule ?? SCHEDULE, log, (id, reason, detail) => {
    calls.push({ id, reason, detail });
    detector.remove(id); // what the daemon's fence does
  });
  t.after(() => detector.stop());
  if (opts.start ?? true) detector.start();
  const engine = identify(sleeper(t).pid, "engine.pid", process.pid);
  const session = (id: string, over: Partial<LiveSession> = {}): LiveSession => ({
    id,
    engine,
    ownerPid: null,
    registeredBy: { uid: 0, admin: true, via: "unix" },
    dirty: false,
    tree: [],
    createdAt: clock.now(),
    lastHeartbeatAt: clock.now(),
    lastActivityAt: clock.now(),
    heartbeatTimeoutSec: 30,
    idleTimeoutSec: 3600,
    maxLifetimeSec: 0,
    recoveredAt: 0,
    busyCpuPercent: null,
    ...over,
  });
  return { clock, calls, detector, engine, session };
}

test("a session expires exactly when the clock reaches its deadline, not 1 ms before", (t) => {
  const { clock, calls, detector, session } = setup(t);
  const t0 = clock.now();
  detector.add(session("a"));
  clock.advance(30 * S - 1);
  assert.equal(calls.length, 0);
  clock.advance(1);
  assert.deepEqual(calls, [
    { id: "a", reason: "heartbeat_timeout", detail: { deadline: new Date(t0 + 30 * S).toISOString(), lagMs: 0 } },
  ]);
  clock.advance(3600 * S);
  assert.equal(calls.length, 1, "expired twice");
  detector.stop();
});

test("idle and max-lifetime deadlines fire with their reason", (t) => {
  const { clock, calls, detector, session } = setup(t);
  detector.add(session("idle", { heartbeatTimeoutSec: 100, idleTimeoutSec: 10 }));
  detector.add(session("life", { heartbeatTimeoutSec: 100, idleTimeoutSec: 100, maxLifetimeSec: 20 }));
  clock.advance(10 * S - 1);
  assert.equal(calls.length, 0);
  clock.advance(1);
  assert.deepEqual(
    calls.map((c) => [c.id, c.reason]),
    [["idle", "idle_timeout"]],
  );
  clock.advance(10 * S - 1);
  assert.equal(calls.length, 1);
  clock.advance(1);
  assert.deepEqual(
    calls.map((c) => [c.id, c.reason]),
    [
      ["idle", "idle_timeout"],
      ["life", "max_lifetime"],
    ],
  );
  detector.stop();
});

test("several sessions expire in deadline order, each on time", (t) => {
  const { clock, calls, detector, session } = setup(t);
  const t0 = clock.now();
  for (const [id, sec] of [
    ["c", 30],
    ["a", 10],
    ["d", 40],
    ["b", 20],
    ["b2", 20],
  ] as const) {
    detector.add(session(id, { heartbeatTimeoutSec: sec }));
  }
  clock.advance(3600 * S);
  // Equal deadlines (b, b2) may expire in either order.
  assert.deepEqual(
    calls.map((c) => (c.id === "b2" ? "b" : c.id)),
    ["a", "b", "b", "c", "d"],
  );
  assert.ok(calls.every((c) => c.detail.lagMs === 0));
  assert.equal(calls[0]?.detail.deadline, new Date(t0 + 10 * S).toISOString());
  detector.stop();
});

test("heartbeats push expiry later without touching the heap or arming timers", (t) => {
  const { clock, calls, detector, session } = setup(t);
  const t0 = clock.now();
  detector.add(session("hb"));
  const armed = clock.armed;

  clock.advance(20 * S);
  const s = detector.heartbeat("hb", false);
  assert.equal(s?.lastHeartbeatAt, t0 + 20 * S);
  assert.equal(s?.lastActivityAt, t0, "an idle heartbeat does not move activity");
  assert.equal(s?.dirty, true);
  assert.equal(clock.armed, armed, "a heartbeat armed a timer");

  // The original deadline passes: the entry is re-queued at the new deadline, nothing expires.
  clock.advance(10 * S);
  assert.equal(calls.length, 0);
  clock.advance(20 * S - 1); // t0 + 50 s - 1 ms
  assert.equal(calls.length, 0);
  clock.advance(1);
  assert.deepEqual(calls, [
    { id: "hb", reason: "heartbeat_timeout", detail: { deadline: new Date(t0 + 50 * S).toISOString(), lagMs: 0 } },
  ]);
  detector.stop();
});

test("a busy heartbeat moves activity too; an idle one lets the idle timeout fire", (t) => {
  const { clock, calls, detector, session } = setup(t);
  const t0 = clock.now();
  detector.add(session("busy", { heartbeatTimeoutSec: 10, idleTimeoutSec: 25 }));
  detector.add(session("idle", { heartbeatTimeoutSec: 10, idleTimeoutSec: 25 }));
  for (let i = 1; i <= 4; i++) {
    clock.advance(8 * S);
    assert.equal(detector.heartbeat("busy", true)?.lastActivityAt, t0 + i * 8 * S);
    detector.heartbeat("idle", false);
  }
  // t0 + 32 s: "idle" had no activity since t0, so it expired at t0 + 25 s.
  assert.deepEqual(calls, [
    { id: "idle", reason: "idle_timeout", detail: { deadline: new Date(t0 + 25 * S).toISOString(), lagMs: 0 } },
  ]);
  clock.advance(10 * S);
  assert.deepEqual(
    calls.map((c) => [c.id, c.reason]),
    [
      ["idle", "idle_timeout"],
      ["busy", "heartbeat_timeout"],
    ],
  );
  detector.stop();
});

test("a heartbeat for an unknown or removed session is ignored", (t) => {
  const { detector, session } = setup(t);
  assert.equal(detector.heartbeat("nope", true), undefined);
  detector.add(session("gone"));
  detector.remove("gone");
  assert.equal(detector.heartbeat("gone", true), undefined);
  detector.stop();
});

test("remove() prevents expiry", (t) => {
  const { clock, calls, detector, session } = setup(t);
  detector.add(session("r1"));
  detector.add(session("r2", { heartbeatTimeoutSec: 31 }));
  clock.advance(10 * S);
  detector.remove("r1");
  assert.equal(detector.live.has("r1"), false);
  clock.advance(3600 * S);
  assert.deepEqual(
    calls.map((c) => c.id),
    ["r2"],
  );
  detector.stop();
});

test("nothing expires before start() or after stop()", (t) => {
  const { clock, calls, detector, session } = setup(t, { start: false });
  const t0 = clock.now();
  detector.add(session("early", { heartbeatTimeoutSec: 10 }));
  clock.advance(20 * S);
  assert.equal(calls.length, 0, "expired before start()");
  detector.start();
  clock.advance(0);
  assert.deepEqual(calls, [
    {
      id: "early",
      reason: "heartbeat_timeout",
      detail: { deadline: new Date(t0 + 10 * S).toISOString(), lagMs: 10 * S },
    },
  ]);
  detector.add(session("late", { heartbeatTimeoutSec: 10 }));
  detector.stop();
  clock.advance(3600 * S);
  assert.equal(calls.length, 1, "expired after stop()");
});

test("a session added with an earlier deadline than the armed one is still expired on time", (t) => {
  const { clock, calls, detector, session } = setup(t);
  detector.add(session("slow", { heartbeatTimeoutSec: 100 }));
  clock.advance(S);
  detector.add(session("fast", { heartbeatTimeoutSec: 5 }));
  clock.advance(5 * S - 1);
  assert.equal(calls.length, 0);
  clock.advance(1);
  assert.deepEqual(
    calls.map((c) => c.id),
    ["fast"],
  );
  detector.stop();
});

test("expireDue() directly: only due sessions expire", (t) => {
  const { clock, calls, detector, session } = setup(t, { start: false });
  detector.add(session("x", { heartbeatTimeoutSec: 10 }));
  detector.add(session("y", { heartbeatTimeoutSec: 20 }));
  clock.advance(15 * S);
  detector.expireDue();
  assert.deepEqual(
    calls.map((c) => c.id),
    ["x"],
  );
  detector.stop();
});

test("pidfd: an engine that exits is expired as engine_gone at once; a live one gets its tree refreshed", async (t) => {
  const { calls, detector, session, engine } = setup(t, { start: false });
  const doomed = sleeper(t);
  const doomedId = identify(doomed.pid, "engine.pid", process.pid);
  detector.add(session("alive"));
  detector.add(session("doomed", { engine: doomedId }));

  assert.equal(detector.checkLiveness(), 0);
  assert.deepEqual(
    detector.live.get("alive")?.tree.map((p) => p.pid),
    [engine.pid],
  );

  doomed.kill("SIGKILL");
  await exited(doomed);
  // Woken by the held pidfd, without any liveness pass.
  await until(() => calls.length === 1, 5_000, "exit seen through the pidfd");
  assert.deepEqual(calls, [{ id: "doomed", reason: "engine_gone", detail: { pid: doomed.pid, detectedBy: "pidfd" } }]);
  assert.equal(detector.checkLiveness(), 0, "expired twice");
  detector.stop();
});

test("owner_gone: a wrong start time is found by the liveness pass (never watched); an exit through the pidfd", async (t) => {
  const { calls, detector, session } = setup(t, { start: false });
  const owner = sleeper(t);
  const ownerId = identify(owner.pid, "ownerPid", process.pid);
  const reused: ProcessIdentity = { ...ownerId, startTime: ownerId.startTime + 1 };
  detector.add(session("owned", { ownerPid: ownerId }));
  detector.add(session("reused", { ownerPid: reused }));
  assert.equal(detector.checkLiveness(), 1);
  owner.kill("SIGKILL");
  await exited(owner);
  await until(() => calls.length === 2, 5_000, "exit seen through the pidfd");
  assert.equal(detector.checkLiveness(), 0);
  assert.deepEqual(calls, [
    { id: "reused", reason: "owner_gone", detail: { pid: owner.pid, detectedBy: "liveness" } },
    { id: "owned", reason: "owner_gone", detail: { pid: owner.pid, detectedBy: "pidfd" } },
  ]);
  detector.stop();
});

test("the croner schedule runs the liveness pass on its own (what a pidfd cannot see: a reused pid)", async (t) => {
  const { calls, detector, session, engine } = setup(t, { schedule: "* * * * * *" });
  detector.add(session("reused", { engine: { ...engine, startTime: engine.startTime + 1 } }));
  await until(() => calls.length === 1, 3_000, "scheduled liveness pass");
  assert.deepEqual(calls, [
    { id: "reused", reason: "engine_gone", detail: { pid: engine.pid, detectedBy: "liveness" } },
  ]);
  detector.stop();
});
