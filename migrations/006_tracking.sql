-- Issue 21 (lineage). `tracking`: how the session's processes were known, strongest first:
-- 'lineage' (every fork since the engine's birth, from the kernel's process events), 'cgroup-from-birth'
-- (the engine's own cgroup, in which nothing is older than it), 'cgroup' (a cgroup the engine's tree
-- was moved into at registration), 'snapshots' (walks of /proc only). NULL for sessions registered
-- before this migration.
ALTER TABLE sessions ADD COLUMN tracking TEXT;
