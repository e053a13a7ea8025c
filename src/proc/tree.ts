import { readFileSync, readdirSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { type ProcessIdentity, processKey } from "../model/session.js";
import { bootId } from "./identity.js";
import { askShared, SharedReading } from "../pace/shared-reading.js";
import { loopTurn } from "../pace/turns.js";
import {
  isExited,
  isKernelThread,
  listStats,
  listStatsPaced,
  pageSize,
  readStat,
  readUid,
  type ProcStat,
} from "./stat.js";
import { BUDGETS } from "../pace/budgets.js";

/**
 * One snapshot of /proc, indexed by pid and parent pid: a single walk of /proc serves the
 * tree of every session (the liveness schedule snapshots all live sessions' trees at once).
 */
export class ProcessTable {
  private readonly byPid: Map<number, ProcStat>;
  private readonly children = new Map<number, ProcStat[]>();
  /** Members by process group id and by session id (a leader's pid). */
  private readonly groups = new Map<number, ProcStat[]>();

  constructor(stats: ProcStat[] = listStats()) {
    const live = stats.filter((s) => !isExited(s) && !isKernelThread(s));
    this.byPid = new Map(live.map((s) => [s.pid, s]));
    const add = (index: Map<number, ProcStat[]>, key: number, s: ProcStat): void => {
      const list = index.get(key);
      if (list) list.push(s);
      else index.set(key, [s]);
    };
    for (const s of live) {
      add(this.children, s.ppid, s);
      add(this.groups, s.pgrp, s);
      if (s.sid !== s.pgrp) add(this.groups, s.sid, s);
    }
  }

  /** The process if it still runs with this identity. */
  find(id: ProcessIdentity): ProcStat | undefined {
    const s = this.byPid.get(id.pid);
    return s && s.startTime === id.startTime && id.bootId === bootId() ? s : undefined;
  }

  /** The resident bytes of those of these processes that still run with their identity. */
  rssBytes(ids: readonly ProcessIdentity[]): number {
    let pages = 0;
    for (const id of ids) pages += this.find(id)?.rssPages ?? 0;
    return pages * pageSize();
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
    // is someone else's). An identity of an earlier boot (or none: the orphan sweep's session
    // for a leftover path, pid 0) has no group in this one.
    const enginePidReused = this.byPid.has(engine.pid) && this.find(engine) === undefined;
    if (!enginePidReused && engine.pid > 1 && engine.bootId === bootId()) {
      for (const s of this.groups.get(engine.pid) ?? []) members.set(s.pid, s);
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
    // Identities already known keep their uid: /proc/<pid>/status is read only for newcomers.
    const knownUid = new Map([engine, ...known].map((k) => [processKey(k), k.uid]));
    const boot = bootId();
    const out: ProcessIdentity[] = [];
    for (const s of members.values()) {
      if (s.pid <= 1) continue;
      const uid = knownUid.get(processKey(s)) ?? readUid(s.pid);
      if (uid !== null) out.push({ pid: s.pid, startTime: s.startTime, bootId: boot, uid });
    }
    return out;
  }
}

/** A fresh snapshot's tree for one engine. */
export function processTree(engine: ProcessIdentity, known: readonly ProcessIdentity[] = []): ProcessIdentity[] {
  return new ProcessTable().tree(engine, known);
}

/** The latest fresh walk's table, and when that walk began. */
let recent: { table: ProcessTable; at: number } | null = null;

/**
 * A snapshot of /proc at most `maxAgeMs` old: the latest fresh walk's (shared by every reap in
 * flight), or the next one (freshTable). For questions a slightly older picture answers as
 * well (a poll that runs again, a tree that terminate completes later); a decision that needs
 * the state after an action asks freshTable. Never a synchronous walk of the host.
 */
export async function recentTable(maxAgeMs: number): Promise<ProcessTable> {
  if (recent !== null && performance.now() - recent.at <= maxAgeMs) return recent.table;
  return freshTable();
}

/** At most one fresh walk (freshTable) starts per this many ms; the askers of the window share it. */
const FRESH_EVERY_MS = BUDGETS.readEveryMs;

interface Waiter {
  resolve: (t: ProcessTable) => void;
  reject: (err: unknown) => void;
}

/** The fresh walks: read a chunk per paced turn (loopTurn), shared by every asker of a window. */
const fresh = new SharedReading<Waiter>(
  FRESH_EVERY_MS,
  async (batch, begunAt) => {
    const table = new ProcessTable(await listStatsPaced(loopTurn));
    recent = { table, at: begunAt };
    for (const w of batch) w.resolve(table);
  },
  (w, err) => w.reject(err),
);

/**
 * A snapshot of /proc whose walk began after this call: for decisions that need the state
 * after an action (no newcomer after a freeze, nothing left after the kill, an engine's
 * group after it exited). Everyone who asks before a walk begins shares it, and a walk begins
 * at most every FRESH_EVERY_MS (src/pace/shared-reading.ts): a storm of a thousand reaps
 * costs a walk per 100 ms, not a synchronous walk of the host per reap. The table also
 * serves recentTable's callers.
 */
export function freshTable(): Promise<ProcessTable> {
  return askShared<Waiter, ProcessTable>(fresh, (resolve, reject) => ({ resolve, reject }));
}

export function freshTableStats(): { walks: number; asks: number } {
  return { walks: fresh.stats.reads, asks: fresh.stats.asks };
}

/** The live children of a process (every thread's children file under /proc/<pid>/task); none if it is gone. */
export function childrenOf(p: ProcessIdentity): ProcessIdentity[] {
  const out: ProcessIdentity[] = [];
  let tasks: string[] = [];
  try {
    tasks = readdirSync(`/proc/${p.pid}/task`);
  } catch {
    return out;
  }
  for (const tid of tasks) {
    let text = "";
    try {
      text = readFileSync(`/proc/${p.pid}/task/${tid}/children`, "latin1");
    } catch {
      continue;
    }
    for (const c of text.split(" ")) {
      const pid = Number(c);
      if (!Number.isInteger(pid) || pid <= 1) continue;
      const st = readStat(pid);
      const uid = readUid(pid);
      if (st !== null && uid !== null && st.ppid === p.pid && !isExited(st)) {
        out.push({ pid, startTime: st.startTime, bootId: p.bootId, uid });
      }
    }
  }
  return out;
}

/**
 * The engine and its descendants, by each process's own children lists: what registration
 * needs (a daemonizing launcher's server is a descendant until the launcher exits), without a
 * walk of the whole /proc (the liveness pass's full snapshot adds group and session members
 * that are not descendants, rare, within two seconds).
 */
export function descendantTree(engine: ProcessIdentity): ProcessIdentity[] {
  const out = new Map<number, ProcessIdentity>([[engine.pid, engine]]);
  const queue = [engine];
  while (queue.length > 0 && out.size < 100_000) {
    for (const c of childrenOf(queue.pop() as ProcessIdentity)) {
      if (out.has(c.pid)) continue;
      out.set(c.pid, c);
      queue.push(c);
    }
  }
  return [...out.values()];
}
