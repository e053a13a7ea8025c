-- How many times the reap pipeline of a session was started (1 + the number of resumes
-- after a daemon crash or stop). Hooks receive it, so they can tell a retry from a first try.
ALTER TABLE sessions ADD COLUMN reap_attempts INTEGER NOT NULL DEFAULT 0;
