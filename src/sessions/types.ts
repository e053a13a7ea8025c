/** The domain's words, one name each, shared by the store, the API and the audit trail. */

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

export type SessionState = "live" | "reaping" | "reaped";

export const REASONS = [
  "heartbeat_timeout",
  "idle_timeout",
  "max_lifetime",
  "owner_gone",
  "engine_gone",
  "closed",
  "forced",
  "orphaned",
] as const;
export type Reason = (typeof REASONS)[number];
export type TimeReason = "heartbeat_timeout" | "idle_timeout" | "max_lifetime";

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
  readonly kind: "process" | "port" | "socket" | "path" | "ipc" | "hook";
  readonly item: string;
  readonly detail: string;
  /** A process found alive by the verification pass: who it is and why it counts. */
  readonly pid?: number;
  readonly comm?: string;
  readonly uid?: number;
  readonly why?: string;
}

export interface StepResult {
  readonly name: StepName;
  readonly outcome: StepOutcome;
  readonly startedAt: number;
  readonly durationMs: number;
  readonly detail: Record<string, unknown> & { leftovers?: Leftover[] };
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
