import type { TimeReason } from "./session.js";

/**
 * What time-based expiry needs to know about a live session, on the monotonic clock
 * (Clock.mono): a wall-clock step moves none of these.
 */
export interface Timing {
  /** Registration, or the daemon start that recovered the session. */
  readonly createdMono: number;
  readonly heartbeatMono: number;
  readonly activityMono: number;
  readonly heartbeatTimeoutSec: number;
  readonly idleTimeoutSec: number;
  /** 0 = no maximum lifetime. */
  readonly maxLifetimeSec: number;
  /**
   * An extension (POST /v1/sessions/{id}/extend): the idle deadline is at least this
   * (monotonic ms); -Infinity when never extended. The heartbeat and lifetime deadlines do not move.
   */
  readonly extendedUntilMono?: number;
}

export interface Deadline {
  /** Monotonic ms. */
  readonly at: number;
  readonly reason: TimeReason;
}

/**
 * min(heartbeat + timeout, activity + idle timeout, created + max lifetime), each measured
 * from no earlier than `floor`: the last moment the daemon came back from downtime (a
 * restart, a stall of its loop, a store that could not commit). Downtime never counts
 * against a session (etcd's lease refresh on leader change): every time-based timeout must
 * elapse again after it. The heartbeat timeout is also measured from no earlier than
 * `heartbeatFloor`: the last moment the daemon turned connections away (src/detect/crowd.ts).
 */
export function deadlineOf(
  t: Timing,
  floor = Number.NEGATIVE_INFINITY,
  heartbeatFloor = Number.NEGATIVE_INFINITY,
): Deadline {
  const from = (since: number, sec: number): number => Math.max(since, floor) + sec * 1000;
  const best: Deadline = {
    at: from(Math.max(t.heartbeatMono, heartbeatFloor), t.heartbeatTimeoutSec),
    reason: "heartbeat_timeout",
  };
  const warnable = warnableDeadline(t, floor);
  return warnable.at < best.at ? warnable : best;
}

/**
 * The deadline a warning is given for (profiles.NAME.warn_before_sec): min(idle, lifetime),
 * both measured as in `deadlineOf`. A heartbeat timeout is never warned of: its client is gone.
 */
export function warnableDeadline(t: Timing, floor = Number.NEGATIVE_INFINITY): Deadline {
  const from = (since: number, sec: number): number => Math.max(since, floor) + sec * 1000;
  const idle = Math.max(from(t.activityMono, t.idleTimeoutSec), t.extendedUntilMono ?? Number.NEGATIVE_INFINITY);
  let best: Deadline = { at: idle, reason: "idle_timeout" };
  if (t.maxLifetimeSec > 0) {
    const life = from(t.createdMono, t.maxLifetimeSec);
    if (life < best.at) best = { at: life, reason: "max_lifetime" };
  }
  return best;
}
