import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import type { SessionMembers } from "../../src/cleanup/step.js";
import { verifyGone } from "../../src/cleanup/verify.js";
import { identify } from "../../src/proc/identity.js";
import { inetSockets, socketInodes, socketSnapshot, type SocketSnapshot } from "../../src/proc/sockets.js";
import {
  SESSION_COOKIE,
  type ProcessIdentity,
  type Session,
  type StepName,
  type StepResult,
} from "../../src/model/session.js";
import { isGone, portFree, reapingSession, startEngine, tempDir, until, type Engine } from "../helpers.js";

// The soak's `partial`s (one in 4,500 churned sessions, six in 9,000): an engine-lite that was
// not the session's held its registered port at the port step or the verification. The
// session's engine was gone; a newer engine had been given the same ephemeral port by the
// kernel meanwhile. These run the verification directly on that situation.

const complete: SessionMembers = { members: () => [], exitedCpuSec: () => 0, complete: () => true };
const incomplete: SessionMembers = { ...complete, complete: () => false };

/** The session as the reap has it: tracked by lineage (complete or not is the test's choice). */
const sessionOf = (engine: ProcessIdentity, port: number): Session => ({
  ...reapingSession("reused", engine, [port]),
  tracking: "lineage",
});

/** The journal a reap has by verification: close-environment's snapshot (and what was on the port), terminate's list. */
function journalOf(engine: ProcessIdentity, sockets: SocketSnapshot, portInodes: readonly number[] | undefined) {
  const entry = (name: StepName, detail: StepResult["detail"]): [StepName, StepResult] => [
    name,
    { name, outcome: "ok", startedAt: 0, durationMs: 0, detail },
  ];
  return new Map([
    entry("close-environment", { processes: [engine], sockets, ...(portInodes === undefined ? {} : { portInodes }) }),
    entry("terminate", { processes: [{ pid: engine.pid, startTime: engine.startTime }] }),
  ]);
}

/**
 * An engine with a port (an ephemeral one, or `fixed`), its socket snapshot and what was on
 * the port then, its end (SIGKILL, gone); then a newcomer, another process (with the
 * session's cookie in its environment if `cookie`), listening on the same address and port.
 */
async function portTakenAfter(t: TestContext, opts: { fixed?: number; cookie?: boolean } = {}) {
  const dir = tempDir(t);
  const engine = await startEngine(
    t,
    opts.fixed === undefined ? [] : ["--port", String(opts.fixed)],
    join(dir, "engine"),
  );
  const id = identify(engine.pid, "engine.pid", process.pid);
  const sockets = socketSnapshot([engine.pid]);
  assert.ok(sockets.listening.some((s) => s.port === engine.port && s.address === "127.0.0.1"));
  const portInodes = inetSockets("self", new Set([engine.port])).map((s) => s.inode);
  engine.child.kill("SIGKILL");
  await engine.exited;
  await until(() => isGone(engine.pid), 5_000, "engine gone");
  if (opts.cookie === true) process.env[SESSION_COOKIE] = "reused";
  let newcomer: Engine;
  try {
    newcomer = await startEngine(t, ["--port", String(engine.port)]);
  } finally {
    delete process.env[SESSION_COOKIE];
  }
  assert.equal(newcomer.port, engine.port, "the newcomer took the freed port");
  const held = socketInodes(newcomer.pid);
  const listener = inetSockets("self", new Set([engine.port])).find((s) => s.state === "LISTEN" && held.has(s.inode));
  assert.ok(listener, "the newcomer's listening socket");
  const identity = identify(newcomer.pid, "newcomer", process.pid);
  return { id, port: engine.port, sockets, portInodes, newcomer, identity, listener };
}

test("a newcomer that took the port where the engine held it, with a new socket, outside the session: reported as a reuse, not a leftover", async (t) => {
  const { id, port, sockets, portInodes, newcomer } = await portTakenAfter(t);
  const v = await verifyGone(sessionOf(id, port), journalOf(id, sockets, portInodes), complete, process.pid);
  assert.deepEqual(v.leftovers, []);
  assert.deepEqual(
    v.reused?.map((r) => [r.pid, r.why]),
    [[newcomer.pid, `port ${port} (tcp LISTEN)`]],
  );
  assert.ok(v.verified.includes("ports"));
  assert.ok(!isGone(newcomer.pid), "verification never signals");
});

test("the same newcomer stays a leftover whenever identity cannot tell it apart", async (t) => {
  const { id, port, sockets, portInodes, newcomer, identity, listener } = await portTakenAfter(t);
  const leftoverPids = async (journal: ReturnType<typeof journalOf>, lineage: SessionMembers) =>
    (await verifyGone(sessionOf(id, port), journal, lineage, process.pid)).leftovers.map((l) => l.pid);

  // Lineage lost events (or never ran): a process it does not name may still be the engine's.
  assert.deepEqual(await leftoverPids(journalOf(id, sockets, portInodes), incomplete), [newcomer.pid]);
  // An older journal, without what was on the port at the snapshot.
  assert.deepEqual(await leftoverPids(journalOf(id, sockets, undefined), complete), [newcomer.pid]);
  // Its socket was on the port already at the snapshot: it shared the port all along.
  assert.deepEqual(await leftoverPids(journalOf(id, sockets, [...portInodes, listener.inode]), complete), [
    newcomer.pid,
  ]);
  // The engine held the port on another address: the newcomer's may have been there all along.
  const elsewhere: SocketSnapshot = {
    ...sockets,
    listening: sockets.listening.map((s) => ({ ...s, address: "127.0.0.3" })),
  };
  assert.deepEqual(await leftoverPids(journalOf(id, elsewhere, portInodes), complete), [newcomer.pid]);
  // A snapshot that left sockets out cannot say where the engine's were.
  const capped: SocketSnapshot = { ...sockets, omitted: { listening: 1, established: 0, unix: 0 } };
  assert.deepEqual(await leftoverPids(journalOf(id, capped, portInodes), complete), [newcomer.pid]);
  // Lineage names it: a process the engine started.
  const member: SessionMembers = { ...complete, members: () => [identity] };
  assert.deepEqual(await leftoverPids(journalOf(id, sockets, portInodes), member), [newcomer.pid]);
});

test("a newcomer carrying the session's cookie, or on a port outside the ephemeral range, stays a leftover", async (t) => {
  /** The leftovers' pids when the verification runs on this case with a complete lineage. */
  const leftoverPids = async (c: Awaited<ReturnType<typeof portTakenAfter>>): Promise<(number | undefined)[]> =>
    (
      await verifyGone(sessionOf(c.id, c.port), journalOf(c.id, c.sockets, c.portInodes), complete, process.pid)
    ).leftovers.map((l) => l.pid);

  const withCookie = await portTakenAfter(t, { cookie: true });
  assert.deepEqual(await leftoverPids(withCookie), [withCookie.newcomer.pid]);

  // Gone before the next case: its cookie would name it a process of that session too.
  withCookie.newcomer.child.kill("SIGKILL");
  await withCookie.newcomer.exited;

  // A fixed port below the ephemeral range: a service may take it up again; the kernel never hands it out.
  const [low] = readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "latin1").trim().split(/\s+/).map(Number);
  assert.ok(low !== undefined && low > 1100);
  const onFixed = await portTakenAfter(t, { fixed: await freePortBelow(low) });
  assert.deepEqual(await leftoverPids(onFixed), [onFixed.newcomer.pid]);
});

/** A loopback TCP port below `limit` that nothing uses now. */
async function freePortBelow(limit: number): Promise<number> {
  for (let port = limit - 1000; port < limit; port++) {
    if (await portFree(port)) return port;
  }
  throw new Error(`no free port below ${limit}`);
}
