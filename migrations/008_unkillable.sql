-- Unkillable processes (docs/how-a-session-ends.md, "When a kill does not finish"). How many
-- processes a reap left alive after SIGKILL (its `unkillable` leftovers) that the daemon still
-- watches: set by the reap's finish, back to 0 once they are all gone and the reap is resolved
-- (reap.resolved). A restarted daemon finds the reaps to watch again through this partial
-- index, never by reading the leftovers of every reaped row.
ALTER TABLE sessions ADD COLUMN unkillable INTEGER NOT NULL DEFAULT 0;
CREATE INDEX sessions_unkillable ON sessions (seq) WHERE unkillable > 0;
