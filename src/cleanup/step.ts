import type { Logger } from "pino";
import type { Profile } from "../config/load.js";
import type { Leftover, ProcessIdentity, Session, StepName, StepResult } from "../model/session.js";
import { loopTurn } from "../pace/turns.js";
import { journaled, type Journal, type StepDetails, type StepRecord } from "./journal.js";

export interface StepContext<N extends StepName = StepName> {
  readonly session: Session;
  readonly profile: Profile;
  /** Bound to sessionId and step. */
  readonly log: Logger;
  readonly daemonPid: number;
  /** Results of the steps already journaled for this session (also from before a restart). */
  readonly journal: ReadonlyMap<StepName, StepResult>;
  /** performance.now() value by which the step must have returned. */
  readonly deadline: number;
  /** Which start of this session's reap pipeline this is (1 unless resumed after a crash). */
  readonly attempt: number;
  /**
   * Journals fields with the step's result even if the step then times out or throws (a
   * snapshot taken before a hook that hangs must not be lost).
   */
  record(fields: Partial<StepDetails[N]>): void;
  /** The session's members by lineage: every process the engine started (src/proc/lineage.ts). */
  readonly lineage: SessionMembers;
}

/** A session's members by lineage, as the steps and the verification see them. */
export interface SessionMembers {
  /** The live members now, after every fork the kernel reported before the call; none without lineage. */
  members(): ProcessIdentity[];
  /** CPU seconds of members that exited and were reaped outside the session (their CPU is in no live member's). */
  exitedCpuSec(): number;
  /** Every fork since the engine's birth is known (its tracking is still "lineage"). */
  complete(): boolean;
}

export interface StepOutput<N extends StepName = StepName> {
  /** The step did what it is for (leftovers may still be reported, e.g. an outsider's port). */
  readonly ok: boolean;
  /** Its record (journal.ts): the runner adds the version, what `record` kept and the leftovers. */
  readonly detail: StepRecord<N>;
  readonly leftovers?: Leftover[];
}

/**
 * One step of the cleanup pipeline. A step is idempotent (already done = success), never
 * throws past the runner (which catches and records anyway), and honours `signal`, which
 * aborts when its own timeout passes.
 */
export interface CleanupStep<N extends StepName = StepName> {
  readonly name: N;
  timeoutMs(profile: Profile): number;
  run(ctx: StepContext<N>, signal: AbortSignal): Promise<StepOutput<N>>;
}

/**
 * Processes journaled as part of the session by earlier steps (the fence's last liveness
 * snapshot, close-environment's snapshot before the hook): the engine's children stay
 * reachable even after the engine exited and they were re-parented.
 */
export function knownProcesses(journal: Journal): ProcessIdentity[] {
  return [
    ...(journaled(journal, "fence")?.processes ?? []),
    ...(journaled(journal, "close-environment")?.processes ?? []),
  ];
}

/**
 * A step's poll interval: the timer, then a paced turn (src/pace/turns.ts), so that a
 * storm's polls (hundreds of reaps waking in the same turn) share the loop with heartbeats.
 */
export async function sleep(ms: number): Promise<void> {
  await new Promise((r) => setTimeout(r, Math.max(0, ms)));
  await loopTurn();
}
