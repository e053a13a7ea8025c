-- Issue 25 (a year on a production host). Reaped sessions older than store.retain_reaped_sec
-- are purged with their reap steps and audit events; each leaves a tombstone for
-- store.retain_tombstones_sec, so that a late heartbeat, close or reap for its id is answered
-- 410 SR_SESSION_GONE (when and why it ended), never 404 (which a client could read as
-- "register again"), and registering the id again is refused (409 SR_SESSION_EXISTS).
CREATE TABLE tombstones (
  id        TEXT    PRIMARY KEY,
  ended_at  INTEGER NOT NULL, -- the session's reaped_at
  reason    TEXT,
  outcome   TEXT,
  purged_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX tombstones_ended ON tombstones (ended_at);

-- The purge's probes: reaped sessions by the reap's end, events of no session by time.
CREATE INDEX sessions_reaped ON sessions (reaped_at) WHERE state = 'reaped';
CREATE INDEX audit_events_unsessioned ON audit_events (at) WHERE session_id IS NULL;
