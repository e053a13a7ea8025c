import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { spawn } from "node:child_process";
import { exited, sleeper, until } from "../helpers.js";
import { pino } from "pino";
import { FakeClock } from "../../src/clock.js";
import { Detector } from "../../src/detect/detector.js";
import { StallWatch } from "../../src/detect/stall.js";
import type { Admission } from "../../src/model/live-session.js";
import { LiveSessions } from "../../src/sessions/live.js";
import { identify, liveness } from "../../src/proc/identity.js";
import { readStat } from "../../src/proc/stat.js";
import type { ProcessIdentity, Reason } from "../../src/model/session.js";

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

/**
 * A registry and its detector on a fake clock; the expire callback records calls and fences
 * (removes) the session, unless `fence` says the store failed. `mayJudgeTime` is the
 * daemon's: a stall watch looks first, then the store's availability (`store.available`).
 */
function setup(t: Cleanup, opts: { start?: boolean; schedule?: string; cpuPercent?: number } = {}) {
  const clock = new CountingClock();
  const calls: Call[] = [];
  const registry = new LiveSessions(clock);
  const store = { available: true };
  const stalls: number[] = [];
  const stallWatch = new StallWatch(clock, 1000, (ms) => {
    stalls.push(ms);
    registry.resume();
  });
  const detector: Detector = new Detector({
    registry,
    clock,
    livenessSchedule: opts.schedule ?? SCHEDULE,
    ...(opts.cpuPercent === undefined ? {} : { livenessCpuPercent: opts.cpuPercent }),
    log,
    expire: (id, reason, detail) => {
      // The session's tree at expiry, kept out of deepEqual's sight (not enumerable).
      const call = { id, reason, detail };
      Object.defineProperty(call, "tree", { value: registry.get(id)?.tree.map((p) => p.pid), enumerable: false });
      calls.push(call);
      if (store.available) registry.remove(id); // what the daemon's fence does
    },
    mayJudgeTime: () => (stallWatch.check(), store.available),
  });
  t.after(() => detector.stop());
  t.after(() => stallWatch.stop());
  stallWatch.start();
  if (opts.start ?? true) detector.start();
  const engine = identify(sleeper(t).pid, "engine.pid", process.pid);
  const session = (id: string, over: Partial<Admission> = {}): Admission => ({
    id,
    engine,
    ownerPid: null,
    registeredBy: { uid: 0, admin: true, via: "unix" },
    heartbeatTimeoutSec: 30,
    idleTimeoutSec: 3600,
    maxLifetimeSec: 0,
    busyCpuPercent: null,
    ...over,
  });
  return { clock, calls, registry, detector, engine, session, store, stalls, stallWatch };
}

test("a session expires exactly when the clock reaches its deadline, not 1 ms before", (t) => {
  const { clock, calls, registry, detector, session } = setup(t);
  const t0 = clock.now();
  registry.admit(session("a"));
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
  const { clock, calls, registry, detector, session } = setup(t);
  registry.admit(session("idle", { heartbeatTimeoutSec: 100, idleTimeoutSec: 10 }));
  registry.admit(session("life", { heartbeatTimeoutSec: 100, idleTimeoutSec: 100, maxLifetimeSec: 20 }));
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
  const { clock, calls, registry, detector, session } = setup(t);
  const t0 = clock.now();
  for (const [id, sec] of [
    ["c", 30],
    ["a", 10],
    ["d", 40],
    ["b", 20],
    ["b2", 20],
  ] as const) {
    registry.admit(session(id, { heartbeatTimeoutSec: sec }));
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
  const { clock, calls, registry, detector, session } = setup(t);
  const t0 = clock.now();
  registry.admit(session("hb"));
  clock.advance(20 * S);
  const armed = clock.armed; // the stall watch's ticks arm timers of their own as time passes
  const s = registry.heartbeat("hb", false);
  assert.equal(s?.lastHeartbeatAt, t0 + 20 * S);
  assert.equal(s?.lastActivityAt, t0, "an idle heartbeat does not move activity");
  assert.equal(registry.dirtyCount, 1);
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
  const { clock, calls, registry, detector, session } = setup(t);
  const t0 = clock.now();
  registry.admit(session("busy", { heartbeatTimeoutSec: 10, idleTimeoutSec: 25 }));
  registry.admit(session("idle", { heartbeatTimeoutSec: 10, idleTimeoutSec: 25 }));
  for (let i = 1; i <= 4; i++) {
    clock.advance(8 * S);
    assert.equal(registry.heartbeat("busy", true)?.lastActivityAt, t0 + i * 8 * S);
    registry.heartbeat("idle", false);
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
  const { registry, detector, session } = setup(t);
  assert.equal(registry.heartbeat("nope", true), undefined);
  registry.admit(session("gone"));
  registry.remove("gone");
  assert.equal(registry.heartbeat("gone", true), undefined);
  detector.stop();
});

test("remove() prevents expiry", (t) => {
  const { clock, calls, registry, detector, session } = setup(t);
  registry.admit(session("r1"));
  registry.admit(session("r2", { heartbeatTimeoutSec: 31 }));
  clock.advance(10 * S);
  registry.remove("r1");
  assert.equal(registry.get("r1"), undefined);
  clock.advance(3600 * S);
  assert.deepEqual(
    calls.map((c) => c.id),
    ["r2"],
  );
  detector.stop();
});

test("nothing expires before start() or after stop()", (t) => {
  const { clock, calls, registry, detector, session } = setup(t, { start: false });
  const t0 = clock.now();
  registry.admit(session("early", { heartbeatTimeoutSec: 10 }));
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
  registry.admit(session("late", { heartbeatTimeoutSec: 10 }));
  detector.stop();
  clock.advance(3600 * S);
  assert.equal(calls.length, 1, "expired after stop()");
});

test("a session added with an earlier deadline than the armed one is still expired on time", (t) => {
  const { clock, calls, registry, detector, session } = setup(t);
  registry.admit(session("slow", { heartbeatTimeoutSec: 100 }));
  clock.advance(S);
  registry.admit(session("fast", { heartbeatTimeoutSec: 5 }));
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
  const { clock, calls, registry, detector, session } = setup(t, { start: false });
  registry.admit(session("x", { heartbeatTimeoutSec: 10 }));
  registry.admit(session("y", { heartbeatTimeoutSec: 20 }));
  clock.advance(15 * S);
  detector.expireDue();
  assert.deepEqual(
    calls.map((c) => c.id),
    ["x"],
  );
  detector.stop();
});

test("pidfd: an engine that exits is expired as engine_gone at once; a live one gets its tree refreshed", async (t) => {
  const { calls, registry, detector, session, engine } = setup(t, { start: false });
  const doomed = sleeper(t);
  const doomedId = identify(doomed.pid, "engine.pid", process.pid);
  registry.admit(session("alive"));
  registry.admit(session("doomed", { engine: doomedId }));

  assert.equal(detector.checkLiveness(), 0);
  assert.deepEqual(
    registry.get("alive")?.tree.map((p) => p.pid),
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

test("a storm of engine exits: every one seen through its pidfd, each tree's last look finds the child born since the last pass", async (t) => {
  const { calls, registry, session } = setup(t, { start: false });
  // Engines leading their own process group, each with a child in it (a worker forked after
  // registration, before any liveness pass): the child outlives its engine.
  const engines = Array.from({ length: 40 }, () => {
    const child = spawn("sh", ["-c", "sleep 600 & wait"], { stdio: "ignore", detached: true });
    t.after(() => {
      try {
        process.kill(-(child.pid as number), "SIGKILL");
      } catch {
        // gone
      }
    });
    return child;
  });
  const workers = new Map<number, number>();
  await until(
    () => {
      for (const e of engines) {
        const pid = e.pid as number;
        if (workers.has(pid)) continue;
        const kids = readFileSync(`/proc/${pid}/task/${pid}/children`, "latin1").trim();
        if (kids !== "" && readStat(Number(kids))?.comm === "sleep") workers.set(pid, Number(kids));
      }
      return workers.size === engines.length;
    },
    5_000,
    "every engine's worker started",
  );
  for (const [i, e] of engines.entries()) {
    const s = session(`e${i}`, { engine: identify(e.pid as number, "engine.pid", process.pid) });
    registry.admit(s);
  }
  const known = engines.flatMap((_, i) => registry.get(`e${i}`)?.tree.map((p) => p.pid) ?? []);
  assert.ok(![...workers.values()].some((w) => known.includes(w)), "no worker is known before the exits");
  const seen = calls.length;
  for (const e of engines) e.kill("SIGKILL");
  await until(() => calls.length === seen + engines.length, 10_000, "every exit seen through its pidfd");
  for (const [i, e] of engines.entries()) {
    const call = calls.find((c) => c.id === `e${i}`);
    assert.deepEqual(call, { id: `e${i}`, reason: "engine_gone", detail: { pid: e.pid, detectedBy: "pidfd" } });
    const tree = (call as unknown as { tree: number[] }).tree;
    assert.deepEqual(tree, [workers.get(e.pid as number)], `e${i}: its worker, re-parented, is in its tree`);
    assert.equal(liveness(identify(workers.get(e.pid as number) as number, "w", process.pid)), "alive");
  }
});

test("owner_gone: a wrong start time is found by the liveness pass (never watched); an exit through the pidfd", async (t) => {
  const { calls, registry, detector, session } = setup(t, { start: false });
  const owner = sleeper(t);
  const ownerId = identify(owner.pid, "ownerPid", process.pid);
  const reused: ProcessIdentity = { ...ownerId, startTime: ownerId.startTime + 1 };
  registry.admit(session("owned", { ownerPid: ownerId }));
  registry.admit(session("reused", { ownerPid: reused }));
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
  const { calls, registry, detector, session, engine } = setup(t, { schedule: "* * * * * *" });
  registry.admit(session("reused", { engine: { ...engine, startTime: engine.startTime + 1 } }));
  await until(() => calls.length === 1, 3_000, "scheduled liveness pass");
  assert.deepEqual(calls, [
    { id: "reused", reason: "engine_gone", detail: { pid: engine.pid, detectedBy: "liveness" } },
  ]);
  detector.stop();
});

test("between walks of /proc (spaced by liveness_cpu_percent) a process no pidfd watches is still checked every tick", async (t) => {
  // A share so small that after the first walk no other comes during the test.
  const { calls, registry, detector, session, engine } = setup(t, { schedule: "* * * * * *", cpuPercent: 1e-9 });
  registry.admit(session("first"));
  await new Promise((r) => setTimeout(r, 2_200)); // the first tick's walk has run
  assert.deepEqual(calls, []);
  // An identity no pidfd can watch (its start time is not the process's): only a tick's check finds it.
  registry.admit(session("reused", { engine: { ...engine, startTime: engine.startTime + 1 } }));
  await until(() => calls.length === 1, 3_000, "the next tick's check");
  assert.deepEqual(calls, [
    { id: "reused", reason: "engine_gone", detail: { pid: engine.pid, detectedBy: "liveness" } },
  ]);
  detector.stop();
});

test("a wall-clock step in either direction changes no expiry (deadlines run on the monotonic clock)", (t) => {
  const { clock, calls, registry, session } = setup(t);
  const t0 = clock.now();
  registry.admit(session("fwd", { heartbeatTimeoutSec: 10 }));
  registry.admit(session("back", { heartbeatTimeoutSec: 20 }));
  clock.stepWall(3600 * S); // NTP, date -s: an hour forward
  clock.advance(5 * S);
  assert.equal(calls.length, 0, "a forward step expired a session");
  clock.stepWall(-7200 * S); // and two hours back
  clock.advance(5 * S - 1);
  assert.equal(calls.length, 0);
  clock.advance(1);
  assert.deepEqual(
    calls.map((c) => [c.id, c.detail.lagMs]),
    [["fwd", 0]],
  );
  // The record's deadline is on the wall clock as it reads now (an hour behind t0).
  assert.equal(calls[0]?.detail.deadline, new Date(t0 - 3600 * S + 10 * S).toISOString());
  clock.advance(10 * S);
  assert.deepEqual(
    calls.map((c) => c.id),
    ["fwd", "back"],
  );
  // The displayed deadline follows the wall clock; the monotonic one did not move.
  const s = registry.admit(session("shown", { heartbeatTimeoutSec: 30 }));
  const at = registry.deadline(s).at;
  clock.stepWall(-600 * S);
  assert.equal(registry.deadline(s).at, at);
  assert.equal(registry.wallDeadline(s), clock.now() + 30 * S);
});

test("a stall (the loop did not run) is downtime: nothing expires on resume, every timeout restarts", (t) => {
  const { clock, calls, registry, session, stalls } = setup(t);
  for (let round = 1; round <= 3; round++) {
    const id = `hb${round}`;
    registry.admit(session(id, { heartbeatTimeoutSec: 3 }));
    clock.advance(2 * S);
    registry.heartbeat(id, false);
    clock.stall(10 * S); // SIGSTOP for 10 s: the heartbeats sent meanwhile wait in the socket
    assert.equal(calls.length, 0, `round ${round}: reaped on resume`);
    assert.equal(stalls.length, round);
    assert.ok((stalls[round - 1] ?? 0) >= 10 * S, String(stalls[round - 1]));
    // The queued heartbeat is read now; the session lives on as long as it heartbeats.
    registry.heartbeat(id, false);
    clock.advance(2 * S);
    registry.heartbeat(id, false);
    assert.equal(calls.length, 0);
    registry.remove(id);
  }
  // A client that stops heartbeating after a stall is reaped one full timeout after the resume.
  registry.admit(session("quiet", { heartbeatTimeoutSec: 3 }));
  clock.stall(5 * S);
  clock.advance(3 * S - 1);
  assert.equal(calls.length, 0);
  clock.advance(1);
  assert.deepEqual(
    calls.map((c) => [c.id, c.reason, c.detail.lagMs]),
    [["quiet", "heartbeat_timeout", 0]],
  );
  // Short gaps are not stalls.
  clock.advance(900);
  assert.equal(stalls.length, 4);
});

test("while time may not be judged (the store cannot commit) nothing expires; after, the timeouts restart", (t) => {
  const { clock, calls, registry, detector, session, store } = setup(t);
  registry.admit(session("a", { heartbeatTimeoutSec: 5 }));
  clock.advance(4 * S);
  store.available = false; // a sqlite3 process holds BEGIN EXCLUSIVE
  clock.advance(60 * S);
  assert.equal(calls.length, 0);
  // The store commits again: the restart rule from now, the timer armed again.
  store.available = true;
  registry.resume();
  detector.rearm();
  clock.advance(5 * S - 1);
  assert.equal(calls.length, 0);
  clock.advance(1);
  assert.deepEqual(
    calls.map((c) => [c.id, c.reason]),
    [["a", "heartbeat_timeout"]],
  );
});
