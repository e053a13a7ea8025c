import { Cron } from "croner";
import pidusage from "pidusage";
import type { Logger } from "pino";
import type { Clock } from "../clock.js";
import { liveness } from "../proc/identity.js";
import { ProcessHandle } from "../proc/pidfd.js";
import { readUid } from "../proc/stat.js";
import { ProcessTable } from "../proc/tree.js";
import type { ProcessIdentity, Reason } from "../sessions/types.js";
import { deadlineOf, type Timing } from "./deadline.js";
import { DeadlineHeap } from "./heap.js";

/** The in-memory view of a live session: all that heartbeats and detection touch. */
export interface LiveSession extends Timing {
  readonly id: string;
  readonly engine: ProcessIdentity;
  readonly ownerPid: ProcessIdentity | null;
  /** Heartbeat fields changed since the last flush to SQLite. */
  dirty: boolean;
  /**
   * The deadline last written to SQLite's indexed column, if known (undefined: write it at
   * the next flush). It may lag behind the real one: see Daemon.takeDirty.
   */
  storedDeadline?: number | undefined;
  /**
   * The engine's process tree at the last liveness pass: if the engine dies, its children
   * are re-parented and only this snapshot still ties them to the session.
   */
  tree: ProcessIdentity[];
  /** The profile's busy_cpu_percent: engine CPU above it counts as activity. null = off. */
  readonly busyCpuPercent: number | null;
  /** The engine's CPU time and age (ms) at the last CPU sample: the next one measures from here. */
  cpuSample?: { readonly cpuMs: number; readonly ageMs: number } | undefined;
}

/**
 * A CPU sample closer than this to the previous one is not judged (the counters tick every
 * 10 ms, so a short window is mostly noise): the older baseline is kept for the next pass.
 */
const MIN_CPU_WINDOW_MS = 500;

export type ExpireFn = (id: string, reason: Reason, detail: Record<string, unknown>) => void;

/**
 * Finds sessions that are due. Time-based: a min-heap of deadlines and one timer armed for
 * the earliest, so expiry starts within milliseconds of the deadline instead of on a coarse
 * poll. Heartbeats never touch the heap (they only move a session's deadline later): when an
 * entry comes due, the session's current deadline is computed, and the entry is pushed back
 * if it moved. Evidence-based: while a session is live the daemon holds a pidfd on its
 * engine and owner and is woken the moment either exits; a croner job checks every identity
 * too (the fallback without pidfd, and the tree snapshots).
 */
export class Detector {
  readonly live = new Map<string, LiveSession>();
  /** Held pidfds of live engines and owners, watched for exit. */
  private readonly handles = new Map<string, ProcessHandle[]>();
  /** Live sessions whose profile sets busy_cpu_percent: the only ones the CPU sampling reads. */
  private readonly cpuWatched = new Map<string, LiveSession>();
  private readonly heap = new DeadlineHeap();
  private cancelTimer: (() => void) | null = null;
  private armedAt = Number.POSITIVE_INFINITY;
  private cron: Cron | null = null;
  private running = false;

  constructor(
    private readonly clock: Clock,
    private readonly livenessSchedule: string,
    private readonly log: Logger,
    private readonly expire: ExpireFn,
  ) {}

  add(s: LiveSession): void {
    this.live.set(s.id, s);
    this.heap.push(deadlineOf(s).at, s.id);
    const handles: ProcessHandle[] = [];
    this.watch(s, s.engine, "engine_gone", handles);
    if (s.ownerPid !== null) this.watch(s, s.ownerPid, "owner_gone", handles);
    if (handles.length > 0) this.handles.set(s.id, handles);
    if (s.busyCpuPercent !== null) {
      this.cpuWatched.set(s.id, s);
      void this.sampleCpu([s]); // the baseline: the next liveness pass can judge
    }
    if (this.running) this.arm();
  }

  /** Drops a session (fenced); its heap entry is discarded when it comes due. */
  remove(id: string): void {
    this.live.delete(id);
    this.cpuWatched.delete(id);
    for (const h of this.handles.get(id) ?? []) h.close();
    this.handles.delete(id);
  }

  /**
   * Holds a pidfd on the process and asks to be woken when it exits. The identity is checked
   * after the pidfd is open (so it is the identity of the process the pidfd holds): after a
   * restart, a pid now worn by another process is never watched, and the liveness pass reaps
   * the session instead.
   */
  private watch(s: LiveSession, id: ProcessIdentity, reason: Reason, into: ProcessHandle[]): void {
    const handle = ProcessHandle.open(id.pid);
    if (handle === null) return; // no pidfd here, or already gone: the liveness pass decides
    if (liveness(id) !== "alive" || readUid(id.pid) !== id.uid) {
      handle.close();
      return;
    }
    handle.onExit(() => {
      try {
        if (this.live.get(s.id) === s) this.expire(s.id, reason, { pid: id.pid, detectedBy: "pidfd" });
      } catch (err) {
        this.log.error({ err, sessionId: s.id }, "expiry on process exit failed");
      }
    });
    into.push(handle);
  }

  /** A heartbeat: O(1), in memory. `busy` moves activity too. */
  heartbeat(id: string, busy: boolean): LiveSession | undefined {
    const s = this.live.get(id);
    if (s === undefined) return undefined;
    const now = this.clock.now();
    s.lastHeartbeatAt = now;
    if (busy) s.lastActivityAt = now;
    s.dirty = true;
    return s;
  }

  start(): void {
    this.running = true;
    this.arm();
    // protect: a pass still sampling CPU when the next is due makes that one skip.
    this.cron = new Cron(this.livenessSchedule, { protect: true }, async () => {
      this.checkLiveness();
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
    for (const list of this.handles.values()) for (const h of list) h.close();
    this.handles.clear();
  }

  /** Expires every session whose deadline has passed; re-queues those that moved. */
  expireDue(): void {
    const now = this.clock.now();
    for (let top = this.heap.peekAt(); top !== undefined && top <= now; top = this.heap.peekAt()) {
      const entry = this.heap.pop() as { at: number; id: string };
      const s = this.live.get(entry.id);
      if (s === undefined) continue;
      const d = deadlineOf(s);
      if (d.at <= now) {
        this.expire(s.id, d.reason, { deadline: new Date(d.at).toISOString(), lagMs: now - d.at });
      } else {
        this.heap.push(d.at, s.id);
      }
    }
    if (this.running) this.arm();
  }

  /**
   * Evidence-based expiry: engine or owner process gone (exited, zombie, or pid reused).
   * The same pass over /proc refreshes every live engine's tree snapshot.
   */
  checkLiveness(): number {
    if (this.live.size === 0) return 0;
    const table = new ProcessTable();
    const due: [string, Reason, ProcessIdentity][] = [];
    for (const s of this.live.values()) {
      if (table.find(s.engine) === undefined) due.push([s.id, "engine_gone", s.engine]);
      else if (s.ownerPid !== null && table.find(s.ownerPid) === undefined) due.push([s.id, "owner_gone", s.ownerPid]);
      else s.tree = table.tree(s.engine, s.tree);
    }
    for (const [id, reason, proc] of due) {
      if (this.live.has(id)) this.expire(id, reason, { pid: proc.pid, detectedBy: "liveness" });
    }
    if (due.length > 0) this.log.debug({ expired: due.length }, "liveness check");
    return due.length;
  }

  /**
   * Busy CPU counts as activity (long computations must not be culled as idle): for live
   * sessions whose profile sets busy_cpu_percent, one batched pidusage read of the engines;
   * an engine whose CPU since the previous sample (percent of one core) is above the
   * threshold gets its activity moved to now. Heartbeat timeouts are untouched: a spinning
   * engine whose client is gone is still reaped. Nothing is read when no profile sets it.
   * Returns how many sessions were found busy.
   */
  async sampleCpu(sessions: readonly LiveSession[] = [...this.cpuWatched.values()]): Promise<number> {
    if (sessions.length === 0) return 0;
    // A pid that is gone comes back null (pidusage's types omit it).
    let stats: Record<string, pidusage.Status | null>;
    try {
      stats = await pidusage(sessions.map((s) => s.engine.pid));
    } catch (err) {
      this.log.warn({ err }, "engine CPU sampling failed");
      return 0;
    }
    const now = this.clock.now();
    let busy = 0;
    for (const s of sessions) {
      const u = stats[s.engine.pid];
      if (this.live.get(s.id) !== s || s.busyCpuPercent === null || !u) continue; // fenced, or gone
      const prev = s.cpuSample;
      const windowMs = prev === undefined ? 0 : u.elapsed - prev.ageMs;
      if (prev !== undefined && windowMs >= 0 && windowMs < MIN_CPU_WINDOW_MS) continue;
      s.cpuSample = { cpuMs: u.ctime, ageMs: u.elapsed };
      // No previous sample, or a younger process under that pid (the liveness pass reaps it):
      // this one is a baseline.
      if (prev === undefined || windowMs < 0) continue;
      if (((u.ctime - prev.cpuMs) / windowMs) * 100 > s.busyCpuPercent) {
        s.lastActivityAt = now;
        s.dirty = true;
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
