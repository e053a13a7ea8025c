-- Sessions, the per-step reap journal, and the audit events.
-- All times are integer milliseconds since the epoch, bound from the daemon's clock.

CREATE TABLE sessions (
  seq                   INTEGER PRIMARY KEY AUTOINCREMENT, -- list order and cursor
  id                    TEXT    NOT NULL UNIQUE,
  profile               TEXT    NOT NULL,
  owner                 TEXT,
  engine_pid            INTEGER NOT NULL,
  engine_start_time     INTEGER NOT NULL, -- /proc/<pid>/stat field 22, clock ticks since boot
  engine_boot_id        TEXT    NOT NULL,
  engine_uid            INTEGER NOT NULL,
  owner_pid             INTEGER,
  owner_start_time      INTEGER,
  owner_boot_id         TEXT,
  owner_uid             INTEGER,
  ports                 TEXT    NOT NULL DEFAULT '[]', -- JSON array of ints
  paths                 TEXT    NOT NULL DEFAULT '[]', -- JSON array of strings
  labels                TEXT    NOT NULL DEFAULT '{}', -- JSON object
  heartbeat_timeout_sec INTEGER NOT NULL,
  idle_timeout_sec      INTEGER NOT NULL,
  max_lifetime_sec      INTEGER NOT NULL,
  created_at            INTEGER NOT NULL,
  last_heartbeat_at     INTEGER NOT NULL,
  last_activity_at      INTEGER NOT NULL,
  deadline              INTEGER,          -- earliest time-based expiry while live; NULL after
  state                 TEXT    NOT NULL CHECK (state IN ('live', 'reaping', 'reaped')),
  reason                TEXT,
  outcome               TEXT    CHECK (outcome IN ('clean', 'partial', 'failed')),
  leftovers             TEXT,             -- JSON array, once reaped
  reap_started_at       INTEGER,
  reaped_at             INTEGER
);

-- The expiry probe: WHERE state = 'live' ORDER BY deadline LIMIT n.
CREATE INDEX sessions_state_deadline ON sessions (state, deadline);
CREATE INDEX sessions_profile ON sessions (profile);
CREATE INDEX sessions_owner ON sessions (owner);

-- One row per finished step: a daemon killed mid-reap resumes after the last journaled step.
CREATE TABLE reap_steps (
  session_id  TEXT    NOT NULL REFERENCES sessions (id),
  position    INTEGER NOT NULL,
  name        TEXT    NOT NULL,
  outcome     TEXT    NOT NULL CHECK (outcome IN ('ok', 'failed', 'timeout')),
  started_at  INTEGER NOT NULL,
  duration_ms INTEGER NOT NULL,
  detail      TEXT    NOT NULL DEFAULT '{}', -- JSON
  PRIMARY KEY (session_id, name)
) WITHOUT ROWID;

CREATE TABLE audit_events (
  seq         INTEGER PRIMARY KEY AUTOINCREMENT,
  at          INTEGER NOT NULL,
  event       TEXT    NOT NULL,
  session_id  TEXT,
  reason      TEXT,
  step        TEXT,
  outcome     TEXT,
  duration_ms INTEGER,
  detail      TEXT -- JSON
);

CREATE INDEX audit_events_session ON audit_events (session_id, seq);
