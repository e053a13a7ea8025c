import type { TimeReason } from "../sessions/types.js";

/** What time-based expiry needs to know about a live session. */
export interface Timing {
  readonly createdAt: number;
  lastHeartbeatAt: number;
  lastActivityAt: number;
  readonly heartbeatTimeoutSec: number;
  readonly idleTimeoutSec: number;
  /** 0 = no maximum lifetime. */
  readonly maxLifetimeSec: number;
  /**
   * The daemon start that recovered this session, or 0 for a session registered since.
   * Downtime never counts against a session (etcd's lease refresh on leader change): every
   * time-based timeout must elapse again after recovery.
   */
  readonly recoveredAt: number;
}

export interface Deadline {
  readonly at: number;
  readonly reason: TimeReason;
}

/** min(heartbeat + timeout, activity + idle timeout, created + max lifetime), each floored at recovery + timeout. */
export function deadlineOf(t: Timing): Deadline {
  const from = (since: number, sec: number): number => Math.max(since, t.recoveredAt) + sec * 1000;
  let best: Deadline = { at: from(t.lastHeartbeatAt, t.heartbeatTimeoutSec), reason: "heartbeat_timeout" };
  const idle = from(t.lastActivityAt, t.idleTimeoutSec);
  if (idle < best.at) best = { at: idle, reason: "idle_timeout" };
  if (t.maxLifetimeSec > 0) {
    const life = from(t.createdAt, t.maxLifetimeSec);
    if (life < best.at) best = { at: life, reason: "max_lifetime" };
  }
  return best;
}
