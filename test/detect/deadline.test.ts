import assert from "node:assert/strict";
import { test } from "node:test";
import { deadlineOf, type Timing } from "../../src/detect/deadline.js";

const T0 = Date.UTC(2026, 0, 1);
const S = 1000;

function timing(over: Partial<Timing> = {}): Timing {
  return {
    createdAt: T0,
    lastHeartbeatAt: T0,
    lastActivityAt: T0,
    heartbeatTimeoutSec: 30,
    idleTimeoutSec: 3600,
    maxLifetimeSec: 0,
    recoveredAt: 0,
    ...over,
  };
}

test("heartbeat timeout wins when it is the earliest", () => {
  assert.deepEqual(deadlineOf(timing()), { at: T0 + 30 * S, reason: "heartbeat_timeout" });
  assert.deepEqual(deadlineOf(timing({ lastHeartbeatAt: T0 + 5 * S, maxLifetimeSec: 100 })), {
    at: T0 + 35 * S,
    reason: "heartbeat_timeout",
  });
});

test("idle timeout wins when activity is old even though heartbeats are fresh", () => {
  assert.deepEqual(deadlineOf(timing({ lastHeartbeatAt: T0 + 100 * S, idleTimeoutSec: 60, heartbeatTimeoutSec: 30 })), {
    at: T0 + 60 * S,
    reason: "idle_timeout",
  });
});

test("max lifetime wins when it is the earliest", () => {
  assert.deepEqual(
    deadlineOf(timing({ lastHeartbeatAt: T0 + 100 * S, lastActivityAt: T0 + 100 * S, maxLifetimeSec: 120 })),
    { at: T0 + 120 * S, reason: "max_lifetime" },
  );
});

test("maxLifetimeSec 0 means no maximum lifetime, however old the session", () => {
  const old = timing({ createdAt: 0, lastHeartbeatAt: T0, lastActivityAt: T0, maxLifetimeSec: 0 });
  assert.deepEqual(deadlineOf(old), { at: T0 + 30 * S, reason: "heartbeat_timeout" });
});

test("ties go to the heartbeat timeout, then idle, then max lifetime", () => {
  assert.equal(deadlineOf(timing({ heartbeatTimeoutSec: 60, idleTimeoutSec: 60 })).reason, "heartbeat_timeout");
  assert.equal(
    deadlineOf(timing({ heartbeatTimeoutSec: 90, idleTimeoutSec: 60, maxLifetimeSec: 60 })).reason,
    "idle_timeout",
  );
});

test("recoveredAt floors every component: each timeout must elapse again after recovery", () => {
  const R = T0 + 10 * 86400 * S; // the daemon was down for ten days
  const base = { createdAt: T0, lastHeartbeatAt: T0, lastActivityAt: T0, recoveredAt: R };
  assert.deepEqual(deadlineOf(timing({ ...base, heartbeatTimeoutSec: 30, idleTimeoutSec: 60, maxLifetimeSec: 90 })), {
    at: R + 30 * S,
    reason: "heartbeat_timeout",
  });
  assert.deepEqual(deadlineOf(timing({ ...base, heartbeatTimeoutSec: 90, idleTimeoutSec: 60, maxLifetimeSec: 120 })), {
    at: R + 60 * S,
    reason: "idle_timeout",
  });
  assert.deepEqual(deadlineOf(timing({ ...base, heartbeatTimeoutSec: 90, idleTimeoutSec: 60, maxLifetimeSec: 45 })), {
    at: R + 45 * S,
    reason: "max_lifetime",
  });
});

test("a timestamp after recovery is used as is", () => {
  const R = T0 + 1000 * S;
  const d = deadlineOf(
    timing({ recoveredAt: R, lastHeartbeatAt: R + 7 * S, lastActivityAt: R + 7 * S, heartbeatTimeoutSec: 30 }),
  );
  assert.deepEqual(d, { at: R + 37 * S, reason: "heartbeat_timeout" });
  // Partly after: heartbeat fresh (after recovery), activity floored at recovery.
  assert.deepEqual(
    deadlineOf(timing({ recoveredAt: R, lastHeartbeatAt: R + 50 * S, heartbeatTimeoutSec: 30, idleTimeoutSec: 60 })),
    { at: R + 60 * S, reason: "idle_timeout" },
  );
});
