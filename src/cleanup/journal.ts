import type { SocketSnapshot } from "../proc/sockets.js";
import type { UsageSample } from "../proc/usage.js";
import type { Leftover, Outcome, ProcessIdentity, StepName, StepResult, Tracking } from "../model/session.js";
import type { HookReport } from "./release-hooks.js";

/**
 * The step journal's protocol: what each step writes into its `detail`, for a later step, a
 * resumed pipeline after a restart, the API and the audit trail. One type per step, written
 * through `StepOutput<N>` and read through `journaled` (the one reader); every record carries
 * the version it was written in (`v`).
 *
 * v1: no `v`. v2: `v`, fence `peaks`, terminate `usage` and `cgroup`. v3: close-environment
 * `portInodes`. Each version only added optional fields, so an older record is upgraded by
 * saying so (`upgradeRecord`): its `v` becomes the current one and `upgradedFrom` keeps the
 * one it was written in; a field a version added stays absent, and every reader treats an
 * absent field as unknown (reused-port.ts: no `portInodes`, no reuse). The daemon upgrades
 * the records of the reaps it resumes at start (daemon.ts).
 */
export const JOURNAL_VERSION = 3;

/** Fields the runner adds to every step's record. */
export interface CommonDetail {
  /** The journal version the record was written in (absent: v1). */
  readonly v?: number;
  /** The version it was written in, if it was upgraded since. */
  readonly upgradedFrom?: number;
  /** Which start of the reap pipeline wrote it. */
  readonly attempt?: number;
  readonly leftovers?: Leftover[];
  /** The step threw or timed out. */
  readonly error?: string;
  /** The step was not run (the pipeline crashed before it). */
  readonly notRun?: string;
  /**
   * Run again by the reap's resolution, once the processes it left unkillable were gone
   * (src/reaper/resolver.ts): when, ms since the epoch. The first run's record is in its reap.step event.
   */
  readonly resolution?: number;
}

export interface FenceDetail {
  /** The session's last known process tree (from the liveness pass, the engine's exit, recovery). */
  readonly processes: readonly ProcessIdentity[];
  /** The most processes and resident memory its tree was seen with. */
  readonly peaks?: { readonly processes: number; readonly rssBytes: number };
}

export interface CloseEnvironmentDetail {
  /** The tree just before the close hook. */
  readonly processes?: readonly ProcessIdentity[];
  /** Its sockets then: release-connections-and-ports verifies each one gone. */
  readonly sockets?: SocketSnapshot;
  /**
   * Every socket on a registered port at that moment, whoever held it (v3): one not among
   * them later is new (reused-port.ts).
   */
  readonly portInodes?: readonly number[];
  /** The close hooks run (argv or URL, outcome, time). */
  readonly hooks?: readonly HookReport[];
  [field: string]: unknown;
}

export interface TerminateDetail {
  /** Every process terminate handled (pid and start time; the boot is the session's). */
  readonly processes?: readonly { readonly pid: number; readonly startTime: number }[];
  /** What the session used, read before the first signal. */
  readonly usage?: UsageSample;
  readonly cgroup?: { readonly path: string; readonly kill: string; readonly removed: boolean };
  /** How many processes outlived their SIGKILL by unkillable_timeout_sec (each an `unkillable` leftover). */
  readonly unkillable?: number;
  /** The profile's unkillable hook, when it ran. */
  readonly unkillableHook?: HookReport;
  [field: string]: unknown;
}

/** Who holds a socket, as reported. */
export type Holder = { by: "session" | "outside"; pid: number; comm: string };

/** One registered port after the release step. */
export type PortReport =
  | { port: number; status: "free"; timeWait: number }
  | ({ port: number; status: "held"; proto: string; state: string } & Holder)
  /** Taken after the session was gone by a process that is not its own (reused-port.ts): not a leftover. */
  | { port: number; status: "reused"; proto: string; state: string; pid: number; comm: string }
  | { port: number; status: "bind-failed"; proto: string; error: string; timeWait: number };

/** The close-environment snapshot's sockets after the release step. */
export type SocketsReport =
  | { skipped: string }
  | { unverified: string }
  | {
      checked: number;
      gone: number;
      /** Still open, but also held since before the reap by an ancestor of the engine. */
      shared: { item: string; pids: number[] }[];
      /** Snapshot connections the kernel is still closing (FIN_WAIT, LAST_ACK, …; TIME_WAIT is listed apart). */
      closing: { item: string; state: string }[];
      survivors: ({ item: string; port?: number } & (Holder | { by: "unknown" }))[];
    };

export interface ReleaseDetail {
  /** The release hooks run. */
  readonly hooks?: readonly HookReport[];
  readonly ports?: readonly PortReport[];
  /** Why the session's ports could not be read (a damaged row). */
  readonly unreadable?: string;
  readonly sockets?: SocketsReport;
  /** Connections of the snapshot in TIME_WAIT (the kernel's, never a leftover). */
  readonly timeWait?: unknown;
}

export interface RemovePathsDetail {
  readonly paths?: readonly { path: string; status: string; detail?: string }[];
  /** Why the session's paths could not be read (a damaged row). */
  readonly unreadable?: string;
  readonly ipc?: readonly { kind: string; item: string; status: string }[];
}

/** What a session cost, reported when it ends (no peer does: a cost nobody sees is never cut). */
export interface SessionUsage {
  /** CPU seconds its processes used: the cgroup's total when contained, else the tree's at the reap. */
  readonly cpuSec: number;
  /** The most memory seen: the cgroup's memory.peak where the memory controller is on, else the largest resident sum the liveness passes and the reap saw. */
  readonly peakMemoryBytes: number;
  readonly peakMemorySource: "memory.peak" | "rss-samples";
  /** The most processes its tree was seen with. */
  readonly peakProcesses: number;
  /** From registration to the fence. */
  readonly lifetimeSec: number;
}

/** What a verification pass looked at: a `clean` is backed by exactly these. */
export type Verified = "cgroup" | "lineage" | "tree" | "cookie" | "ports" | "paths" | "ipc";

export interface FinishDetail {
  readonly outcome?: Outcome;
  readonly verified?: readonly Verified[];
  readonly tracking?: Tracking | null;
  readonly usage?: SessionUsage;
  /** Holders of a registered port that took it after the session was gone (reused-port.ts). */
  readonly portsReused?: readonly { pid: number; comm: string; why: string }[];
  readonly damage?: readonly unknown[];
  /** Why the pipeline crashed, when it did. */
  readonly crashed?: string;
}

/** What each step records, by name. */
export interface StepDetails {
  readonly fence: FenceDetail;
  readonly "close-environment": CloseEnvironmentDetail;
  readonly terminate: TerminateDetail;
  readonly "release-connections-and-ports": ReleaseDetail;
  readonly "remove-paths": RemovePathsDetail;
  readonly finish: FinishDetail;
}

/** A step's record as journaled: its own fields and the runner's. */
export type StepRecord<N extends StepName> = StepDetails[N] & CommonDetail;

/**
 * An older record as the current version reads it (see JOURNAL_VERSION): the same fields,
 * `v` the current one, `upgradedFrom` the one it was written in. A current record is
 * returned as it is.
 */
export function upgradeRecord(detail: Readonly<Record<string, unknown>>): Record<string, unknown> {
  return olderRecord(detail) ?? { ...detail };
}

/** The record upgraded to the current version, or null if it is current (the daemon's start rewrites only those). */
export function olderRecord(detail: Readonly<Record<string, unknown>>): Record<string, unknown> | null {
  const v = typeof detail.v === "number" && Number.isSafeInteger(detail.v) ? detail.v : 1;
  if (v >= JOURNAL_VERSION) return null;
  return { ...detail, v: JOURNAL_VERSION, upgradedFrom: v };
}

/** A journal as the steps see it: results by step name (also from before a restart). */
export type Journal = ReadonlyMap<StepName, StepResult>;

/** A journaled process: at least a pid and a start time (whole numbers). */
const isProcess = (p: unknown): boolean =>
  typeof p === "object" &&
  p !== null &&
  Number.isSafeInteger((p as { pid?: unknown }).pid) &&
  Number.isSafeInteger((p as { startTime?: unknown }).startTime);

/**
 * What a journaled step recorded, typed, or undefined if that step has no record yet. Array
 * fields that a damaged or foreign record holds as something else read as absent, and their
 * items that are no process are left out (a reap must never crash on its own journal).
 */
export function journaled<N extends StepName>(journal: Journal, name: N): StepRecord<N> | undefined {
  const detail = journal.get(name)?.detail;
  if (detail === undefined) return undefined;
  const out = upgradeRecord(detail);
  for (const key of ["processes"]) {
    if (!(key in out)) continue;
    const v = out[key];
    if (Array.isArray(v)) out[key] = v.filter(isProcess);
    else delete out[key];
  }
  // The one place a stored record becomes a typed one: the store holds JSON.
  return out as StepRecord<N>;
}
