/**
 * Why a process does not die: what the kernel said of a process that outlived its SIGKILL,
 * as an `unkillable` leftover carries it (src/proc/evidence.ts reads it, src/cleanup/terminate.ts
 * keeps it). A process in uninterruptible sleep (a hung NFS server, a cgroup v1 freezer, a
 * driver that never returns) takes its SIGKILL only when it wakes: the leftover says where it
 * sleeps, so that an operator knows what to fix, not only that something is left.
 */

/** One reading of /proc/<pid>/: each field null when its file could not be read. */
export interface ProcessReading {
  /** When it was read, ms since the epoch. */
  readonly at: number;
  /** /proc/<pid>/stat field 3: R, S, D (uninterruptible sleep), T, Z, … */
  readonly state: string | null;
  /** /proc/<pid>/wchan: the kernel function it sleeps in ("0" while it runs). */
  readonly wchan: string | null;
  /** /proc/<pid>/syscall: the system call it is in and its arguments, "running", or "-1 …" (none). */
  readonly syscall: string | null;
  /** /proc/<pid>/stack, its first lines (root only; null where the kernel or the daemon's capabilities do not allow it). */
  readonly stack: readonly string[] | null;
  /** Lines of the stack left out (it is cut to its innermost frames). */
  readonly stackOmitted?: number;
  /** /proc/<pid>/cgroup: every hierarchy's cgroup ("7:freezer:/batch", "0::/…"). */
  readonly cgroups: readonly string[];
}

/** The evidence an `unkillable` leftover carries: readings before the kill and after the wait. */
export interface UnkillableEvidence {
  /** Read just before its first SIGKILL (null: not read, the reap had read enough processes already). */
  readonly before: ProcessReading | null;
  /** Read once the wait for it to die was over. */
  readonly after: ProcessReading;
  /** ms since the epoch: the first reading that saw it in `after.state` (it has been so at least since). */
  readonly stateSince: number;
  /** Seconds in that state, at least (from `stateSince` to `after.at`). */
  readonly inStateSec: number;
  /** Seconds from its first SIGKILL to `after.at`. */
  readonly sinceKillSec: number;
}
