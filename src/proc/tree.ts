import type { ProcessIdentity } from "../sessions/types.js";
import { bootId } from "./identity.js";
import { isExited, isKernelThread, listStats, readUid, type ProcStat } from "./stat.js";

/**
 * The engine and every live process that belongs to it: its descendants by parent pid, and
 * the members of its process group and session when the engine leads them (this catches
 * children already re-parented to init after their parent died). Identities are taken now,
 * so later signals hit exactly these processes.
 */
export function processTree(engine: ProcessIdentity, known: readonly ProcessIdentity[] = []): ProcessIdentity[] {
  const stats = listStats().filter((s) => !isExited(s) && !isKernelThread(s));
  const byPid = new Map(stats.map((s) => [s.pid, s]));
  const members = new Map<number, ProcStat>();
  const same = (id: ProcessIdentity): ProcStat | undefined => {
    const s = byPid.get(id.pid);
    return s && s.startTime === id.startTime && id.bootId === bootId() ? s : undefined;
  };
  const roots = [engine, ...known].map(same).filter((s): s is ProcStat => s !== undefined);
  for (const r of roots) members.set(r.pid, r);
  // Members of the engine's process group and session, even when the engine itself is gone.
  // The kernel does not reuse a pid while a group or session still carries it, so such
  // members are ours, unless the pid already belongs to another process (then it was free,
  // and the group is someone else's).
  const enginePidReused = byPid.has(engine.pid) && same(engine) === undefined;
  if (!enginePidReused) {
    for (const s of stats) if (s.pgrp === engine.pid || s.sid === engine.pid) members.set(s.pid, s);
  }
  const children = new Map<number, ProcStat[]>();
  for (const s of stats) {
    const list = children.get(s.ppid);
    if (list) list.push(s);
    else children.set(s.ppid, [s]);
  }
  const queue = [...members.values()];
  while (queue.length > 0) {
    const p = queue.pop() as ProcStat;
    for (const c of children.get(p.pid) ?? []) {
      if (!members.has(c.pid)) {
        members.set(c.pid, c);
        queue.push(c);
      }
    }
  }
  const boot = bootId();
  const out: ProcessIdentity[] = [];
  for (const s of members.values()) {
    if (s.pid <= 1) continue;
    const uid = readUid(s.pid);
    if (uid !== null) out.push({ pid: s.pid, startTime: s.startTime, bootId: boot, uid });
  }
  return out;
}
