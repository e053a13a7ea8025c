import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { test } from "node:test";
import pidusage from "pidusage";
import { pino } from "pino";
import { FakeClock } from "../../src/clock.js";
import { Detector } from "../../src/detect/detector.js";
import type { Admission } from "../../src/model/live-session.js";
import { LiveSessions } from "../../src/sessions/live.js";
import { identify } from "../../src/proc/identity.js";
import { readStat } from "../../src/proc/stat.js";
import { childrenOf } from "../../src/proc/tree.js";
import type { ProcessIdentity } from "../../src/model/session.js";
import { sleeper, startDaemon, tempDir, testConfig } from "../helpers.js";

const BURN = ["-e", "for (;;) {}"];
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Waits until the process has used `ms` of CPU: past its start-up, and spinning. */
async function burningFor(pid: number, ms: number): Promise<void> {
  const end = Date.now() + 10_000;
  while ((await pidusage(pid)).ctime < ms) {
    if (Date.now() > end) throw new Error(`pid ${pid} does not burn CPU`);
    await sleep(50);
  }
}

type SessionJson = { state: string; reason: string | null; createdAt: string; lastActivityAt: string };

test("busy_cpu_percent: a computing engine is not culled as idle; an idle one in the same profile is", async (t) => {
  const d = await startDaemon(
    t,
    testConfig(tempDir(t), {
      detect: { liveness_schedule: "* * * * * *" },
      // A low threshold and a 3 s timeout: the burner needs only a twentieth of a core, so the
      // suite's other files (run alongside) cannot starve it below the threshold.
      profiles: { compute: { idle_timeout_sec: 3, busy_cpu_percent: 5 } },
    }),
  );
  const burner = sleeper(t, process.execPath, BURN);
  const idle = sleeper(t);
  await burningFor(burner.pid, 100);
  for (const [id, pid] of [
    ["busy", burner.pid],
    ["idle", idle.pid],
  ] as const) {
    const res = await d.api("POST", "/v1/sessions", { id, profile: "compute", engine: { pid } });
    assert.equal(res.status, 201, JSON.stringify(res.body));
  }
  const registeredAt = Date.now();

  const idleReaped = await d.reaped("idle", 8000);
  assert.equal(idleReaped.reason, "idle_timeout");

  // Well past the 3 s idle timeout: the liveness passes kept moving the busy engine's activity.
  await sleep(Math.max(0, registeredAt + 5000 - Date.now()));
  const busy = await d.api<SessionJson>("GET", "/v1/sessions/busy");
  assert.equal(busy.body.state, "live", JSON.stringify(busy.body));
  assert.ok(Date.parse(busy.body.lastActivityAt) > Date.parse(busy.body.createdAt) + 1000, busy.body.lastActivityAt);
  assert.equal((await d.api("DELETE", "/v1/sessions/busy")).status, 202);
  assert.equal((await d.reaped("busy")).reason, "closed");
});

/** A detector on a fake clock, never started: no timer, no walk of /proc; tests call sampleCpu. */
function unstartedDetector(t: { after: (fn: () => void) => void }): {
  clock: FakeClock;
  registry: LiveSessions;
  detector: Detector;
} {
  const clock = new FakeClock();
  const registry = new LiveSessions(clock);
  const detector = new Detector({
    registry,
    clock,
    livenessSchedule: "*/2 * * * * *",
    log: pino({ level: "silent" }),
    expire: () => undefined,
  });
  t.after(() => detector.close());
  return { clock, registry, detector };
}

test("sampleCpu: a baseline first, then activity moves only for an engine above its threshold", async (t) => {
  const { clock, registry, detector } = unstartedDetector(t);
  const session = (id: string, pid: number, busyCpuPercent: number | null): Admission => ({
    id,
    engine: identify(pid, "engine.pid", process.pid),
    ownerPid: null,
    registeredBy: { uid: 0, admin: true, via: "unix" },
    heartbeatTimeoutSec: 30,
    idleTimeoutSec: 60,
    maxLifetimeSec: 0,
    busyCpuPercent,
  });
  // One burning process: "greedy" watches the same engine with a threshold it cannot reach.
  const burning = sleeper(t, process.execPath, BURN).pid;
  await burningFor(burning, 200);
  const t0 = clock.now();
  const burner = registry.admit(session("burner", burning, 20));
  const quiet = registry.admit(session("quiet", sleeper(t).pid, 20));
  const unwatched = registry.admit(session("unwatched", sleeper(t).pid, null));
  const greedy = registry.admit(session("greedy", burning, 100 * 64));
  await detector.sampleCpu(); // may race add()'s own baseline: either way nobody is judged yet
  assert.equal(burner.lastActivityAt, t0);
  assert.ok(burner.cpuSample !== undefined && quiet.cpuSample !== undefined);
  assert.equal(unwatched.cpuSample, undefined, "a session without a threshold is never sampled");
  assert.ok(greedy.cpuSample !== undefined);

  await sleep(700);
  clock.advance(5000);
  assert.equal(await detector.sampleCpu(), 1);
  assert.equal(burner.lastActivityAt, t0 + 5000);
  assert.equal(quiet.lastActivityAt, t0);
  assert.deepEqual(
    registry.takeDirty().map((w) => [w.id, w.lastActivityAt]),
    [["burner", t0 + 5000]],
    "only the busy engine's record is to be written",
  );
  assert.equal(greedy.lastActivityAt, t0);
  assert.equal(unwatched.lastActivityAt, t0);

  // Too soon after the last sample to judge: nothing moves, the baseline is kept.
  clock.advance(1000);
  const before = burner.cpuSample;
  assert.equal(await detector.sampleCpu(), 0);
  assert.equal(burner.cpuSample, before);

  // A fenced session is no longer sampled.
  registry.remove("burner");
  await sleep(700);
  clock.advance(1000);
  assert.equal(await detector.sampleCpu(), 0);
  assert.equal(burner.lastActivityAt, t0 + 5000);
});

test("sampleCpu, uncontained: the CPU of a process the engine forked after the last walk counts, without a walk", async (t) => {
  const { clock, registry, detector } = unstartedDetector(t);
  // An engine (a shell) that forks its worker later, as a postmaster forks a backend per query.
  // The detector is never started: no walk of /proc refreshes the session's tree.
  const engine = spawn("sh", ["-c", `sleep 0.5; "${process.execPath}" -e 'for (;;) {}' & wait`], {
    stdio: "ignore",
    detached: true,
  });
  t.after(() => {
    try {
      process.kill(-(engine.pid as number), "SIGKILL");
    } catch {
      // gone
    }
  });
  const engineId = identify(engine.pid as number, "engine.pid", process.pid);
  const s = registry.admit({
    id: "forks-later",
    engine: engineId,
    ownerPid: null,
    registeredBy: { uid: 0, admin: true, via: "unix" },
    heartbeatTimeoutSec: 30,
    // Judged 5 s after registration: within 10 s of this idle deadline, where trees are looked at.
    idleTimeoutSec: 12,
    maxLifetimeSec: 0,
    busyCpuPercent: 20,
  });
  const t0 = clock.now();
  await detector.sampleCpu(); // the baseline: the shell (and its sleep), no worker yet
  const worker = await waitForChild(engineId);
  await burningFor(worker, 200);
  await sleep(300);
  clock.advance(5000);
  assert.equal(await detector.sampleCpu(), 1, "the worker's CPU made the session busy");
  assert.equal(s.lastActivityAt, t0 + 5000);
  assert.ok(
    s.tree.some((p) => p.pid === worker),
    `the worker ${worker} joined the tree: ${JSON.stringify(s.tree)}`,
  );
});

/** The child of `engine` that runs node (the project's childrenOf), once it has one. */
async function waitForChild(engine: ProcessIdentity): Promise<number> {
  const end = Date.now() + 10_000;
  for (;;) {
    // The shell's children: its `sleep` first, then the worker (node).
    const worker = childrenOf(engine).find((c) => readStat(c.pid)?.comm === "node");
    if (worker !== undefined) return worker.pid;
    if (Date.now() > end) throw new Error(`pid ${engine.pid} forked no worker`);
    await sleep(20);
  }
}
