import type { ProcessIdentity } from "../sessions/types.js";
import { bootId } from "./identity.js";
import { isExited, isKernelThread, listStats, readUid, type ProcStat } from "./stat.js";

/**
 * One snapshot of /proc, indexed by pid and parent pid: a single walk of /proc serves the
 * tree of every session (the liveness schedule snapshots all live sessions' trees at once).
 */
export class ProcessTable {
  private readonly byPid: Map<number, ProcStat>;
  private readonly children = new Map<number, ProcStat[]>();
  private readonly stats: ProcStat[];

  constructor(stats: ProcStat[] = listStats()) {
    this.stats = stats.filter((s) => !isExited(s) && !isKernelThread(s));
    this.byPid = new Map(this.stats.map((s) => [s.pid, s]));
    for (const s of this.stats) {
      const list = this.children.get(s.ppid);
      if (list) list.push(s);
      else this.children.set(s.ppid, [s]);
    }
  }

  /** The process if it still runs with this identity. */
  find(id: ProcessIdentity): ProcStat | undefined {
    const s = this.byPid.get(id.pid);
    return s && s.startTime === id.startTime && id.bootId === bootId() ? s : undefined;
  }

  /**
   * The engine and every live process that belongs to it: processes of `known` (taken in
   * earlier snapshots, so children re-parented after their parent died are still found)
   * that keep their identity, all their descendants by parent pid, and the members of the
   * engine's process group and session. Identities are taken now, so later signals hit
   * exactly these processes.
   */
  tree(engine: ProcessIdentity, known: readonly ProcessIdentity[] = []): ProcessIdentity[] {
    const members = new Map<number, ProcStat>();
    for (const id of [engine, ...known]) {
      const s = this.find(id);
      if (s) members.set(s.pid, s);
    }
    // Members of the engine's group and session, even once the engine is gone: the kernel
    // does not reuse a pid while a group or session still carries it, so they are ours,
    // unless the pid already belongs to another process (then it was free, and the group
    // is someone else's).
    const enginePidReused = this.byPid.has(engine.pid) && this.find(engine) === undefined;
    if (!enginePidReused) {
      for (const s of this.stats) if (s.pgrp === engine.pid || s.sid === engine.pid) members.set(s.pid, s);
    }
    const queue = [...members.values()];
    while (queue.length > 0) {
      const p = queue.pop() as ProcStat;
      for (const c of this.children.get(p.pid) ?? []) {
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
}

/** A fresh snapshot's tree for one engine. */
export function processTree(engine: ProcessIdentity, known: readonly ProcessIdentity[] = []): ProcessIdentity[] {
  return new ProcessTable().tree(engine, known);
}
