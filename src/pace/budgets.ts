/**
 * Every knob of how the daemon shares its one event loop, in one place. The loop answers
 * heartbeats; everything else that takes it (a storm's reaps, the detector's fences, walks of
 * /proc, the write-behind) gives it back often enough that a heartbeat waits for a few
 * milliseconds of that work, never for all of it. Figures 7 and 10 (docs/benchmarks.md)
 * measure what these buy.
 */
export const BUDGETS = {
  /** Loop time the paced work (loopTurn: a reap's step, a poll's wake-up, a reading's answer) may take per turn. */
  turnMs: 5,
  /** Paced waiters let go per turn at most, even within turnMs. */
  turnWaiters: 64,
  /** Loop time the detector may spend fencing due sessions (a transaction and an audit line each, ~0.5 ms) before it yields. */
  fenceMs: 8,
  /** Processes whose files a shared /proc walk reads between two paced turns (about a millisecond's work). */
  walkProcessesPerTurn: 8,
  /** /proc/<pid>/stat lines a liveness snapshot reads between two pauses. */
  statLinesPerTurn: 256,
  /** Heartbeat records per write-behind transaction: a few ms of the loop each. */
  flushRecords: 500,
  /** A shared reading of the host (a walk of /proc, the network tables) begins at most this often. */
  readEveryMs: 100,
} as const;
