import { cgroupPids } from "../proc/cgroup.js";
import { ipcLeftovers } from "../proc/ipc.js";
import { liveness } from "../proc/identity.js";
import { freshTables, inetSockets, socketInodes, type InetSocket } from "../proc/sockets.js";
import { readStat, readUid } from "../proc/stat.js";
import { processUses, type ProcessUse } from "../proc/users.js";
import type { Leftover, ProcessIdentity, Session } from "../model/session.js";
import { damageOf, engineReadable } from "../store/columns.js";
import { journaled, type Journal, type Verified } from "./journal.js";
import { ipcQuery } from "./remove-paths.js";
import { reuseEvidence, reusesPort } from "./reused-port.js";
import { knownProcesses, type SessionMembers } from "./step.js";

export type { Verified } from "./journal.js";

export interface Verification {
  readonly verified: Verified[];
  readonly leftovers: Leftover[];
  /**
   * Processes that hold a registered port but took it after the session was gone, and are
   * not its own (reused-port.ts): reported, not leftovers.
   */
  readonly reused?: { pid: number; comm: string; why: string }[];
}

/**
 * "clean" means verified: after the cleanup steps, a pass that looks at the host afresh,
 * independently of what the steps believed they did:
 *
 * - lineage: no process the engine started is alive, by the kernel's own record of every fork
 *   since the engine's birth (src/proc/lineage.ts); named only while that record is complete
 *   (no event lost, no restart), though its members are always looked at;
 * - tree: no process of the session's last known tree (the fence's snapshot, close-environment's,
 *   terminate's) still runs;
 * - cookie: no process carries REAPER_SESSION_ID=<id> in its environment, wherever it was
 *   re-parented (what `reaperctl run` and launchers that follow README put there);
 * - ports: no live process holds a socket on a registered port (listening or connected: a
 *   PostgreSQL backend that outlived its postmaster still holds its client's connection);
 * - paths: no live process has its cwd, its root, an open fd or a mapped file at or below a
 *   registered path;
 * - ipc: no shared memory, semaphore or queue of the session is left (src/proc/ipc.ts); named
 *   only when none is still in use: an object a live process attaches or maps (a survivor
 *   found above, or anyone for a segment the session created) is not gone, and cannot be
 *   while its user lives.
 *
 * Anything found is a `process` leftover naming pid, comm, uid and why; the outcome is then
 * `partial`, never `clean`.
 */
export async function verifyGone(
  session: Session,
  journal: Journal,
  lineage: SessionMembers,
  daemonPid: number,
): Promise<Verification> {
  const found = new Map<number, ProcessUse>();
  const add = (u: ProcessUse): void => {
    if (!found.has(u.pid)) found.set(u.pid, u);
  };
  const cg = session.containment?.kind === "cgroup" ? session.containment : null;
  if (cg !== null) inCgroup(cg.path).forEach(add);
  // members() drains the kernel's queue first: complete() then speaks of every fork until now.
  const byLineage = lineage.members();
  const complete = lineage.complete();
  byLineageAlive(byLineage, daemonPid).forEach(add);
  inTree(session, journal).forEach(add);
  const { sockets, onPorts } = await socketsOnPorts(session);
  // cookie, ports and paths in one pass over /proc
  const usesOnly = new Set<number>();
  for (const u of await processUses({
    cookie: session.id,
    paths: session.paths,
    sockets,
    skip: new Set([daemonPid, process.pid]),
  })) {
    // processUses names the cookie first among a process's reasons.
    if (!found.has(u.pid) && !u.why.startsWith("cookie")) usesOnly.add(u.pid);
    add(u);
  }
  const reused = sockets.size === 0 ? [] : portReuses(session, journal, lineage, found, usesOnly, onPorts);
  // The survivors found above are the session's members too: what they attach, map or made
  // since their start is its. Not a process found only by what it uses (a registered port or
  // path): it may be anyone's, and its IPC is not the session's.
  const q = ipcQuery({ session, journal });
  const survivors = [...found.values()].filter((u) => !usesOnly.has(u.pid));
  const objects = await ipcLeftovers({ ...q, members: [...q.members, ...survivors] });
  const ipcInUse = objects.some((o) => o.inUse !== undefined);
  // A check is named only if it looked at what the session holds: its ports and paths as
  // stored, its tree from its engine. One whose stored values cannot be read checked nothing.
  return {
    verified: [
      ...(cg === null ? [] : (["cgroup"] as const)),
      ...(complete ? (["lineage"] as const) : []),
      ...(engineReadable(session) ? (["tree"] as const) : []),
      "cookie",
      ...(damageOf(session, "ports") === undefined ? (["ports"] as const) : []),
      ...(damageOf(session, "paths") === undefined ? (["paths"] as const) : []),
      ...(ipcInUse ? [] : (["ipc"] as const)),
    ],
    leftovers: [...found.values()]
      .map(processLeftover)
      .concat(
        objects.map((o): Leftover => ({ step: "finish", kind: "ipc", item: `${o.kind} ${o.item}`, detail: o.why })),
      ),
    ...(reused.length > 0 ? { reused } : {}),
  };
}

/** cgroup: a contained session's cgroup is empty (or removed). */
function inCgroup(path: string): ProcessUse[] {
  const out: ProcessUse[] = [];
  for (const pid of cgroupPids(path)) {
    const st = readStat(pid);
    if (st === null || st.state === "Z") continue;
    out.push({ pid, startTime: st.startTime, comm: st.comm, uid: readUid(pid) ?? -1, why: `in cgroup ${path}` });
  }
  return out;
}

/**
 * lineage: every live process the engine ever started, wherever it went (another session,
 * process group or cgroup, re-parented to init), after every fork reported before now.
 */
function byLineageAlive(members: readonly ProcessIdentity[], daemonPid: number): ProcessUse[] {
  const out: ProcessUse[] = [];
  for (const p of members) {
    if (p.pid <= 1 || p.pid === daemonPid || liveness(p) !== "alive") continue;
    const st = readStat(p.pid);
    if (st === null || st.state === "Z") continue;
    out.push({ pid: p.pid, startTime: p.startTime, comm: st.comm, uid: p.uid, why: "started by the engine (lineage)" });
  }
  return out;
}

/** tree: the engine and every process the steps journaled (the fence's, close-environment's, terminate's). */
function inTree(session: Session, journal: Journal): ProcessUse[] {
  const boot = session.engine.bootId;
  const tree: ProcessIdentity[] = [session.engine, ...knownProcesses(journal)];
  for (const p of journaled(journal, "terminate")?.processes ?? []) tree.push({ ...p, bootId: boot, uid: -1 });
  const out: ProcessUse[] = [];
  for (const p of tree) {
    if (p.pid <= 1 || liveness(p) !== "alive") continue;
    const st = readStat(p.pid);
    out.push({
      pid: p.pid,
      startTime: p.startTime,
      comm: st?.comm ?? "?",
      uid: readUid(p.pid) ?? -1,
      why: "in the session's tree",
    });
  }
  return out;
}

/**
 * ports: the sockets on a registered port, in the daemon's network namespace (the engine's,
 * when it shares it; the release step says when it did not), by inode.
 */
async function socketsOnPorts(
  session: Session,
): Promise<{ sockets: Map<number, string>; onPorts: Map<number, InetSocket> }> {
  const sockets = new Map<number, string>();
  const onPorts = new Map<number, InetSocket>();
  if (session.ports.length === 0) return { sockets, onPorts };
  const since = await freshTables(); // one reading for every reap verifying in this turn
  for (const s of inetSockets("self", new Set(session.ports), since)) {
    if (s.inode === 0 || !session.ports.includes(s.localPort)) continue;
    sockets.set(s.inode, `port ${s.localPort} (${s.proto} ${s.state})`);
    onPorts.set(s.inode, s);
  }
  return { sockets, onPorts };
}

/**
 * A process found only on a registered port, that took it after the session was gone and is
 * none of its own, is a reuse of the port number, not a leftover (reused-port.ts): taken out
 * of `found` and `usesOnly`, and returned.
 */
function portReuses(
  session: Session,
  journal: Journal,
  lineage: SessionMembers,
  found: Map<number, ProcessUse>,
  usesOnly: Set<number>,
  onPorts: ReadonlyMap<number, InetSocket>,
): { pid: number; comm: string; why: string }[] {
  const reused: { pid: number; comm: string; why: string }[] = [];
  const evidence = reuseEvidence(session.id, journal, lineage);
  for (const pid of usesOnly) {
    const u = found.get(pid) as ProcessUse;
    // Found by something else than a registered port too: not a question of port numbers.
    if (!u.why.split(", ").every((r) => /^port \d+ /.test(r))) continue;
    const held = [...socketInodes(pid)].flatMap((i) => onPorts.get(i) ?? []);
    const ports = new Set(held.map((s) => s.localPort));
    if (ports.size === 0) continue;
    const allReused = [...ports].every((p) =>
      reusesPort(
        u,
        p,
        held.filter((s) => s.localPort === p),
        evidence,
      ),
    );
    if (!allReused) continue;
    found.delete(pid);
    usesOnly.delete(pid);
    reused.push({ pid: u.pid, comm: u.comm, why: u.why });
  }
  return reused;
}

function processLeftover(u: ProcessUse): Leftover {
  return {
    step: "finish",
    kind: "process",
    item: String(u.pid),
    detail: `${u.comm} (pid ${u.pid}, uid ${u.uid}) still alive: ${u.why}`,
    pid: u.pid,
    comm: u.comm,
    uid: u.uid,
    why: u.why,
  };
}
