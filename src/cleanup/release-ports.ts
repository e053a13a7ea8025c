import { journaled, type Holder, type PortReport, type SocketsReport } from "./journal.js";
import { createSocket } from "node:dgram";
import { createServer } from "node:net";
import { performance } from "node:perf_hooks";
import { readStat } from "../proc/stat.js";
import { socketHolders, type SocketHolder } from "../proc/users.js";
import {
  endpoint,
  freshTables,
  inetSockets,
  netnsOf,
  socketInodes,
  unixSockets,
  type InetSocket,
  type SocketSnapshot,
} from "../proc/sockets.js";
import { type Leftover, processKey, type StepName, type StepResult } from "../model/session.js";
import { damageOf, whereIs } from "../store/columns.js";
import { runReleaseHooks, type HookReport } from "./release-hooks.js";
import { reuseEvidence, reusesPort, type ReuseEvidence } from "./reused-port.js";
import { knownProcesses, sleep, type CleanupStep, type StepContext } from "./step.js";
import { terminatedProcesses } from "./terminate.js";

/** Sockets close as their last holder exits; give the kernel a moment before judging. */
const SETTLE_MS = 1500;
const STEP: StepName = "release-connections-and-ports";

/** A holder as found (its start time tells a newcomer on a reused port). */
type FoundHolder = Holder & { startTime: number };

type SocketItem = { kind: "listening" | "established" | "unix"; item: string; inode: number; port?: number };

/** Whether a test bind on loopback succeeds (the port is really usable again). */
function testBindTcp(port: number): Promise<string | null> {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.once("error", (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
    srv.listen({ port, host: "127.0.0.1", exclusive: true }, () => srv.close(() => resolve(null)));
  });
}

function testBindUdp(port: number): Promise<string | null> {
  return new Promise((resolve) => {
    const sock = createSocket({ type: "udp4", reuseAddr: false });
    sock.once("error", (err: NodeJS.ErrnoException) => {
      sock.close();
      resolve(err.code ?? err.message);
    });
    sock.bind({ port, address: "127.0.0.1", exclusive: true }, () => sock.close(() => resolve(null)));
  });
}

const isUdp = (s: { proto: string }): boolean => s.proto.startsWith("udp");

/** The holder as it is now, if it is still the process the walk saw (pid and start time). */
function holderOf(h: SocketHolder, session: ReadonlySet<string>): FoundHolder | null {
  const st = readStat(h.pid);
  if (st === null || st.startTime !== h.startTime) return null;
  return { by: session.has(processKey(h)) ? "session" : "outside", pid: h.pid, comm: st.comm, startTime: h.startTime };
}

/** What matters most is whether the session itself still holds something. */
const sessionFirst = (a: Holder, b: Holder): number => (a.by === b.by ? 0 : a.by === "session" ? -1 : 1);

/** Each holder once, with the inodes it holds among `inodes`, session processes first. */
function holdersIn(
  inodes: readonly number[],
  byInode: ReadonlyMap<number, readonly SocketHolder[]>,
  session: ReadonlySet<string>,
): (FoundHolder & { inodes: number[] })[] {
  const found = new Map<string, FoundHolder & { inodes: number[] }>();
  for (const inode of inodes) {
    for (const h of byInode.get(inode) ?? []) {
      const known = found.get(processKey(h));
      if (known !== undefined) {
        known.inodes.push(inode);
        continue;
      }
      const now = holderOf(h, session);
      if (now !== null) found.set(processKey(h), { ...now, inodes: [inode] });
    }
  }
  return [...found.values()].sort(sessionFirst);
}

/**
 * Any socket on the port that a process still refers to (inode > 0) holds it: a listener, a
 * bound UDP socket, and a connection too (a PostgreSQL backend that outlived its postmaster
 * keeps its client's). A connection does not fail the test bind (the listener it was
 * accepted from set SO_REUSEADDR, as servers do), so only the tables tell.
 */
function boundOn(port: number, udp: boolean, notBefore: number): { bound: InetSocket[]; timeWait: number } {
  const sockets = inetSockets("self", new Set([port]), notBefore);
  return {
    bound: sockets.filter((s) => s.inode > 0 && (udp || !isUdp(s))),
    timeWait: sockets.filter((s) => s.state === "TIME_WAIT").length,
  };
}

async function inspect(
  port: number,
  udp: boolean,
  on: { bound: InetSocket[]; timeWait: number },
  byInode: ReadonlyMap<number, readonly SocketHolder[]>,
  session: ReadonlySet<string>,
  evidence: ReuseEvidence,
): Promise<PortReport> {
  const { bound, timeWait } = on;
  const holders = holdersIn(
    bound.map((s) => s.inode),
    byInode,
    session,
  );
  const holder = holders[0];
  if (holder !== undefined) {
    const held = bound.find((s) => holder.inodes.includes(s.inode));
    const reused = holders.every(
      (h) =>
        h.by === "outside" &&
        reusesPort(
          h,
          port,
          bound.filter((s) => h.inodes.includes(s.inode)),
          evidence,
        ),
    );
    const where = { proto: held?.proto ?? "tcp", state: held?.state ?? "?" };
    if (reused) return { port, status: "reused", ...where, pid: holder.pid, comm: holder.comm };
    return { port, status: "held", ...where, by: holder.by, pid: holder.pid, comm: holder.comm };
  }
  const tcpError = await testBindTcp(port);
  if (tcpError !== null) return { port, status: "bind-failed", proto: "tcp", error: tcpError, timeWait };
  const udpError = udp ? await testBindUdp(port) : null;
  if (udpError !== null) return { port, status: "bind-failed", proto: "udp", error: udpError, timeWait };
  return { port, status: "free", timeWait };
}

/** close-environment's snapshot, if it took one (absent: engine already gone, or an older journal). */
function snapshotOf(journal: ReadonlyMap<StepName, StepResult>): SocketSnapshot | null {
  const s: Partial<SocketSnapshot> | undefined = journaled(journal, "close-environment")?.sockets;
  if (!s || !Array.isArray(s.listening) || !Array.isArray(s.established) || !Array.isArray(s.unix)) return null;
  return {
    ...s,
    listening: s.listening,
    established: s.established,
    unix: s.unix,
    netns: Array.isArray(s.netns) ? s.netns : [],
    ancestors: Array.isArray(s.ancestors) ? s.ancestors : [],
  };
}

function itemsOf(snap: SocketSnapshot): SocketItem[] {
  return [
    ...snap.listening.map((s) => ({
      kind: "listening" as const,
      item: `${s.proto} ${endpoint(s.address, s.port)}`,
      inode: s.inode,
      port: s.port,
    })),
    ...snap.established.map((s) => ({
      kind: "established" as const,
      item: `${s.proto} ${s.local} -> ${s.remote}`,
      inode: s.inode,
      // A connection on a registered port holds that port: the port check reports it.
      ...(typeof s.localPort === "number" ? { port: s.localPort } : {}),
    })),
    ...snap.unix.map((s) => ({
      kind: "unix" as const,
      item: `unix ${s.type} ${s.path ?? `inode ${s.inode}`}`,
      inode: s.inode,
    })),
  ];
}

/**
 * Every socket of the snapshot must be gone from the kernel's tables (a socket no file refers
 * to any more keeps its line with inode 0 while TCP finishes closing: that is released).
 */
async function verifySockets(
  snap: SocketSnapshot | null,
  tables: { inet: InetSocket[]; unix: Set<number> },
  session: ReadonlySet<string>,
): Promise<SocketsReport> {
  if (snap === null) {
    return { skipped: "no socket snapshot in the journal (engine gone before close-environment, or an older journal)" };
  }
  const ours = netnsOf("self");
  const foreign = snap.netns.filter((ns) => ns !== ours);
  if (foreign.length > 0) {
    return { unverified: `the engine ran in another network namespace (${foreign.join(", ")})` };
  }
  const open = new Set([...tables.inet.map((s) => s.inode), ...tables.unix]);
  open.delete(0);
  const items = itemsOf(snap);
  let left = items.filter((i) => open.has(i.inode));

  // Inherited sockets (a launcher's stdout, systemd's listening socket) stay open in the
  // ancestor they came from: the session released its copy.
  const shared: { item: string; pids: number[] }[] = [];
  const ancestorFds = snap.ancestors
    .filter((a) => readStat(a.pid)?.startTime === a.startTime)
    .map((a) => ({ pid: a.pid, fds: left.length > 0 ? socketInodes(a.pid) : new Set<number>() }));
  left = left.filter((i) => {
    const pids = ancestorFds.filter((a) => a.fds.has(i.inode)).map((a) => a.pid);
    if (pids.length > 0) shared.push({ item: i.item, pids });
    return pids.length === 0;
  });

  // One shared walk of every process's fds for all the survivors (usually there are none).
  const holders = await socketHolders(left.map((i) => i.inode));
  const survivors = left.map((i) => {
    const holder = (holders.get(i.inode) ?? [])
      .map((h) => holderOf(h, session))
      .filter((h): h is FoundHolder => h !== null)
      .sort(sessionFirst)[0];
    return {
      item: i.item,
      ...(i.port === undefined ? {} : { port: i.port }),
      ...(holder === undefined ? { by: "unknown" as const } : { by: holder.by, pid: holder.pid, comm: holder.comm }),
    };
  });

  const closing: { item: string; state: string }[] = [];
  for (const c of snap.established) {
    if (open.has(c.inode)) continue;
    const orphan = tables.inet.find(
      (s) =>
        s.inode === 0 &&
        s.proto === c.proto &&
        endpoint(s.localAddress, s.localPort) === c.local &&
        endpoint(s.remoteAddress, s.remotePort) === c.remote,
    );
    if (orphan && orphan.state !== "TIME_WAIT") {
      closing.push({ item: `${c.proto} ${c.local} -> ${c.remote}`, state: orphan.state });
    }
  }
  return { checked: items.length, gone: items.length - left.length - shared.length, shared, closing, survivors };
}

/**
 * Runs the profile's release hooks, then verifies that the session released its sockets:
 * every socket of close-environment's snapshot is gone (or still open only in an ancestor it
 * was inherited from), and no process holds a socket on a registered port (listening or
 * connected: `free` means none) and each passes a test bind.
 * TIME_WAIT is reported, not a failure. A port or socket now held by a process outside the
 * session is reported as a leftover and never touched.
 */
export const releaseConnectionsAndPorts: CleanupStep<"release-connections-and-ports"> = {
  name: STEP,
  // Hooks get step_timeout_sec (they run side by side), the verification as much again.
  timeoutMs: (p) => p.stepTimeoutSec * 1000 * (p.releaseHooks.length > 0 ? 2 : 1),

  async run(ctx, signal) {
    const { session } = ctx;
    // Hooks first: one may free what the verification checks (an external lock on a port).
    const hooks = await releaseHooks(ctx, signal);
    // The session's processes: what terminate handled, the journaled trees, and lineage's.
    const processes = [...terminatedProcesses(ctx), ...knownProcesses(ctx.journal), ...ctx.lineage.members()];
    const sessionKeys = new Set(processes.map(processKey));
    const snap = snapshotOf(ctx.journal);
    const settleEnd = Math.min(performance.now() + SETTLE_MS, ctx.deadline - 200);
    const ports = await settlePorts(ctx, snap, sessionKeys, settleEnd, signal);
    const { sockets, since } = await settleSockets(snap, sessionKeys, settleEnd, signal);
    const registered = new Set(session.ports);
    const survivors = "survivors" in sockets ? sockets.survivors : [];
    const leftovers = [...hookLeftovers(hooks), ...portLeftovers(ports), ...socketLeftovers(survivors, registered)];

    // Ports that cannot be read were neither checked nor released: the step cannot have succeeded.
    const damaged = damageOf(session, "ports");
    const hooksOk = hooks.every((h) => h.outcome === "ok");
    // An outsider on a port is reported, but the session itself released what it held.
    const portsOk = ports.every(
      (r) => r.status === "free" || r.status === "reused" || (r.status === "held" && r.by === "outside"),
    );
    const socketsOk = survivors.every((s) => s.by === "outside");
    return {
      ok: hooksOk && portsOk && socketsOk && damaged === undefined,
      detail: {
        hooks,
        ports,
        ...(damaged === undefined
          ? {}
          : {
              unreadable: `${whereIs(damaged)} cannot be read (${damaged.error}): the session's ports are unknown, none was verified free`,
            }),
        sockets,
        timeWait: timeWaitOf(snap, registered, since),
      },
      leftovers,
    };
  },
};

type ReleaseContext = StepContext<"release-connections-and-ports">;

/** The profile's release hooks, with at most half of what is left of the step's time. */
async function releaseHooks(ctx: ReleaseContext, signal: AbortSignal): Promise<HookReport[]> {
  const { session, profile } = ctx;
  if (profile.releaseHooks.length === 0) return [];
  const budget = Math.min(profile.stepTimeoutSec * 1000, (ctx.deadline - performance.now()) / 2);
  return runReleaseHooks(
    profile.releaseHooks,
    profile.hookPath,
    session,
    ctx.attempt,
    Math.max(0, budget),
    signal,
    ctx.log,
  );
}

function hookLeftovers(hooks: readonly HookReport[]): Leftover[] {
  return hooks
    .filter((h) => h.outcome !== "ok")
    .map((h) => ({
      step: STEP,
      kind: "hook",
      item: h.hook === "http" ? h.url : h.argv.join(" "),
      detail:
        h.outcome === "timeout"
          ? `release hook timed out: ${h.error ?? ""}`
          : `release hook failed: ${h.hook === "http" ? (h.status ?? h.error) : (h.exit ?? h.error)}`,
    }));
}

/**
 * Every registered port, checked until none is held by the session or fails a test bind, or
 * the settle time ends: a port the snapshot shows as TCP only is not checked for UDP (an
 * unrelated UDP service may use the same number); without the snapshot's word, both are.
 */
async function settlePorts(
  ctx: ReleaseContext,
  snap: SocketSnapshot | null,
  sessionKeys: ReadonlySet<string>,
  settleEnd: number,
  signal: AbortSignal,
): Promise<PortReport[]> {
  const { session } = ctx;
  const udpPorts = new Set(snap?.listening.filter(isUdp).map((s) => s.port));
  const tcpOnly = new Set(snap?.listening.filter((s) => !isUdp(s) && !udpPorts.has(s.port)).map((s) => s.port));
  const evidence = reuseEvidence(session.id, ctx.journal, ctx.lineage);
  for (;;) {
    const ports: PortReport[] = [];
    // One reading of the tables for every reap checking in this turn, and one shared walk
    // of /proc for the holders of every port's sockets.
    const round = await freshTables();
    const on = new Map(session.ports.map((port) => [port, boundOn(port, !tcpOnly.has(port), round)] as const));
    const byInode = await socketHolders([...on.values()].flatMap((o) => o.bound.map((s) => s.inode)));
    for (const [port, sockets] of on) {
      ports.push(await inspect(port, !tcpOnly.has(port), sockets, byInode, sessionKeys, evidence));
    }
    const pending = ports.some((r) => r.status === "bind-failed" || (r.status === "held" && r.by === "session"));
    if (!pending || signal.aborted || performance.now() >= settleEnd) return ports;
    await sleep(100);
  }
}

function portLeftovers(ports: readonly PortReport[]): Leftover[] {
  const leftovers: Leftover[] = [];
  for (const r of ports) {
    if (r.status === "held") {
      leftovers.push({
        step: STEP,
        kind: "port",
        item: String(r.port),
        detail:
          r.by === "outside"
            ? `held by pid ${r.pid} (${r.comm}), a process outside the session (${r.proto} ${r.state}): not touched`
            : `still held by session process ${r.pid} (${r.comm}): ${r.proto} ${r.state}`,
      });
    } else if (r.status === "bind-failed") {
      leftovers.push({
        step: STEP,
        kind: "port",
        item: String(r.port),
        detail: `no process holds a socket on it, but a ${r.proto} test bind failed: ${r.error}`,
      });
    }
  }
  return leftovers;
}

/**
 * The snapshot's sockets, checked until none survives or the settle time ends. A
 * multithreaded engine (a JVM, Node) shows as a zombie, gone for terminate, while its last
 * threads still release the shared fd table: its sockets may outlive it by a moment, longer
 * on a loaded host. Returns the report and when the tables it ends on were read.
 */
async function settleSockets(
  snap: SocketSnapshot | null,
  sessionKeys: ReadonlySet<string>,
  settleEnd: number,
  signal: AbortSignal,
): Promise<{ sockets: SocketsReport; since: number }> {
  const tablesSince = (t: number) => ({
    inet: inetSockets("self", undefined, t),
    unix: new Set(unixSockets("self", t).map((s) => s.inode)),
  });
  const since = await freshTables();
  let sockets = await verifySockets(snap, tablesSince(since), sessionKeys);
  while ("survivors" in sockets && sockets.survivors.length > 0 && !signal.aborted && performance.now() < settleEnd) {
    await sleep(50);
    sockets = await verifySockets(snap, tablesSince(await freshTables()), sessionKeys);
  }
  return { sockets, since };
}

type Survivor = Extract<SocketsReport, { survivors: unknown }>["survivors"][number];

function socketLeftovers(survivors: readonly Survivor[], registered: ReadonlySet<number>): Leftover[] {
  // A socket on a registered port (listening or connected) is already reported by the port check.
  return survivors
    .filter((s) => s.port === undefined || !registered.has(s.port))
    .map((s) => ({
      step: STEP,
      kind: "socket",
      item: s.item,
      detail:
        s.by === "outside"
          ? `socket still open in pid ${s.pid} (${s.comm}), a process outside the session: not touched`
          : s.by === "session"
            ? `socket still open in session process ${s.pid} (${s.comm})`
            : "socket still open; no process holding it was found",
    }));
}

/**
 * TIME_WAIT: the TCP close is done on the session's side; the kernel keeps the line for a
 * while (2 * MSL). Reported, never a failure: a test bind still succeeds (SO_REUSEADDR).
 */
function timeWaitOf(snap: SocketSnapshot | null, registered: ReadonlySet<number>, since: number): string[] {
  const snapConnections = new Set(snap?.established.map((c) => `${c.proto} ${c.local} -> ${c.remote}`));
  return inetSockets("self", undefined, since)
    .filter((s) => s.state === "TIME_WAIT")
    .map((s) => ({
      item: `${s.proto} ${endpoint(s.localAddress, s.localPort)} -> ${endpoint(s.remoteAddress, s.remotePort)}`,
      port: s.localPort,
    }))
    .filter((s) => registered.has(s.port) || snapConnections.has(s.item))
    .map((s) => s.item);
}
