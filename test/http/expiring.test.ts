import assert from "node:assert/strict";
import { test } from "node:test";
import { FakeClock } from "../../src/clock.js";
import type { ExpiringJson } from "../../src/http/present.js";
import { sleeper, startDaemon, tempDir, testConfig } from "../helpers.js";

type Expiring = ExpiringJson;
type ErrorBody = { error: { code: string } };

const S = 1000;

async function setup(t: Parameters<typeof startDaemon>[0]) {
  const clock = new FakeClock();
  const t0 = clock.now();
  const d = await startDaemon(
    t,
    testConfig(tempDir(t), {
      // No flush during the test: SQLite keeps the registration-time deadlines, and the
      // answers must come from the in-memory ones.
      store: { flush_interval_ms: 60000 },
      profiles: {
        default: { heartbeat_timeout_sec: 60, idle_timeout_sec: 600, max_lifetime_sec: 3600 },
        batch: {},
      },
    }),
    clock,
  );
  const reg = async (id: string, extra: Record<string, unknown>): Promise<void> => {
    const res = await d.api("POST", "/v1/sessions", { id, engine: { pid: sleeper(t).pid }, ...extra });
    assert.equal(res.status, 201, JSON.stringify(res.body));
  };
  await reg("e-hb", { heartbeatTimeoutSec: 30, owner: "alice" }); // heartbeat_timeout at +30 s
  await reg("e-idle", { idleTimeoutSec: 20, profile: "batch" }); // idle_timeout at +20 s
  await reg("e-life", { maxLifetimeSec: 40 }); // max_lifetime at +40 s
  await reg("e-far", {}); // heartbeat_timeout at +60 s
  const expiring = async (query: string): Promise<Expiring[]> => {
    const res = await d.api<{ sessions: Expiring[] }>("GET", `/v1/expiring${query}`);
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.deepEqual(Object.keys(res.body), ["sessions"]);
    return res.body.sessions;
  };
  return { clock, t0, d, expiring };
}

test("expiring: soonest first, filtered by the window, with reason and seconds left", async (t) => {
  const { t0, expiring } = await setup(t);
  const iso = (sec: number): string => new Date(t0 + sec * S).toISOString();
  assert.deepEqual(await expiring("?withinSec=45"), [
    { id: "e-idle", profile: "batch", owner: null, deadline: iso(20), expiresBy: "idle_timeout", inSec: 20 },
    { id: "e-hb", profile: "default", owner: "alice", deadline: iso(30), expiresBy: "heartbeat_timeout", inSec: 30 },
    { id: "e-life", profile: "default", owner: null, deadline: iso(40), expiresBy: "max_lifetime", inSec: 40 },
  ]);
  // The window's end is included.
  assert.deepEqual(
    (await expiring("?withinSec=30")).map((s) => s.id),
    ["e-idle", "e-hb"],
  );
  assert.deepEqual(
    (await expiring("?withinSec=19")).map((s) => s.id),
    [],
  );
  // Default: 60 s.
  assert.deepEqual(
    (await expiring("")).map((s) => s.id),
    ["e-idle", "e-hb", "e-life", "e-far"],
  );
});

test("expiring: the in-memory deadline is the truth (heartbeats not yet in SQLite); fenced sessions leave", async (t) => {
  const { clock, t0, d, expiring } = await setup(t);
  clock.advance(10 * S);
  // e-hb: heartbeat at +10 s moves its deadline to +40 s; SQLite still says +30 s.
  assert.equal((await d.api("POST", "/v1/sessions/e-hb/heartbeat", { activity: "idle" })).status, 200);
  assert.equal(
    (d.daemon.store.db.prepare("SELECT deadline FROM sessions WHERE id = 'e-hb'").get() as { deadline: number })
      .deadline,
    t0 + 30 * S,
    "the heartbeat reached SQLite: this test would prove nothing",
  );
  assert.deepEqual(
    (await expiring("?withinSec=25")).map((s) => [s.id, s.inSec]),
    [["e-idle", 10]],
  );
  const now = await expiring("?withinSec=30");
  assert.deepEqual(
    now.map((s) => [s.id, s.inSec, s.expiresBy]),
    [
      ["e-idle", 10, "idle_timeout"],
      ["e-hb", 30, "heartbeat_timeout"], // ties broken by id
      ["e-life", 30, "max_lifetime"],
    ],
  );
  assert.equal(now[1]?.deadline, new Date(t0 + 40 * S).toISOString());

  // Fenced or reaped sessions are not expiring any more.
  assert.equal((await d.api("POST", "/v1/sessions/e-life/reap")).status, 202);
  assert.deepEqual(
    (await expiring("?withinSec=30")).map((s) => s.id),
    ["e-idle", "e-hb"],
  );
  await d.reaped("e-life");
  clock.advance(10 * S); // e-idle's deadline: expired by the detector
  await d.reaped("e-idle");
  assert.deepEqual(
    (await expiring("?withinSec=31536000")).map((s) => s.id),
    ["e-hb", "e-far"],
  );
});

test("expiring: an overdue session (the detector stopped, as while shutting down) has a negative inSec", async (t) => {
  const { clock, d, expiring } = await setup(t);
  d.daemon.detector.stop(); // what daemon.stop() does first: no live session expires because the daemon stops
  clock.advance(25 * S);
  assert.deepEqual(
    (await expiring("?withinSec=1")).map((s) => [s.id, s.inSec]),
    [["e-idle", -5]],
  );
  assert.deepEqual(
    (await expiring("?withinSec=5")).map((s) => [s.id, s.inSec]),
    [
      ["e-idle", -5],
      ["e-hb", 5],
    ],
  );
});

test("expiring: withinSec must be an integer from 1 to 31536000; nothing else is accepted", async (t) => {
  const { d, expiring } = await setup(t);
  for (const q of [
    "?withinSec=0",
    "?withinSec=-1",
    "?withinSec=31536001",
    "?withinSec=1.5",
    "?withinSec=abc",
    "?withinSec=",
    "?within=10",
    "?withinSec=10&state=live",
  ]) {
    const res = await d.api<ErrorBody>("GET", `/v1/expiring${q}`);
    assert.equal(res.status, 400, q);
    assert.equal(res.body.error.code, "SR_BAD_REQUEST", q);
  }
  assert.equal((await expiring("?withinSec=1")).length, 0);
  assert.equal((await expiring("?withinSec=31536000")).length, 4);
});
