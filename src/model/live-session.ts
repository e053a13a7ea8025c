import type { Timing } from "./deadline.js";
import type { ProcessIdentity, RegisteredBy, WarnReason } from "./session.js";

/**
 * The in-memory view of a live session: all that heartbeats and detection touch. Owned by
 * `LiveSessions` (src/sessions/live.ts): built there (admit, recover), changed only through
 * its methods (heartbeat, active, setTree, notePeakRss, setCpuSample); everyone else gets
 * this read-only view.
 *
 * Two sets of times: the `…Mono` fields (Timing) are monotonic and decide the deadline; the
 * `…At` fields are the wall clock at the same moments, for the record (SQLite, the API).
 */
export interface LiveSession extends Timing {
  readonly id: string;
  readonly engine: ProcessIdentity;
  readonly ownerPid: ProcessIdentity | null;
  /** Who registered it: heartbeats are checked against this without touching SQLite. */
  readonly registeredBy: RegisteredBy;
  /** The profile's busy_cpu_percent: engine CPU above it counts as activity. null = off. */
  readonly busyCpuPercent: number | null;
  /** How long before an idle or lifetime deadline it is warned (profiles.NAME.warn_before_sec); 0 = never. */
  readonly warnBeforeSec: number;
  /** The extension's end on the wall clock (POST …/extend), for the record; null if never extended. */
  readonly extendedUntil: number | null;
  /** The warning given and still standing, if any (see LiveSessions.warningOf: activity voids it). */
  readonly warning: SessionWarning | null;
  readonly createdAt: number;
  readonly lastHeartbeatAt: number;
  readonly lastActivityAt: number;
  /**
   * The engine's process tree at the last liveness pass: if the engine dies, its children
   * are re-parented and only this snapshot still ties them to the session.
   */
  readonly tree: readonly ProcessIdentity[];
  /** The session's CPU at the last sample (busy_cpu_percent): the next one measures from here. */
  readonly cpuSample?: CpuSample | undefined;
  /** The session's own cgroup (containment), or null: where its CPU is read. */
  readonly cgroup: string | null;
  /** The resident memory its tree was last seen with (a liveness pass): memory pressure's first pick. */
  readonly lastRssBytes: number;
  /** The most processes and the most resident memory its tree was seen with (usage at finish). */
  readonly peaks: { readonly processes: number; readonly rssBytes: number };
  /**
   * The deadline (wall ms) last written to SQLite's indexed column, if known (undefined:
   * write it at the next flush). It may lag behind the real one: see `takeDirty`.
   */
  readonly storedDeadline?: number | undefined;
}

/** A warning given to a live session (session.warning): what it was for, and when. */
export interface SessionWarning {
  readonly reason: WarnReason;
  /** The deadline warned of, monotonic ms (the idle or lifetime deadline it was given for). */
  readonly deadlineMono: number;
  /** The same deadline on the wall clock, and when the warning was given (wall ms). */
  readonly deadline: number;
  readonly at: number;
  /** When it was given, monotonic ms: activity after this voids a memory-pressure warning. */
  readonly atMono: number;
}

/** CPU ms used by a session up to `atMs` (performance.now()), as a whole or per process ("pid:startTime"). */
export interface CpuSample {
  readonly atMs: number;
  readonly cpuMs: number;
  readonly perProcess?: ReadonlyMap<string, number> | undefined;
}

/** What a registration (or the orphan sweep's adoption) decides about a new live session. */
export interface Admission {
  readonly id: string;
  readonly engine: ProcessIdentity;
  readonly ownerPid: ProcessIdentity | null;
  readonly registeredBy: RegisteredBy;
  readonly busyCpuPercent: number | null;
  readonly heartbeatTimeoutSec: number;
  readonly idleTimeoutSec: number;
  readonly maxLifetimeSec: number;
  /** The profile's warn_before_sec (0: never warned); see LiveSessions.admit for the cap. */
  readonly warnBeforeSec?: number | undefined;
  /** An extension in force (wall ms), from the stored row at recovery. */
  readonly extendedUntil?: number | null | undefined;
  /** The session's own cgroup (containment), if it has one. */
  readonly cgroup?: string | null | undefined;
  /** The deadline the registration wrote to the indexed column, if it wrote one. */
  readonly storedDeadline?: number | undefined;
  /** When it was registered (`stamp()` taken for its row); default now. */
  readonly at?: Stamp | undefined;
  /** Its process tree as seen at registration. */
  readonly tree?: readonly ProcessIdentity[] | undefined;
}

/** One moment on both clocks (see LiveSessions.stamp). */
export interface Stamp {
  readonly wall: number;
  readonly mono: number;
}

/** A live session as the store holds it, for recovery at start. */
export interface StoredLive extends Omit<Admission, "storedDeadline" | "at" | "tree"> {
  /** The tree last made durable (see LiveSessions.setTree). */
  readonly tree: readonly ProcessIdentity[];
  readonly peaks?: { processes: number; rssBytes: number } | undefined;
  readonly createdAt: number;
  readonly lastHeartbeatAt: number;
  readonly lastActivityAt: number;
  readonly deadline: number | null;
}

/** What the write-behind hands to the store: the record's times, and a deadline to index. */
export interface HeartbeatWrite {
  id: string;
  lastHeartbeatAt: number;
  lastActivityAt: number;
  /** The new stored deadline (wall ms), or null to leave the indexed column as it is. */
  deadline: number | null;
  /** The engine's tree, when it changed since the last write (kept durable for a restart). */
  tree?: readonly ProcessIdentity[];
}
