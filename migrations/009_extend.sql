-- Issue 26 (warn before reclaim, extend). POST /v1/sessions/{id}/extend keeps a live session
-- at least until this moment (wall ms): its idle deadline is never earlier while it is live.
-- A restart keeps the promise (what is left of it runs from the start), so it is stored.
ALTER TABLE sessions ADD COLUMN extended_until INTEGER;
