import { journaled, type Journal } from "./journal.js";
import type { SessionMembers } from "./step.js";

/**
 * A port number is not an identity. On a busy host an ephemeral port the engine released is
 * soon bound again by some other program; a registered port held at verification time by
 * such a newcomer is not something of the session left behind, and calling the session
 * `partial` for it (or, worse, signalling the newcomer) would be wrong. The newcomer is told
 * apart by identity, and only when every one of these holds:
 *
 * - lineage saw every fork of the engine (`complete`), so a process it does not name as a
 *   member was not started by the engine or any of its descendants;
 * - the holder started after the terminate step ended (its start time, in clock ticks after
 *   boot, later than the one terminate journaled when it was done), so it is not a process
 *   that held the port all along;
 * - none of the sockets it holds on the port is one of the engine's own (close-environment's
 *   snapshot, taken complete), so it did not inherit or receive the engine's socket.
 *
 * Anything less (no lineage, an older journal without the end tick, a snapshot that left
 * sockets out) keeps the holder a leftover, as before.
 */
export interface ReuseEvidence {
  /** Clock ticks after boot when terminate ended; absent from older journals. */
  readonly terminateEndedTicks: number | undefined;
  readonly lineageComplete: boolean;
  /** The inodes of the engine's own sockets, or null when the snapshot is missing or incomplete. */
  readonly engineInodes: ReadonlySet<number> | null;
}

export function reuseEvidence(journal: Journal, lineage: SessionMembers): ReuseEvidence {
  const ended = journaled(journal, "terminate")?.endedTicks;
  const snap = journaled(journal, "close-environment")?.sockets;
  const complete =
    snap !== undefined &&
    Array.isArray(snap.listening) &&
    Array.isArray(snap.established) &&
    (snap.omitted === undefined || snap.omitted.listening + snap.omitted.established === 0);
  return {
    terminateEndedTicks: Number.isSafeInteger(ended) ? ended : undefined,
    lineageComplete: lineage.complete(),
    // No snapshot at all: close-environment found the engine gone, so it held no socket to pass on.
    engineInodes:
      snap === undefined
        ? new Set()
        : complete
          ? new Set([...snap.listening, ...snap.established].map((s) => s.inode))
          : null,
  };
}

/**
 * Whether a process outside the session that holds `inodes` on a registered port took the
 * port after the session was gone (see above): then it is reported as a reuse, not a leftover.
 */
export function tookPortAfter(
  holder: { readonly startTime: number },
  inodes: Iterable<number>,
  e: ReuseEvidence,
): boolean {
  if (!e.lineageComplete || e.terminateEndedTicks === undefined || e.engineInodes === null) return false;
  if (holder.startTime <= e.terminateEndedTicks) return false;
  for (const inode of inodes) if (e.engineInodes.has(inode)) return false;
  return true;
}
