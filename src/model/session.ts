/** The domain's words, one name each, shared by the store, the API and the audit trail. */

import type { UnkillableEvidence } from "./evidence.js";

/**
 * The environment variable that marks every process of a session, wherever it is re-parented
 * (`reaperctl run` and ReaperClient.spawn set it; launchers that spawn engines should too).
 */
export const SESSION_COOKIE = "REAPER_SESSION_ID";

export interface ProcessIdentity {
  readonly pid: number;
  /** /proc/<pid>/stat field 22: clock ticks after boot at which the process started. */
  readonly startTime: number;
  readonly bootId: string;
  readonly uid: number;
}

/** A process named for good within one boot, as a map key: "pid:startTime". */
export function processKey(p: { readonly pid: number; readonly startTime: number }): string {
  return `${p.pid}:${p.startTime}`;
}

/**
 * `damaged`: a live session whose engine the daemon cannot identify, because the stored values
 * of its identity (engine_pid, engine_start_time, engine_boot_id, engine_uid) cannot be read.
 * Nothing watches it and nothing is signalled for it; it leaves the state by an operator's
 * force-reap or a close (then reaped with nothing signalled, outcome `failed`), or by a repair
 * of its row (live again at the next start). Derived from the row, never written: see
 * src/store/columns.ts.
 */
export type SessionState = "live" | "reaping" | "reaped" | "damaged";
export const SESSION_STATES = ["live", "reaping", "reaped", "damaged"] as const satisfies readonly SessionState[];

export const REASONS = [
  "heartbeat_timeout",
  "idle_timeout",
  "max_lifetime",
  "owner_gone",
  "engine_gone",
  "closed",
  "forced",
  "orphaned",
  // Reclaimed while the host's memory pressure held ([pressure]): an idle session, largest first.
  "memory_pressure",
] as const;
export type Reason = (typeof REASONS)[number];
export type TimeReason = "heartbeat_timeout" | "idle_timeout" | "max_lifetime";
/** What a warning (profiles.NAME.warn_before_sec) is given for: a deadline, or a reclaim under memory pressure. */
export type WarnReason = "idle_timeout" | "max_lifetime" | "memory_pressure";

export type Outcome = "clean" | "partial" | "failed";

export const STEP_NAMES = [
  "fence",
  "close-environment",
  "terminate",
  "release-connections-and-ports",
  "remove-paths",
  "finish",
] as const;
export type StepName = (typeof STEP_NAMES)[number];
export type StepOutcome = "ok" | "failed" | "timeout";

export interface Leftover {
  readonly step: StepName;
  /** `unkillable`: a process still alive profiles.NAME.unkillable_timeout_sec after its SIGKILL. */
  readonly kind: "process" | "port" | "socket" | "path" | "ipc" | "hook" | "unkillable";
  readonly item: string;
  readonly detail: string;
  /** A process found alive by the verification pass: who it is and why it counts. */
  readonly pid?: number;
  readonly comm?: string;
  readonly uid?: number;
  readonly why?: string;
  /** An unkillable process's start time: with `pid` and the engine's boot, what the daemon watches it by. */
  readonly startTime?: number;
  /** Why an unkillable process does not die (src/model/evidence.ts); kept for the first few of a reap. */
  readonly evidence?: UnkillableEvidence;
}

export interface StepResult {
  readonly name: StepName;
  readonly outcome: StepOutcome;
  readonly startedAt: number;
  readonly durationMs: number;
  readonly detail: Record<string, unknown> & { leftovers?: Leftover[] };
  /** The stored record's detail could not be read (then `detail` is empty): a resumed reap runs the step again. */
  readonly damage?: Damage;
}

/**
 * A stored value that could not be read (issue 22): bad JSON, JSON of the wrong shape, or a
 * value of the wrong type where SQLite's integrity check cannot see it. It names where it is,
 * so that an operator can look at it (`SELECT … FROM sessions WHERE seq = 12`) and repair it.
 */
export interface Damage {
  readonly table: "sessions" | "reap_steps" | "audit_events";
  /** The row's key: sessions `{ seq, id }`, reap_steps `{ session_id, name }`, audit_events `{ seq }`. */
  readonly row: Readonly<Record<string, string | number>>;
  readonly column: string;
  /** What is wrong with it (the JSON parser's message, or what the value should have been). */
  readonly error: string;
}

export interface Session {
  readonly id: string;
  readonly profile: string;
  readonly owner: string | null;
  readonly engine: ProcessIdentity;
  readonly ownerPid: ProcessIdentity | null;
  readonly ports: readonly number[];
  readonly paths: readonly string[];
  readonly labels: Readonly<Record<string, string>>;
  readonly heartbeatTimeoutSec: number;
  readonly idleTimeoutSec: number;
  readonly maxLifetimeSec: number;
  readonly createdAt: number;
  readonly lastHeartbeatAt: number;
  readonly lastActivityAt: number;
  readonly deadline: number | null;
  readonly state: SessionState;
  readonly reason: Reason | null;
  readonly outcome: Outcome | null;
  readonly leftovers: readonly Leftover[];
  readonly reapStartedAt: number | null;
  readonly reapedAt: number | null;
  /** Starts of the reap pipeline: 1, plus one per resume after a daemon crash or stop. */
  readonly reapAttempts: number;
  readonly registeredBy: RegisteredBy;
  /** How its processes are contained (null: registered before containment existed). */
  readonly containment: Containment | null;
  /** How its processes were known (null: registered before tracking was recorded). */
  readonly tracking: Tracking | null;
  /**
   * Stored values of its row that could not be read (empty for an intact row). Each damaged
   * one reads as nothing (no ports, no paths, no labels, no tree, no containment), and what
   * depends on it is treated conservatively: see docs/operations.md, "A damaged row".
   */
  readonly damage: readonly Damage[];
  /** An extension in force (POST …/extend): kept at least until then (wall ms) while live; null if none. */
  readonly extendedUntil?: number | null;
  /** While live: the warning given and still standing (session.warning), or null. */
  readonly warning?: {
    readonly reason: WarnReason;
    readonly deadline: number;
    readonly at: number;
  } | null;
}

/**
 * How a session's processes were known, strongest first (src/proc/lineage.ts):
 * - lineage: every fork since the engine's birth, from the kernel's process events connector;
 * - cgroup-from-birth: the engine's own cgroup, in which no process is older than the engine;
 * - cgroup: a cgroup the engine's tree was moved into at registration;
 * - snapshots: walks of /proc and the cookie only.
 */
export const TRACKINGS = ["lineage", "cgroup-from-birth", "cgroup", "snapshots"] as const;
export type Tracking = (typeof TRACKINGS)[number];

/** How a session is contained: see src/proc/containment.ts. */
export type Containment =
  | { readonly kind: "cgroup"; readonly path: string; readonly made: boolean }
  | { readonly kind: "none"; readonly why: string };

/** The fields every new session starts with, before anything has happened to it. */
export const NOT_YET_REAPED = {
  state: "live",
  reason: null,
  outcome: null,
  leftovers: [],
  reapStartedAt: null,
  reapedAt: null,
  reapAttempts: 0,
  damage: [],
} as const satisfies Partial<Session>;

/**
 * Who registered a session. `uid` is the unix socket peer's uid (SO_PEERCRED), null for a
 * loopback TCP caller (a token holder) or a session from before caller identity existed.
 * `admin`: whether that caller was an administrator then; a session a non-admin registered
 * is reaped with no more power than that user has (src/auth/policy.ts).
 */
export interface RegisteredBy {
  readonly uid: number | null;
  readonly admin: boolean;
  readonly via: "unix" | "tcp" | null;
}
