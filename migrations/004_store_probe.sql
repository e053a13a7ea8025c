-- One row the daemon rewrites to learn whether the store commits again after a failure (a
-- lock held by another process, a full disk, an I/O error): a real write, so a probe that
-- succeeds means the next session write will too (issue 12: a busy or broken store never
-- kills and never crashes).
CREATE TABLE store_probe (id INTEGER PRIMARY KEY CHECK (id = 1), at INTEGER NOT NULL);
INSERT INTO store_probe (id, at) VALUES (1, 0);
