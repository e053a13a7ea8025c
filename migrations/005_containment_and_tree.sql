-- Issue 13 (nothing escapes). `containment`: how the session is contained, as JSON:
-- {"kind":"cgroup","path":"/sys/fs/cgroup/…","made":true} or {"kind":"none","why":"…"}; NULL for
-- sessions registered before this migration. `tree`: the engine's process tree as last seen
-- (JSON list of identities), kept durable so that a restarted daemon starts from it, not from
-- nothing: children re-parented while the daemon was down are still the session's.
ALTER TABLE sessions ADD COLUMN containment TEXT;
ALTER TABLE sessions ADD COLUMN tree TEXT;
