import assert from "node:assert/strict";
import { test } from "node:test";
import { deadlineOf, warnableDeadline, type Timing } from "../../src/model/deadline.js";

const T0 = Date.UTC(2026, 0, 1);
const S = 1000;

function timing(over: Partial<Timing> = {}): Timing {
  return {
    createdMono: T0,
    heartbeatMono: T0,
    activityMono: T0,
    heartbeatTimeoutSec: 30,
    idleTimeoutSec: 3600,
    maxLifetimeSec: 0,
    ...over,
  };
}

test("heartbeat timeout wins when it is the earliest", () => {
  assert.deepEqual(deadlineOf(timing()), { at: T0 + 30 * S, reason: "heartbeat_timeout" });
  assert.deepEqual(deadlineOf(timing({ heartbeatMono: T0 + 5 * S, maxLifetimeSec: 100 })), {
    at: T0 + 35 * S,
    reason: "heartbeat_timeout",
  });
});

test("idle timeout wins when activity is old even though heartbeats are fresh", () => {
  assert.deepEqual(deadlineOf(timing({ heartbeatMono: T0 + 100 * S, idleTimeoutSec: 60, heartbeatTimeoutSec: 30 })), {
    at: T0 + 60 * S,
    reason: "idle_timeout",
  });
});

test("max lifetime wins when it is the earliest", () => {
  assert.deepEqual(
    deadlineOf(timing({ heartbeatMono: T0 + 100 * S, activityMono: T0 + 100 * S, maxLifetimeSec: 120 })),
    { at: T0 + 120 * S, reason: "max_lifetime" },
  );
});

test("maxLifetimeSec 0 means no maximum lifetime, however old the session", () => {
  const old = timing({ createdMono: 0, heartbeatMono: T0, activityMono: T0, maxLifetimeSec: 0 });
  assert.deepEqual(deadlineOf(old), { at: T0 + 30 * S, reason: "heartbeat_timeout" });
});

test("ties go to the heartbeat timeout, then idle, then max lifetime", () => {
  assert.equal(deadlineOf(timing({ heartbeatTimeoutSec: 60, idleTimeoutSec: 60 })).reason, "heartbeat_timeout");
  assert.equal(
    deadlineOf(timing({ heartbeatTimeoutSec: 90, idleTimeoutSec: 60, maxLifetimeSec: 60 })).reason,
    "idle_timeout",
  );
});

test("the floor (recovery, a stall) holds every component: each timeout must elapse again after it", () => {
  const R = T0 + 10 * 86400 * S; // the daemon was down (or stalled) for ten days
  const base = { createdMono: T0, heartbeatMono: T0, activityMono: T0 };
  assert.deepEqual(
    deadlineOf(timing({ ...base, heartbeatTimeoutSec: 30, idleTimeoutSec: 60, maxLifetimeSec: 90 }), R),
    { at: R + 30 * S, reason: "heartbeat_timeout" },
  );
  assert.deepEqual(
    deadlineOf(timing({ ...base, heartbeatTimeoutSec: 90, idleTimeoutSec: 60, maxLifetimeSec: 120 }), R),
    { at: R + 60 * S, reason: "idle_timeout" },
  );
  assert.deepEqual(
    deadlineOf(timing({ ...base, heartbeatTimeoutSec: 90, idleTimeoutSec: 60, maxLifetimeSec: 45 }), R),
    { at: R + 45 * S, reason: "max_lifetime" },
  );
});

test("a timestamp after recovery is used as is", () => {
  const R = T0 + 1000 * S;
  const d = deadlineOf(timing({ heartbeatMono: R + 7 * S, activityMono: R + 7 * S, heartbeatTimeoutSec: 30 }), R);
  assert.deepEqual(d, { at: R + 37 * S, reason: "heartbeat_timeout" });
  // Partly after: heartbeat fresh (after recovery), activity floored at recovery.
  assert.deepEqual(deadlineOf(timing({ heartbeatMono: R + 50 * S, heartbeatTimeoutSec: 30, idleTimeoutSec: 60 }), R), {
    at: R + 60 * S,
    reason: "idle_timeout",
  });
});

test("the heartbeat floor (connections turned away) moves the heartbeat timeout alone", () => {
  const floor = T0 + 50 * S;
  // Heartbeat last at T0: measured from the floor instead.
  assert.deepEqual(deadlineOf(timing(), Number.NEGATIVE_INFINITY, floor), {
    at: floor + 30 * S,
    reason: "heartbeat_timeout",
  });
  // The idle timeout does not move: it wins once it is the earlier.
  assert.deepEqual(deadlineOf(timing({ idleTimeoutSec: 60 }), Number.NEGATIVE_INFINITY, floor), {
    at: T0 + 60 * S,
    reason: "idle_timeout",
  });
  // A heartbeat after the floor counts from itself.
  assert.deepEqual(deadlineOf(timing({ heartbeatMono: floor + 10 * S }), Number.NEGATIVE_INFINITY, floor), {
    at: floor + 40 * S,
    reason: "heartbeat_timeout",
  });
});

test("an extension holds the idle deadline, never the heartbeat's nor the lifetime's", () => {
  const ext = T0 + 7200 * S;
  // Idle since T0 with a one-minute idle timeout, extended two hours: heartbeats decide meanwhile.
  assert.deepEqual(deadlineOf(timing({ heartbeatMono: T0 + 7000 * S, idleTimeoutSec: 60, extendedUntilMono: ext })), {
    at: T0 + 7030 * S,
    reason: "heartbeat_timeout",
  });
  assert.deepEqual(warnableDeadline(timing({ idleTimeoutSec: 60, extendedUntilMono: ext })), {
    at: ext,
    reason: "idle_timeout",
  });
  // An extension shorter than the idle timeout changes nothing.
  assert.deepEqual(warnableDeadline(timing({ idleTimeoutSec: 60, extendedUntilMono: T0 + 10 * S })), {
    at: T0 + 60 * S,
    reason: "idle_timeout",
  });
  // The max lifetime still ends it.
  assert.deepEqual(warnableDeadline(timing({ idleTimeoutSec: 60, maxLifetimeSec: 600, extendedUntilMono: ext })), {
    at: T0 + 600 * S,
    reason: "max_lifetime",
  });
});
