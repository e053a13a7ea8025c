import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import BetterSqlite3 from "better-sqlite3";
import type { ReaperApiError } from "../../src/client/index.js";
import { ReaperClient } from "../../src/client/index.js";
import { ctl } from "../cli/ctl.js";
import { sleeper, startDaemon, tempDir, testConfig, until } from "../helpers.js";

type Row = Record<string, unknown>;
type Purged = { sessions: number; steps: number; events: number; tombstones: number; from: number; to: number };

/** What the database file holds now, read by a connection of its own (as an operator's sqlite3 would). */
function look(db: string, sql: string, ...args: unknown[]): Row[] {
  const c = new BetterSqlite3(db, { readonly: true, fileMustExist: true });
  try {
    return c.prepare(sql).all(...args) as Row[];
  } finally {
    c.close();
  }
}

const count = (db: string, sql: string, ...args: unknown[]): number => Number(look(db, sql, ...args)[0]?.n);

test("retention under a running storm: exactly the reaped sessions past retain_reaped_sec go, each leaving a tombstone; live and reaping ones are never touched", async (t) => {
  const dir = tempDir(t);
  const config = testConfig(dir, {
    store: { retain_reaped_sec: 1, retain_tombstones_sec: 3600 },
    profiles: {
      default: { grace_period_sec: 0.2 },
      // A close hook that holds the reap: these sessions stay `reaping` through the purges.
      slow: { close_hook: ["sleep", "6"], step_timeout_sec: 10, allowed_roots: [dir] },
    },
  });
  const d = await startDaemon(t, config);
  const db = config.store.path;
  const register = async (id: string, profile = "default"): Promise<void> => {
    const r = await d.api("POST", "/v1/sessions", { id, profile, engine: { pid: sleeper(t).pid } });
    assert.equal(r.status, 201, JSON.stringify(r.body));
  };
  const live = Array.from({ length: 20 }, (_, i) => `live-${i}`);
  const slow = Array.from({ length: 10 }, (_, i) => `slow-${i}`);
  const storm = Array.from({ length: 100 }, (_, i) => `storm-${i}`);
  for (const id of live) await register(id);
  for (const id of slow) await register(id, "slow");
  for (const id of storm) await register(id);

  // The live sessions heartbeat all along.
  let beating = true;
  const beats = (async () => {
    while (beating) {
      for (const id of live) {
        const r = await d.api("POST", `/v1/sessions/${id}/heartbeat`, { activity: "busy" });
        assert.equal(r.status, 200, `${id}: ${JSON.stringify(r.body)}`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  })();
  t.after(() => void (beating = false));

  for (const id of slow) assert.equal((await d.api("DELETE", `/v1/sessions/${id}`)).status, 202);
  // The storm: 100 closes at once, reaped while the passes run (every second with retain 1 s).
  const closes = await Promise.all(storm.map((id) => d.api("DELETE", `/v1/sessions/${id}`)));
  assert.deepEqual(
    closes.map((r) => r.status),
    storm.map(() => 202),
  );
  for (const id of storm) await d.reaped(id, 20_000);
  await until(() => count(db, "SELECT COUNT(*) AS n FROM tombstones") === 100, 15_000, "the storm purged");
  beating = false;
  await beats;

  // Exactly the storm: its rows, steps and events gone, a tombstone each with how it ended.
  assert.equal(count(db, "SELECT COUNT(*) AS n FROM sessions WHERE id LIKE 'storm-%'"), 0);
  assert.equal(count(db, "SELECT COUNT(*) AS n FROM reap_steps WHERE session_id LIKE 'storm-%'"), 0);
  assert.equal(count(db, "SELECT COUNT(*) AS n FROM audit_events WHERE session_id LIKE 'storm-%'"), 0);
  const tombs = look(db, "SELECT id, reason, outcome, ended_at FROM tombstones ORDER BY id");
  assert.deepEqual(
    tombs.map((r) => r.id),
    [...storm].sort(),
  );
  for (const r of tombs) assert.deepEqual([r.reason, r.outcome], ["closed", "clean"], JSON.stringify(r));
  // Never a live or reaping one: every one still there, in its state, with its events.
  const states = look(db, "SELECT id, state FROM sessions ORDER BY id");
  assert.deepEqual(
    states.map((r) => `${String(r.id)} ${String(r.state)}`),
    [...live.map((id) => `${id} live`), ...slow.map((id) => `${id} reaping`)].sort(),
  );
  for (const id of [...live, ...slow]) {
    assert.ok(count(db, "SELECT COUNT(*) AS n FROM audit_events WHERE session_id = ?", id) >= 1, id);
  }
  // The store.purged events account for every session purged, and the time range holds the reaps' ends.
  const purged = d.lines
    .join("")
    .split("\n")
    .filter((l) => l.includes('"event":"store.purged"'))
    .map((l) => (JSON.parse(l) as { detail: Purged }).detail);
  assert.ok(purged.length >= 1);
  assert.equal(
    purged.reduce((n, p) => n + p.sessions, 0),
    100,
  );
  const ends = tombs.map((r) => Number(r.ended_at));
  assert.equal(Math.min(...purged.filter((p) => p.sessions > 0).map((p) => p.from)), Math.min(...ends));
  assert.equal(Math.max(...purged.filter((p) => p.sessions > 0).map((p) => p.to)), Math.max(...ends));

  // The slow reaps end and are purged in turn; the live sessions are still live.
  for (const id of slow) await d.reaped(id, 20_000);
  await until(() => count(db, "SELECT COUNT(*) AS n FROM tombstones") === 110, 15_000, "the slow ones purged");
  assert.equal(count(db, "SELECT COUNT(*) AS n FROM sessions WHERE state = 'live'"), 20);
  // Events of no session older than the retention go too (daemon.started, the first store.purged).
  assert.equal(count(db, "SELECT COUNT(*) AS n FROM audit_events WHERE event = 'daemon.started'"), 0);
  const counts = (await d.api<{ counts: Record<string, number> }>("GET", "/v1/daemon")).body.counts;
  assert.equal(counts.live, 20, JSON.stringify(counts));
  assert.equal(counts.reaped, 0, JSON.stringify(counts));
});

test("a tombstoned id: 410 SR_SESSION_GONE for every verb, naming when and why it ended; registering it again is 409", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir, { store: { retain_reaped_sec: 2 } }));
  assert.equal((await d.api("POST", "/v1/sessions", { id: "gone", engine: { pid: sleeper(t).pid } })).status, 201);
  assert.equal((await d.api("POST", "/v1/sessions/gone/reap")).status, 202);
  await d.reaped("gone");
  // Read before the purge (2 s after the reap's end at the earliest): when it ended.
  const last = await d.api<{ reapedAt: string }>("GET", "/v1/sessions/gone");
  assert.equal(last.status, 200, JSON.stringify(last.body));
  await until(async () => (await d.api("GET", "/v1/sessions/gone")).status === 410, 10_000, "purged");

  type Err = { error: { code: string; message: string; detail: { endedAt: string; reason: string; outcome: string } } };
  const verbs: [string, string, unknown][] = [
    ["GET", "/v1/sessions/gone", undefined],
    ["GET", "/v1/sessions/gone/events", undefined],
    ["POST", "/v1/sessions/gone/heartbeat", undefined],
    ["POST", "/v1/sessions/gone/heartbeat", { activity: "idle" }],
    ["PATCH", "/v1/sessions/gone", { labels: { a: "b" } }],
    ["DELETE", "/v1/sessions/gone", undefined],
    ["POST", "/v1/sessions/gone/reap", undefined],
  ];
  for (const [method, path, body] of verbs) {
    const r = await d.api<Err>(method, path, body);
    assert.equal(r.status, 410, `${method} ${path}: ${JSON.stringify(r.body)}`);
    assert.equal(r.body.error.code, "SR_SESSION_GONE");
    assert.equal(r.body.error.detail.reason, "forced");
    assert.equal(r.body.error.detail.outcome, "clean");
    assert.equal(r.body.error.detail.endedAt, last.body.reapedAt);
    assert.match(r.body.error.message, /ended at .* \(forced, clean\)/);
  }
  const again = await d.api<Err>("POST", "/v1/sessions", { id: "gone", engine: { pid: sleeper(t).pid } });
  assert.equal(again.status, 409, JSON.stringify(again.body));
  assert.equal(again.body.error.code, "SR_SESSION_EXISTS");
  // A never-known id is still 404.
  assert.equal((await d.api("GET", "/v1/sessions/never")).status, 404);

  // The client library treats it like a fence: the loop stops and says so, close() and
  // waitForReap() tell the end its tombstone records.
  const client = new ReaperClient({ socketPath: d.socket, intervalMs: 50 });
  await client.register({ id: "gone-too", engine: { pid: sleeper(t).pid } });
  client.stop();
  assert.equal((await d.api("POST", "/v1/sessions/gone-too/reap")).status, 202);
  await d.reaped("gone-too");
  await until(async () => (await d.api("GET", "/v1/sessions/gone-too")).status === 410, 10_000, "purged");
  const fenced = new Promise<ReaperApiError>((resolve) => client.once("fenced", resolve));
  client.start();
  const e = await fenced;
  assert.equal(e.status, 410);
  assert.equal(e.code, "SR_SESSION_GONE");
  assert.equal(await client.close(), null);
  const ended = await client.waitForReap({ timeoutMs: 2_000 });
  assert.deepEqual([ended.state, ended.reason, ended.outcome], ["reaped", "forced", "clean"]);
});

test("audit verify counts a purged session as finished: the daemon answers its tombstone", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir, { log: { level: "info" }, store: { retain_reaped_sec: 1 } }));
  assert.equal((await d.api("POST", "/v1/sessions", { id: "p1", engine: { pid: sleeper(t).pid } })).status, 201);
  assert.equal((await d.api("POST", "/v1/sessions", { id: "l1", engine: { pid: sleeper(t).pid } })).status, 201);
  assert.equal((await d.api("DELETE", "/v1/sessions/p1")).status, 202);
  await d.reaped("p1");
  await until(async () => (await d.api("GET", "/v1/sessions/p1")).status === 410, 10_000, "purged");
  const file = join(dir, "audit.log");
  writeFileSync(file, d.lines.join(""));
  const r = await ctl(["audit", "verify", file, "--socket", d.socket]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /^sessions seen\s+2$/m);
  assert.match(r.stdout, /^reaped\s+1$/m);
  assert.match(r.stdout, /^missing reap\.finished\s+0$/m);
  assert.match(r.stdout, /^result\s+complete$/m);
  assert.match(r.stdout, /^unknown events\s+0$/m);
  assert.ok(
    d.lines.some((l) => l.includes('"event":"store.purged"')),
    "the log holds the store.purged event the verifier read",
  );
});

test("the file stays bounded: a burst of reaped sessions, purged, gives its pages back (incremental vacuum)", async (t) => {
  const dir = tempDir(t);
  const config = testConfig(dir, { store: { retain_reaped_sec: 1 } });
  const d = await startDaemon(t, config);
  const db = config.store.path;
  assert.equal(look(db, "PRAGMA auto_vacuum")[0]?.auto_vacuum, 2, "a new database vacuums incrementally");
  const engine = sleeper(t);
  const labels = Object.fromEntries(Array.from({ length: 32 }, (_, i) => [`k${i}`, "v".repeat(200)]));
  const ids = Array.from({ length: 300 }, (_, i) => `burst-${i}`);
  await d.daemon.retention.stop(); // the burst first, all of it; then one pass
  for (const id of ids) {
    const r = await d.api("POST", "/v1/sessions", { id, engine: { pid: engine.pid }, labels });
    assert.equal(r.status, 201, JSON.stringify(r.body));
  }
  await Promise.all(ids.map((id) => d.api("DELETE", `/v1/sessions/${id}`)));
  for (const id of ids) await d.reaped(id, 30_000);
  const pagesAtPeak = Number(look(db, "PRAGMA page_count")[0]?.page_count);
  await new Promise((r) => setTimeout(r, 1_100));
  const pass = await d.daemon.retention.pass();
  assert.equal(pass.sessions, 300);
  assert.equal(pass.freePagesLeft, 0);
  const pagesAfter = Number(look(db, "PRAGMA page_count")[0]?.page_count);
  assert.equal(Number(look(db, "PRAGMA freelist_count")[0]?.freelist_count), 0);
  assert.ok(pagesAfter < pagesAtPeak / 2, `${pagesAfter} pages after the purge, ${pagesAtPeak} at the peak`);
});

test("store.retain_tombstones_sec shorter than retain_reaped_sec is a configuration error naming both", () => {
  const dir = tempDir({ after: () => undefined });
  assert.throws(
    () => testConfig(dir, { store: { retain_reaped_sec: 3600, retain_tombstones_sec: 60 } }),
    (err: Error & { code?: string }) =>
      err.code === "SR_CONFIG_INVALID" && /retain_tombstones_sec: 60 .*retain_reaped_sec \(3600\)/.test(err.message),
  );
  // 0 keeps them for ever, whatever the retention of sessions.
  assert.equal(testConfig(dir, { store: { retain_tombstones_sec: 0 } }).store.retainTombstonesSec, 0);
});

test("a database made before retention is converted to incremental vacuum when the daemon opens it", async (t) => {
  const dir = tempDir(t);
  const config = testConfig(dir);
  const first = await startDaemon(t, config);
  assert.equal((await first.api("POST", "/v1/sessions", { id: "old", engine: { pid: sleeper(t).pid } })).status, 201);
  await first.stop();
  // As an older build left it: no auto-vacuum.
  const c = new BetterSqlite3(config.store.path);
  c.pragma("auto_vacuum = NONE");
  c.exec("VACUUM");
  assert.equal(c.pragma("auto_vacuum", { simple: true }), 0);
  c.close();
  const second = await startDaemon(t, config);
  assert.equal(look(config.store.path, "PRAGMA auto_vacuum")[0]?.auto_vacuum, 2);
  assert.equal((await second.api<{ state: string }>("GET", "/v1/sessions/old")).body.state, "live");
});
