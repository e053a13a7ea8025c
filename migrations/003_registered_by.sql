-- Who registered the session (issue 6: caller identity). The uid comes from the unix socket's
-- peer credentials (SO_PEERCRED); NULL for a caller on loopback TCP (a token holder) and for
-- sessions registered before this migration. registered_as_admin records whether that caller
-- was an administrator at the time: a session a non-admin registered is reaped with no more
-- power than that user has (see src/auth/policy.ts). Older sessions were registered without
-- any policy, so they keep the behaviour they had (admin = 1).
ALTER TABLE sessions ADD COLUMN registered_by_uid INTEGER;
ALTER TABLE sessions ADD COLUMN registered_as_admin INTEGER NOT NULL DEFAULT 1;
ALTER TABLE sessions ADD COLUMN registered_via TEXT;

-- The per-uid cap counts live sessions by registering uid: an index probe, not a scan.
CREATE INDEX sessions_registered_by ON sessions (registered_by_uid, state);
