import type { SocketSnapshot } from "../proc/sockets.js";
import type { UsageSample } from "../proc/usage.js";
import type { ProcessIdentity, StepName, StepResult } from "../model/session.js";

/**
 * The step journal's protocol: what each step writes into its `detail` that a later step (or
 * a resumed pipeline, after a restart) reads back. One type per step; every record carries
 * the version it was written in (`v`), and records written before versions existed are v1,
 * which had the same fields (so every reader accepts both as they are).
 *
 * v1: the fields below, without `v`. v2: `v`, fence `peaks`, terminate `usage` and `cgroup`.
 * v3: close-environment `portInodes`.
 */
export const JOURNAL_VERSION = 3;

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
}

export interface TerminateDetail {
  /** Every process terminate handled (pid and start time; the boot is the session's). */
  readonly processes?: readonly { readonly pid: number; readonly startTime: number }[];
  /** What the session used, read before the first signal. */
  readonly usage?: UsageSample;
  readonly cgroup?: { readonly path: string; readonly kill: string; readonly removed: boolean };
}

/** The fields read back, per step. */
export interface StepDetails {
  readonly fence: FenceDetail;
  readonly "close-environment": CloseEnvironmentDetail;
  readonly terminate: TerminateDetail;
  readonly "release-connections-and-ports": Record<string, unknown>;
  readonly "remove-paths": Record<string, unknown>;
  readonly finish: Record<string, unknown>;
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
export function journaled<N extends StepName>(journal: Journal, name: N): StepDetails[N] | undefined {
  const detail = journal.get(name)?.detail;
  if (detail === undefined) return undefined;
  const out: Record<string, unknown> = { ...detail };
  for (const key of ["processes"]) {
    if (!(key in out)) continue;
    const v = out[key];
    if (Array.isArray(v)) out[key] = v.filter(isProcess);
    else delete out[key];
  }
  return out as unknown as StepDetails[N];
}
