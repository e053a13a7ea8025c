import { Cron } from "croner";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import pidusage from "pidusage";
import type { Logger } from "pino";
import type { Clock } from "../clock.js";
import { liveness } from "../proc/identity.js";
import { ProcessHandle } from "../proc/pidfd.js";
import { listStatsPaced, readUid } from "../proc/stat.js";
import { descendantTree, freshTable, ProcessTable } from "../proc/tree.js";
import type { CpuSample, LiveSession } from "../model/live-session.js";
import type { LiveSessions, LiveWatcher } from "../sessions/live.js";
import { type ProcessIdentity, processKey, type Reason } from "../model/session.js";
import type { SessionLineage } from "../proc/lineage.js";
import { loopTurn } from "../pace/turns.js";
import { DeadlineHeap } from "./heap.js";
import type { Deadline } from "../model/deadline.js";
import { BUDGETS } from "../pace/budgets.js";

/** An engine or owner process watched for the live sessions that name it. */
interface WatchedProcess {
  readonly id: ProcessIdentity;
  /** The held pidfd with its exit watch; null without pidfd, or if the identity did not match. */
  handle: ProcessHandle | null;
  /** Live sessions whose engine this is. */
  readonly engineOf: Set<LiveSession>;
  /** Live sessions whose owner this is. */
  readonly ownerOf: Set<LiveSession>;
  /** The engine's tree at the last liveness pass (shared by its sessions' `tree`). */
  tree: readonly ProcessIdentity[];
  /**
   * Its pidfd said it exited (set after the last look at its tree, before its sessions are
   * expired): an expiry the store could
   * not commit is tried again on every tick and first thing once the store commits (rearm),
   * so the exit the daemon saw is the reason on record, not a timeout that passed meanwhile.
   */
  exited: boolean;
}

/** How close to its idle deadline a session's tree is looked at for new descendants (sampleCpu). */
const IDLE_LOOKAHEAD_MS = 10_000;

const identityKey = (id: ProcessIdentity): string => `${id.pid}:${id.startTime}:${id.bootId}:${id.uid}`;

function sameTree(a: readonly ProcessIdentity[], b: readonly ProcessIdentity[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    const x = a[i] as ProcessIdentity;
    const y = b[i] as ProcessIdentity;
    if (x.pid !== y.pid || x.startTime !== y.startTime || x.uid !== y.uid) return false;
  }
  return true;
}

/** The processes a session's CPU is summed over: its engine and its tracked tree, once each. */
function members(s: LiveSession): ProcessIdentity[] {
  const seen = new Map<number, ProcessIdentity>([[s.engine.pid, s.engine]]);
  for (const p of s.tree) if (!seen.has(p.pid)) seen.set(p.pid, p);
  return [...seen.values()];
}

/** The session's CPU now: its cgroup's total, or each tracked process's own; null if nothing is left. */
function cpuNow(s: LiveSession, stats: Record<string, pidusage.Status | null>, atMs: number): CpuSample | null {
  if (s.cgroup !== null) {
    const usec = cgroupCpuUsec(s.cgroup);
    return usec === null ? null : { atMs, cpuMs: usec / 1000 };
  }
  const perProcess = new Map<string, number>();
  let cpuMs = 0;
  for (const p of members(s)) {
    const u = stats[p.pid];
    if (!u) continue;
    perProcess.set(processKey(p), u.ctime);
    cpuMs += u.ctime;
  }
  return perProcess.size === 0 ? null : { atMs, cpuMs, perProcess };
}

/**
 * CPU ms used between two samples. For a tree, per process: a process seen in both counts its
 * growth, a newcomer all its CPU (it was born in the window, or joined the tree in it), one gone
 * nothing; so a tree that changes never makes the sum jump back or forth.
 */
function cpuSince(prev: CpuSample, next: CpuSample): number {
  if (prev.perProcess === undefined || next.perProcess === undefined) return Math.max(0, next.cpuMs - prev.cpuMs);
  let used = 0;
  for (const [key, ms] of next.perProcess) used += Math.max(0, ms - (prev.perProcess.get(key) ?? 0));
  return used;
}

/** cpu.stat's usage_usec (works without the cpu controller enabled); null if unreadable. */
function cgroupCpuUsec(dir: string): number | null {
  try {
    const m = /^usage_usec (\d+)$/m.exec(readFileSync(join(dir, "cpu.stat"), "latin1"));
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

/**
 * A CPU sample closer than this to the previous one is not judged (the counters tick every
 * 10 ms, so a short window is mostly noise): the older baseline is kept for the next pass.
 */
const MIN_CPU_WINDOW_MS = 500;

/** detect.liveness_cpu_percent's default (see `DetectorOptions.livenessCpuPercent`). */
const LIVENESS_CPU_PERCENT = 0.25;

export type ExpireFn = (id: string, reason: Reason, detail: Record<string, unknown>) => void;
/** A warning's moment came (profiles.NAME.warn_before_sec): `deadline` is the idle or lifetime deadline warned of. */
export type WarnFn = (s: LiveSession, deadline: Deadline) => void;

export interface DetectorOptions {
  registry: LiveSessions;
  clock: Clock;
  /** croner pattern of the liveness pass. */
  livenessSchedule: string;
  /**
   * The share of one core (percent) the liveness pass's walk of /proc may take: a pass that
   * cost C ms of loop time is followed by the next walk no sooner than C / share later, and
   * never sooner than the schedule. At 0.25 %, a host with ~1,000 processes (a walk of ~15 ms)
   * is walked every ~6 s, one with 10,000 (~170 ms) every ~70 s. The walk refreshes the trees
   * of uncontained engines (a cgroup tracks contained ones); exits are seen at once through
   * pidfds, and a process without a pidfd is still checked on every tick.
   */
  livenessCpuPercent?: number;
  log: Logger;
  expire: ExpireFn;
  /** Gives a warning whose moment came; by the same timer as expiry, so within milliseconds of it. */
  warn?: WarnFn | undefined;
  /**
   * Asked before any time-based expiry is judged: false while time may not be trusted to
   * have passed for the sessions (the store cannot commit). The daemon also notices a stall
   * of its loop here, before the deadlines are read. Default: always true.
   */
  mayJudgeTime?: () => boolean;
  /** A pidfd could not be opened for a reason other than the process being gone (EMFILE…). */
  onPidfdError?: (code: string) => void;
  /** Members by lineage: added to each tree the liveness pass refreshes, counted in busy CPU. */
  lineage?: Pick<SessionLineage, "members"> | undefined;
}

/** Loop time the detector may spend fencing due sessions in one turn (see expireDue). */
const FENCE_BUDGET_MS = BUDGETS.fenceMs;

/**
 * Finds sessions that are due. Time-based: a min-heap of deadlines and one timer armed for
 * the earliest, so expiry starts within milliseconds of the deadline instead of on a coarse
 * poll. Heartbeats never touch the heap (they only move a session's deadline later): when an
 * entry comes due, the session's current deadline is computed, and the entry is pushed back
 * if it moved. Evidence-based: while a session is live the daemon holds a pidfd on its
 * engine and owner and is woken the moment either exits; a croner job checks every identity
 * too (the fallback without pidfd, and the tree snapshots).
 */
export class Detector implements LiveWatcher {
  /**
   * Every engine and owner process of a live session, once per process however many sessions
   * name it (an engine shared by many sessions, as Kyuubi's USER or SERVER share levels run
   * them; one launcher owning many sessions): one pidfd, one identity check at add, one tree
   * snapshot per liveness pass.
   */
  private readonly processes = new Map<string, WatchedProcess>();
  /** Live sessions whose profile sets busy_cpu_percent: the only ones the CPU sampling reads. */
  private readonly cpuWatched = new Map<string, LiveSession>();
  private readonly heap = new DeadlineHeap();
  private cancelTimer: (() => void) | null = null;
  /** When the liveness pass may walk /proc again (performance.now() ms; see livenessCpuPercent). */
  private nextWalkAt = 0;
  private armedAt = Number.POSITIVE_INFINITY;
  private cron: Cron | null = null;
  private running = false;

  private readonly registry: LiveSessions;
  private readonly clock: Clock;
  private readonly livenessSchedule: string;
  private readonly walkShare: number;
  private readonly log: Logger;
  private readonly expire: ExpireFn;
  private readonly warn: WarnFn;
  private readonly mayJudgeTime: () => boolean;
  private readonly onPidfdError: (code: string) => void;
  private readonly lineage: Pick<SessionLineage, "members"> | undefined;

  constructor(opts: DetectorOptions) {
    this.registry = opts.registry;
    this.clock = opts.clock;
    this.livenessSchedule = opts.livenessSchedule;
    this.walkShare = (opts.livenessCpuPercent ?? LIVENESS_CPU_PERCENT) / 100;
    this.log = opts.log;
    this.expire = opts.expire;
    this.warn = opts.warn ?? (() => undefined);
    this.mayJudgeTime = opts.mayJudgeTime ?? (() => true);
    this.onPidfdError = opts.onPidfdError ?? (() => undefined);
    this.lineage = opts.lineage;
    opts.registry.watch(this);
  }

  /** A session entered the registry: watch its processes, queue its deadline. */
  admitted(s: LiveSession): void {
    this.heap.push(this.registry.nextMoment(s), s.id);
    const engine = this.watch(s.engine);
    engine.engineOf.add(s);
    if (engine.engineOf.size === 1) engine.tree = s.tree;
    else this.registry.shareTree(s, engine.tree);
    if (s.ownerPid !== null) this.watch(s.ownerPid).ownerOf.add(s);
    if (s.busyCpuPercent !== null) {
      this.cpuWatched.set(s.id, s);
      void this.sampleCpu([s]); // the baseline: the next liveness pass can judge
    }
    if (this.running) this.arm();
  }

  /** A session left the registry (fenced); its heap entry is discarded when it comes due. */
  removed(s: LiveSession): void {
    this.cpuWatched.delete(s.id);
    this.unwatch(s.engine, (p) => p.engineOf.delete(s));
    if (s.ownerPid !== null) this.unwatch(s.ownerPid, (p) => p.ownerOf.delete(s));
  }

  private unwatch(id: ProcessIdentity, detach: (p: WatchedProcess) => void): void {
    const key = identityKey(id);
    const p = this.processes.get(key);
    if (p === undefined) return;
    detach(p);
    if (p.engineOf.size === 0 && p.ownerOf.size === 0) {
      p.handle?.close();
      this.processes.delete(key);
    }
  }

  /**
   * The process's watch, opened on first use: a pidfd held and an exit watch. The identity is
   * checked after the pidfd is open (so it is the identity of the process the pidfd holds):
   * after a restart, a pid now worn by another process is never watched, and the liveness
   * pass reaps its sessions instead.
   */
  private watch(id: ProcessIdentity): WatchedProcess {
    const key = identityKey(id);
    const known = this.processes.get(key);
    if (known !== undefined) return known;
    const p: WatchedProcess = { id, handle: null, engineOf: new Set(), ownerOf: new Set(), tree: [], exited: false };
    this.processes.set(key, p);
    const handle = ProcessHandle.open(id.pid, this.onPidfdError);
    if (handle === null) return p; // no pidfd here, already gone, or no fd: the liveness pass decides
    if (liveness(id) !== "alive" || readUid(id.pid) !== id.uid) {
      handle.close();
      return p;
    }
    handle.onExit(() => {
      if (this.processes.get(key) === p) void this.lastLook(p);
    });
    p.handle = handle;
    return p;
  }

  /**
   * Expires the sessions of processes whose pidfd said they exited. Before that, an exited
   * engine's tree gets a last look on a walk of /proc taken after the exit: its children are
   * re-parented as it dies, and its group and session still find those born since the last
   * liveness pass (a PostgreSQL backend forked 0.3 s before the postmaster died). The exits of
   * a storm share walks (freshTable: one per 100 ms at most, paced): a thousand engines dying
   * at once cost a few walks, not a thousand in a row on the loop.
   */
  private async lastLook(p: WatchedProcess): Promise<void> {
    try {
      if (p.engineOf.size > 0) {
        const table = await freshTable();
        if (this.processes.get(identityKey(p.id)) !== p) return;
        this.refreshTree(p, table);
      }
      p.exited = true; // after the last look: a retry (checkUnwatched) never expires before it
      this.processGone(p, "pidfd");
    } catch (err) {
      this.log.error({ err, pid: p.id.pid }, "expiry on process exit failed");
    }
  }

  /**
   * The engine's tree on this snapshot, with its members by lineage (processes that left the
   * tree by a double fork or setsid, which no snapshot ties to it), given to its sessions if
   * it changed: kept durable, so that a restarted daemon starts from it.
   */
  private refreshTree(p: WatchedProcess, table: ProcessTable): void {
    const first = p.engineOf.values().next().value;
    const byLineage = first === undefined || this.lineage === undefined ? [] : this.lineage.members(first.id);
    const tree = table.tree(p.id, byLineage.length === 0 ? p.tree : [...p.tree, ...byLineage]);
    if (sameTree(tree, p.tree)) return;
    p.tree = tree;
    for (const s of p.engineOf) this.registry.setTree(s, tree);
  }

  /** Adds to an engine's tree its descendants (children files, lineage) not in it yet. */
  private addDescendants(engine: ProcessIdentity): void {
    const p = this.processes.get(identityKey(engine));
    if (p === undefined || p.engineOf.size === 0) return;
    const known = new Set([identityKey(p.id), ...p.tree.map(identityKey)]);
    const first = p.engineOf.values().next().value;
    const byLineage = first === undefined || this.lineage === undefined ? [] : this.lineage.members(first.id);
    const added = [...descendantTree(p.id), ...byLineage].filter((c) => {
      if (known.has(identityKey(c))) return false;
      known.add(identityKey(c));
      return true;
    });
    if (added.length === 0) return;
    p.tree = [...p.tree, ...added];
    for (const s of p.engineOf) this.registry.setTree(s, p.tree);
  }

  /** Expires every session of a process that is gone: engine_gone first, then owner_gone. */
  private processGone(p: WatchedProcess, detectedBy: "pidfd" | "liveness"): number {
    let n = 0;
    for (const s of [...p.engineOf]) {
      if (this.registry.get(s.id) !== s) continue;
      this.expire(s.id, "engine_gone", { pid: p.id.pid, detectedBy });
      n++;
    }
    for (const s of [...p.ownerOf]) {
      if (this.registry.get(s.id) !== s) continue;
      this.expire(s.id, "owner_gone", { pid: p.id.pid, detectedBy });
      n++;
    }
    return n;
  }

  start(): void {
    this.running = true;
    this.arm();
    // protect: a pass still sampling CPU when the next is due makes that one skip.
    this.cron = new Cron(this.livenessSchedule, { protect: true }, async () => {
      if (this.processes.size === 0) return; // no live session: nothing to read
      const at = performance.now();
      if (at < this.nextWalkAt) {
        // Between walks (livenessCpuPercent): the processes no pidfd watches are checked one by one.
        this.checkUnwatched();
        await this.sampleCpu();
        return;
      }
      // The snapshot is read a chunk per turn: nothing of the pass scales with the host's
      // processes inside one turn of the loop (the trees are then walked in memory).
      const cost = { busyMs: 0 };
      const stats = await listStatsPaced(loopTurn, BUDGETS.statLinesPerTurn, cost);
      if (!this.running) return;
      const from = performance.now();
      this.checkLiveness(new ProcessTable(stats));
      cost.busyMs += performance.now() - from;
      this.nextWalkAt = at + cost.busyMs / this.walkShare;
      await this.sampleCpu();
    });
  }

  stop(): void {
    this.running = false;
    this.cancelTimer?.();
    this.cancelTimer = null;
    this.armedAt = Number.POSITIVE_INFINITY;
    this.cron?.stop();
    this.cron = null;
  }

  /** Releases every held pidfd (daemon stop). */
  close(): void {
    this.stop();
    for (const p of this.processes.values()) p.handle?.close();
    this.processes.clear();
  }

  /**
   * Expires every session whose deadline has passed; re-queues those that moved. Asks
   * `mayJudgeTime` first: a stall noticed there moves every deadline past now, and while the
   * store cannot commit nothing is judged (the timer is armed again by `rearm`).
   */
  expireDue(): void {
    if (!this.mayJudgeTime()) return;
    const now = this.clock.mono();
    const unfenced: { at: number; id: string }[] = [];
    // A storm of deadlines is fenced FENCE_BUDGET_MS of loop time at a time (a fence is a
    // transaction and an audit line, ~0.5 ms): the rest at the next turn, after the I/O that
    // arrived meanwhile (heartbeats) is read. Due sessions stay in the heap until then.
    const started = performance.now();
    let more = false;
    for (let top = this.heap.peekAt(); top !== undefined && top <= now; top = this.heap.peekAt()) {
      if (performance.now() - started > FENCE_BUDGET_MS) {
        more = true;
        break;
      }
      const entry = this.heap.pop() as { at: number; id: string };
      const s = this.registry.get(entry.id);
      if (s === undefined) continue;
      const d = this.registry.deadline(s);
      if (d.at <= now) {
        const deadline = new Date(this.registry.toWall(d.at)).toISOString();
        this.expire(s.id, d.reason, { deadline, lagMs: Math.round((now - d.at) * 1000) / 1000 });
        // Not fenced (the store failed): judged again once the store commits (rearm).
        if (this.registry.get(s.id) === s) unfenced.push(entry);
        if (!this.mayJudgeTime()) break;
      } else {
        const warning = this.registry.dueWarning(s, now);
        if (warning !== null) this.warn(s, warning);
        // A warning that could not be given (its record failed) is tried again in a second.
        const next = this.registry.nextMoment(s);
        this.heap.push(next <= now ? now + 1000 : next, s.id);
      }
    }
    // Tried again in a second (or at `rearm`, once the store commits again).
    for (const e of unfenced) this.heap.push(Math.max(e.at, now + 1000), e.id);
    if (more && this.running) {
      setImmediate(() => {
        if (this.running) this.expireDue();
      });
      return;
    }
    if (this.running) this.arm();
  }

  /**
   * Judging may resume (the store commits again): the exits seen while it could not commit
   * are expired first (engine_gone is the truth, and the heartbeat deadline has passed
   * meanwhile), then the earliest deadline gets a timer again.
   */
  rearm(): void {
    this.checkUnwatched();
    this.cancelTimer?.();
    this.cancelTimer = null;
    this.armedAt = Number.POSITIVE_INFINITY;
    if (this.running) this.arm();
  }

  /**
   * Evidence-based expiry: engine or owner process gone (exited, zombie, or pid reused).
   * The same pass over /proc refreshes every live engine's tree snapshot. The work is per
   * process, not per session: sessions sharing an engine share its snapshot. The orphan
   * sweep runs it on its own snapshot of /proc first, so the trees it counts as claimed are fresh.
   */
  checkLiveness(table?: ProcessTable): number {
    if (this.registry.size === 0) return 0;
    table ??= new ProcessTable();
    const gone: WatchedProcess[] = [];
    for (const p of this.processes.values()) {
      // Not in the snapshot: gone, unless it is alive now (a snapshot read over several turns,
      // or taken before the process was registered, does not judge a process it never saw).
      if (table.find(p.id) === undefined) {
        if (liveness(p.id) !== "alive") gone.push(p);
        continue;
      }
      if (p.engineOf.size === 0) continue;
      this.refreshTree(p, table);
      // Resident memory (the peak reported at finish), from the snapshot's stat lines.
      const rss = table.rssBytes(p.tree);
      for (const s of p.engineOf) this.registry.notePeakRss(s, rss);
    }
    // Engines first: a session whose engine and owner are both gone is engine_gone.
    gone.sort((a, b) => Number(b.engineOf.size > 0) - Number(a.engineOf.size > 0));
    let due = 0;
    for (const p of gone) due += this.processGone(p, "liveness");
    if (due > 0) this.log.debug({ expired: due }, "liveness check");
    return due;
  }

  /**
   * The processes no pidfd watches (none held, or the kernel has none), and those whose exit
   * was seen but whose sessions are still live (the store could not commit): each checked now.
   */
  private checkUnwatched(): void {
    // Every tick, so no copy of the whole map: usually none lacks a pidfd.
    const gone: WatchedProcess[] = [];
    for (const p of this.processes.values()) {
      if ((p.handle === null || p.exited) && liveness(p.id) !== "alive") gone.push(p);
    }
    gone.sort((a, b) => Number(b.engineOf.size > 0) - Number(a.engineOf.size > 0));
    for (const p of gone) this.processGone(p, "liveness");
  }

  /**
   * Busy CPU counts as activity (long computations must not be culled as idle): for live
   * sessions whose profile sets busy_cpu_percent, the CPU of the session as a whole since the
   * previous sample (percent of one core): its cgroup's cpu.stat when contained, else the sum
   * over its tracked tree (the engine and every process the liveness pass found under it: a
   * PostgreSQL backend, a Chromium renderer), read in one batched pidusage call. Above the
   * threshold, activity moves to now. Heartbeat timeouts are untouched: a spinning engine
   * whose client is gone is still reaped. Nothing is read when no profile sets it. Returns
   * how many sessions were found busy.
   */
  async sampleCpu(sessions: readonly LiveSession[] = [...this.cpuWatched.values()]): Promise<number> {
    if (sessions.length === 0) return 0;
    // An uncontained tree near its idle deadline gains the engine's descendants born since
    // the last walk (a backend forked for a query after registration): walks are spaced
    // (livenessCpuPercent), and a session whose only activity is a new process's CPU must not
    // be judged idle meanwhile. Read through the tree's children files (the tree's cost, not
    // the host's), and only within IDLE_LOOKAHEAD_MS of the idle deadline: a newcomer's CPU
    // counts whole in its first window, so a late look misses none of it.
    const soon = this.clock.mono() + IDLE_LOOKAHEAD_MS;
    for (const s of sessions) {
      if (s.cgroup === null && s.activityMono + s.idleTimeoutSec * 1000 <= soon) this.addDescendants(s.engine);
    }
    const pids = new Set<number>();
    for (const s of sessions) if (s.cgroup === null) for (const p of members(s)) pids.add(p.pid);
    // A pid that is gone comes back null (pidusage's types omit it).
    let stats: Record<string, pidusage.Status | null> = {};
    try {
      if (pids.size > 0) stats = await pidusage([...pids]);
    } catch (err) {
      this.log.warn({ err }, "engine CPU sampling failed");
      return 0;
    }
    const at = performance.now();
    let busy = 0;
    for (const s of sessions) {
      if (this.registry.get(s.id) !== s || s.busyCpuPercent === null) continue; // fenced
      const prev = s.cpuSample;
      if (prev !== undefined && at - prev.atMs < MIN_CPU_WINDOW_MS) continue;
      const next = cpuNow(s, stats, at);
      if (next === null) continue; // gone
      this.registry.setCpuSample(s, next);
      if (prev === undefined) continue; // a baseline
      if ((cpuSince(prev, next) / (at - prev.atMs)) * 100 > s.busyCpuPercent) {
        this.registry.active(s);
        busy++;
      }
    }
    if (busy > 0) this.log.debug({ busy }, "busy engines counted as active");
    return busy;
  }

  private arm(): void {
    const next = this.heap.peekAt();
    if (next === undefined || next >= this.armedAt) return;
    this.cancelTimer?.();
    this.armedAt = next;
    this.cancelTimer = this.clock.at(next, () => {
      this.cancelTimer = null;
      this.armedAt = Number.POSITIVE_INFINITY;
      this.expireDue();
    });
  }
}
