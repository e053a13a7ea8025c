import assert from "node:assert/strict";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import type { SessionMembers } from "../../src/cleanup/step.js";
import { verifyGone } from "../../src/cleanup/verify.js";
import { identify } from "../../src/proc/identity.js";
import { inetSockets, socketInodes, socketSnapshot, type SocketSnapshot } from "../../src/proc/sockets.js";
import { readStat, ticksSinceBoot } from "../../src/proc/stat.js";
import type { ProcessIdentity, Session, StepName, StepResult } from "../../src/sessions/types.js";
import { isGone, startEngine, tempDir, until } from "../helpers.js";

// The soak's one `partial` in 4,500 churned sessions: an engine-lite that was not the
// session's held its registered port at verification. The session's engine was gone; a newer
// engine had been given the same ephemeral port by the kernel in the moment between the port
// step and the verification. These run the verification directly on that situation.

const complete: SessionMembers = { members: () => [], exitedCpuSec: () => 0, complete: () => true };
const incomplete: SessionMembers = { ...complete, complete: () => false };

function sessionOf(engine: ProcessIdentity, port: number): Session {
  return {
    id: "reused",
    profile: "default",
    owner: null,
    engine,
    ownerPid: null,
    ports: [port],
    paths: [],
    labels: {},
    heartbeatTimeoutSec: 30,
    idleTimeoutSec: 30,
    maxLifetimeSec: 0,
    createdAt: 0,
    lastHeartbeatAt: 0,
    lastActivityAt: 0,
    deadline: null,
    state: "reaping",
    reason: "forced",
    outcome: null,
    leftovers: [],
    reapStartedAt: 0,
    reapedAt: null,
    reapAttempts: 1,
    registeredBy: { uid: 0, admin: true, via: "unix" },
    containment: null,
    tracking: "lineage",
    damage: [],
  };
}

function journalOf(engine: ProcessIdentity, sockets: SocketSnapshot, endedTicks?: number) {
  const entry = (name: StepName, detail: StepResult["detail"]): [StepName, StepResult] => [
    name,
    { name, outcome: "ok", startedAt: 0, durationMs: 0, detail },
  ];
  const processes = [{ pid: engine.pid, startTime: engine.startTime }];
  return new Map([
    entry("close-environment", { processes: [engine], sockets }),
    entry("terminate", { processes, ...(endedTicks === undefined ? {} : { endedTicks }) }),
  ]);
}

/**
 * An engine with a port, its socket snapshot, then its end (SIGKILL, gone) and the tick that
 * ended it; then a newcomer, another process started after that tick, listening on the same
 * port number.
 */
async function portTakenAfter(t: TestContext) {
  const dir = tempDir(t);
  const engine = await startEngine(t, [], join(dir, "engine"));
  const id = identify(engine.pid, "engine.pid", process.pid);
  const sockets = socketSnapshot([engine.pid]);
  assert.ok(sockets.listening.some((s) => s.port === engine.port));
  engine.child.kill("SIGKILL");
  await engine.exited;
  await until(() => isGone(engine.pid), 5_000, "engine gone");
  const endedTicks = ticksSinceBoot();
  assert.ok(endedTicks !== null);
  // A clock tick is 10 ms: the newcomer starts in a later one.
  await new Promise((r) => setTimeout(r, 30));
  const newcomer = await startEngine(t, ["--port", String(engine.port)]);
  assert.equal(newcomer.port, engine.port, "the newcomer took the freed port");
  const newcomerStart = readStat(newcomer.pid)?.startTime;
  assert.ok(newcomerStart !== undefined && newcomerStart > endedTicks);
  return { id, port: engine.port, sockets, endedTicks, newcomer };
}

test("a newcomer that took the port after terminate ended, outside the session: reported as a reuse, not a leftover", async (t) => {
  const { id, port, sockets, endedTicks, newcomer } = await portTakenAfter(t);
  const v = await verifyGone(sessionOf(id, port), journalOf(id, sockets, endedTicks), complete, process.pid);
  assert.deepEqual(v.leftovers, []);
  assert.deepEqual(
    v.reused?.map((r) => [r.pid, r.why]),
    [[newcomer.pid, `port ${port} (tcp LISTEN)`]],
  );
  assert.ok(v.verified.includes("ports"));
  assert.ok(!isGone(newcomer.pid), "verification never signals");
});

test("the same newcomer stays a leftover whenever identity cannot tell it apart", async (t) => {
  const { id, port, sockets, endedTicks, newcomer } = await portTakenAfter(t);
  const leftoverPids = async (journal: ReturnType<typeof journalOf>, lineage: SessionMembers) =>
    (await verifyGone(sessionOf(id, port), journal, lineage, process.pid)).leftovers.map((l) => l.pid);

  // Lineage lost events (or never ran): a process it does not name may still be the engine's.
  assert.deepEqual(await leftoverPids(journalOf(id, sockets, endedTicks), incomplete), [newcomer.pid]);
  // An older journal, without terminate's end tick.
  assert.deepEqual(await leftoverPids(journalOf(id, sockets), complete), [newcomer.pid]);
  // Terminate ended after the newcomer started: it held the port while the session ran.
  const late = ticksSinceBoot();
  assert.ok(late !== null);
  assert.deepEqual(await leftoverPids(journalOf(id, sockets, late), complete), [newcomer.pid]);
  // The socket it holds is the engine's own (one it inherited or was passed).
  const held = socketInodes(newcomer.pid);
  const listener = inetSockets("self", new Set([port])).find((s) => s.state === "LISTEN" && held.has(s.inode));
  assert.ok(listener, "the newcomer's listening socket");
  const passed: SocketSnapshot = {
    ...sockets,
    listening: sockets.listening.map((s) => ({ ...s, inode: listener.inode })),
  };
  assert.deepEqual(await leftoverPids(journalOf(id, passed, endedTicks), complete), [newcomer.pid]);
  // A snapshot that left sockets out cannot say which sockets were the engine's.
  const capped: SocketSnapshot = { ...sockets, omitted: { listening: 1, established: 0, unix: 0 } };
  assert.deepEqual(await leftoverPids(journalOf(id, capped, endedTicks), complete), [newcomer.pid]);
});
