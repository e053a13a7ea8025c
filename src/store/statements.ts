/**
 * Every statement of the store, prepared once. `now` is always a bound parameter (never
 * datetime('now')), so the store runs on the daemon's injected clock.
 */
import type { Database, Statement } from "better-sqlite3";
import { ENGINE_READABLE } from "./columns.js";
import { STATE_OF_ROW } from "./rows.js";

export type Statements = {
  insert: Statement;
  setTracking: Statement;
  downgradeTracking: Statement;
  get: Statement;
  seqOf: Statement;
  fence: Statement;
  finish: Statement;
  unresolvedReaps: Statement;
  resolveReap: Statement;
  attempt: Statement;
  heartbeat: Statement;
  heartbeatDeadline: Statement;
  insertStep: Statement;
  steps: Statement;
  insertEvent: Statement;
  events: Statement;
  eventsAfter: Statement;
  sessionEventsAfter: Statement;
  lastEventSeq: Statement;
  lastPurge: Statement;
  topEventSeq: Statement;
  registeredByUid: Statement;
  byState: Statement;
  liveForRecovery: Statement;
  counts: Statement;
  unfinishedByProfile: Statement;
  reapedByProfile: Statement;
  liveByUid: Statement;
  liveDueBy: Statement;
  probe: Statement;
  tree: Statement;
  additions: Statement;
  extend: Statement;
  purgeable: Statement;
  bury: Statement;
  purgeSteps: Statement;
  purgeEvents: Statement;
  purgeSession: Statement;
  purgeTombstones: Statement;
  purgeUnsessioned: Statement;
  tombstone: Statement;
};

export function prepareStatements(db: Database): Statements {
  return {
    insert: db.prepare(`INSERT INTO sessions (id, profile, owner, engine_pid, engine_start_time, engine_boot_id,
        engine_uid, owner_pid, owner_start_time, owner_boot_id, owner_uid, ports, paths, labels,
        heartbeat_timeout_sec, idle_timeout_sec, max_lifetime_sec, created_at, last_heartbeat_at,
        last_activity_at, deadline, state, registered_by_uid, registered_as_admin, registered_via, containment, tree, tracking)
      VALUES (@id, @profile, @owner, @engine_pid, @engine_start_time, @engine_boot_id, @engine_uid, @owner_pid,
        @owner_start_time, @owner_boot_id, @owner_uid, @ports, @paths, @labels, @heartbeat_timeout_sec,
        @idle_timeout_sec, @max_lifetime_sec, @created_at, @last_heartbeat_at, @last_activity_at, @deadline, 'live',
        @registered_by_uid, @registered_as_admin, @registered_via, @containment, @tree, @tracking)`),
    setTracking: db.prepare("UPDATE sessions SET tracking = ? WHERE id = ? AND tracking IS NOT ?"),
    // After a restart (or lost events), forks the daemon did not see may have escaped: a lineage
    // that was complete falls back to what the session's containment gives.
    // A containment that is not valid JSON (a damaged row) gives nothing: json_extract would fail the start.
    downgradeTracking: db.prepare(`UPDATE sessions SET tracking = CASE
        WHEN NOT json_valid(containment) THEN 'snapshots'
        WHEN json_extract(containment, '$.kind') = 'cgroup' AND json_extract(containment, '$.made') = 0 THEN 'cgroup-from-birth'
        WHEN json_extract(containment, '$.kind') = 'cgroup' THEN 'cgroup'
        ELSE 'snapshots' END
      WHERE tracking = 'lineage' AND state IN ('live', 'reaping')`),
    get: db.prepare("SELECT * FROM sessions WHERE id = ?"),
    seqOf: db.prepare("SELECT seq FROM sessions WHERE id = ?"),
    // A `damaged` session is a live row too (STATE_OF_ROW): `readable` tells which count it left.
    fence: db.prepare(`UPDATE sessions SET state = 'reaping', reason = @reason, reap_started_at = @now, deadline = NULL,
        last_heartbeat_at = COALESCE(@hb, last_heartbeat_at), last_activity_at = COALESCE(@activity, last_activity_at)
      WHERE id = @id AND state = 'live' RETURNING ${ENGINE_READABLE} AS readable`),
    finish:
      db.prepare(`UPDATE sessions SET state = 'reaped', outcome = @outcome, leftovers = @leftovers, reaped_at = @now,
      unkillable = @unkillable WHERE id = @id AND state = 'reaping'`),
    // Reaps whose unkillable processes are still watched (migration 008's partial index).
    unresolvedReaps: db.prepare("SELECT * FROM sessions WHERE unkillable > 0 AND state = 'reaped' ORDER BY seq"),
    resolveReap: db.prepare(`UPDATE sessions SET outcome = @outcome, leftovers = @leftovers, unkillable = 0
      WHERE id = @id AND state = 'reaped' AND unkillable > 0`),
    attempt: db.prepare(
      "UPDATE sessions SET reap_attempts = reap_attempts + 1 WHERE id = ? AND state = 'reaping' RETURNING reap_attempts",
    ),
    heartbeat: db.prepare(
      `UPDATE sessions SET last_heartbeat_at = ?, last_activity_at = ? WHERE id = ? AND state = 'live'`,
    ),
    heartbeatDeadline: db.prepare(`UPDATE sessions SET last_heartbeat_at = ?, last_activity_at = ?, deadline = ?
        WHERE id = ? AND state = 'live'`),
    insertStep:
      db.prepare(`INSERT OR REPLACE INTO reap_steps (session_id, position, name, outcome, started_at, duration_ms, detail)
      VALUES (?, ?, ?, ?, ?, ?, ?)`),
    steps: db.prepare("SELECT * FROM reap_steps WHERE session_id = ? ORDER BY position"),
    insertEvent:
      db.prepare(`INSERT INTO audit_events (at, event, session_id, reason, step, outcome, duration_ms, detail)
      VALUES (?, ?, ?, ?, ?, ?, ?, ?)`),
    events: db.prepare("SELECT * FROM audit_events WHERE session_id = ? ORDER BY seq"),
    // The event stream's pages (GET /v1/events): at most `limit` rows of the table after a seq,
    // each with its session's registering uid (what a non-admin may see), so a page reads that
    // many rows however few of them the caller may see.
    eventsAfter: db.prepare(`SELECT e.*, s.registered_by_uid AS registered_by_uid
      FROM (SELECT * FROM audit_events WHERE seq > ? ORDER BY seq LIMIT ?) e
      LEFT JOIN sessions s ON s.id = e.session_id ORDER BY e.seq`),
    sessionEventsAfter: db.prepare("SELECT * FROM audit_events WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?"),
    // The highest seq ever given (AUTOINCREMENT never gives one again), rows purged or not.
    lastEventSeq: db.prepare("SELECT seq FROM sqlite_sequence WHERE name = 'audit_events'"),
    // The newest store.purged event: its detail's throughSeq is the highest seq retention removed.
    lastPurge: db.prepare(`SELECT seq, detail FROM audit_events
      WHERE session_id IS NULL AND event = 'store.purged' ORDER BY seq DESC LIMIT 1`),
    topEventSeq: db.prepare("SELECT MAX(seq) AS seq FROM audit_events WHERE session_id = ?"),
    registeredByUid: db.prepare("SELECT registered_by_uid AS uid FROM sessions WHERE id = ?"),
    byState: db.prepare("SELECT * FROM sessions WHERE state = ? ORDER BY seq"),
    liveForRecovery: db.prepare(`SELECT seq, id, profile, engine_pid, engine_start_time, engine_boot_id, engine_uid,
        owner_pid, owner_start_time, owner_boot_id, owner_uid, created_at, last_heartbeat_at, last_activity_at,
        heartbeat_timeout_sec, idle_timeout_sec, max_lifetime_sec, deadline, registered_by_uid,
        registered_as_admin, registered_via, tree, containment, extended_until
      FROM sessions WHERE state = 'live' ORDER BY seq`),
    counts: db.prepare(`SELECT ${STATE_OF_ROW} AS state, COUNT(*) AS n FROM sessions GROUP BY 1`),
    // These three search the (state, deadline) index by state, so they visit only the rows
    // of the states they count: live and reaping rows are few, reaped ones most of the table.
    unfinishedByProfile: db.prepare(
      `SELECT ${STATE_OF_ROW} AS state, profile, COUNT(*) AS n FROM sessions WHERE state IN ('live', 'reaping') GROUP BY 1, profile`,
    ),
    reapedByProfile: db.prepare("SELECT profile, COUNT(*) AS n FROM sessions WHERE state = 'reaped' GROUP BY profile"),
    liveByUid: db.prepare("SELECT COUNT(*) AS n FROM sessions WHERE registered_by_uid = ? AND state = 'live'"),
    liveDueBy: db.prepare(
      "SELECT id, profile, owner FROM sessions WHERE state = 'live' AND deadline <= ? ORDER BY deadline",
    ),
    probe: db.prepare("UPDATE store_probe SET at = ? WHERE id = 1"),
    tree: db.prepare("UPDATE sessions SET tree = ? WHERE id = ?"),
    additions: db.prepare("UPDATE sessions SET ports = ?, paths = ?, labels = ? WHERE id = ? AND state = 'live'"),
    extend: db.prepare("UPDATE sessions SET extended_until = ? WHERE id = ? AND state = 'live'"),
    // Retention (issue 25): only reaped rows are ever selected; live and reaping ones never.
    purgeable: db.prepare(`SELECT id, reaped_at, reason, outcome FROM sessions
      WHERE state = 'reaped' AND reaped_at < ? AND unkillable = 0 ORDER BY reaped_at LIMIT ?`),
    bury: db.prepare(`INSERT OR REPLACE INTO tombstones (id, ended_at, reason, outcome, purged_at)
      VALUES (?, ?, ?, ?, ?)`),
    purgeSteps: db.prepare("DELETE FROM reap_steps WHERE session_id = ?"),
    purgeEvents: db.prepare("DELETE FROM audit_events WHERE session_id = ?"),
    purgeSession: db.prepare("DELETE FROM sessions WHERE id = ? AND state = 'reaped'"),
    purgeTombstones: db.prepare(`DELETE FROM tombstones WHERE id IN
      (SELECT id FROM tombstones WHERE ended_at < ? ORDER BY ended_at LIMIT ?)`),
    purgeUnsessioned: db.prepare(`DELETE FROM audit_events WHERE seq IN
      (SELECT seq FROM audit_events WHERE session_id IS NULL AND at < ? ORDER BY at LIMIT ?) RETURNING seq`),
    tombstone: db.prepare("SELECT id, ended_at, reason, outcome FROM tombstones WHERE id = ?"),
  };
}
