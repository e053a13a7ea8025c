import assert from "node:assert/strict";
import BetterSqlite3 from "better-sqlite3";
import { statSync, statfsSync, truncateSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { ReaperError } from "../../src/errors.js";
import type { HeartbeatWrite } from "../../src/model/live-session.js";
import { Store } from "../../src/store/store.js";
import { fillUp, mountTmpfs } from "../faults/lib.js";
import { storedSession, tempDir } from "../helpers.js";

const T0 = Date.UTC(2026, 0, 1);
/** A 1 MiB file system: the WAL's bound, and so the reserve, is 64 KiB; the headroom 128 KiB. */
const SIZE = "1m";
const RESERVE = 64 * 1024;
const HEADROOM = 128 * 1024;

const free = (dir: string): number => {
  const s = statfsSync(dir);
  return s.bavail * s.bsize;
};
const sizeOf = (file: string): number => {
  try {
    return statSync(file).size;
  } catch {
    return 0;
  }
};
const unavailable = (err: unknown): boolean => err instanceof ReaperError && err.code === "SR_STORE_UNAVAILABLE";

/** Sessions with some bulk, inserted in one transaction (new pages: the database must grow to hold them). */
function insert(store: Store, from: number, n: number): void {
  store.transaction(() => {
    for (let i = from; i < from + n; i++) {
      store.insertSession({ ...storedSession(`s${i}`, {}, T0), labels: { pad: "x".repeat(400) } });
    }
  });
}

/** One heartbeat flush of sessions s0..s(n-1) (their pages rewritten, as the write-behind does every second). */
function flush(store: Store, n: number, at: number): void {
  const batch: HeartbeatWrite[] = Array.from({ length: n }, (_, i) => ({
    id: `s${i}`,
    lastHeartbeatAt: at,
    lastActivityAt: at,
    deadline: at + 30_000,
  }));
  store.writeHeartbeats(batch);
}

/**
 * The issue's dead end, at the store: the WAL fills the disk (here a reader of another
 * connection holds it, so no checkpoint can empty it), every write then needs the WAL to grow,
 * and the checkpoint that would empty it needs the database file to grow. Once the reader is
 * gone, the probe checkpoints during the outage (into the blocks of the released reserve) and
 * commits; the reserve is whole again and nothing committed was lost.
 */
test("a WAL that filled its disk comes back: the probe checkpoints it into the released reserve and remakes the reserve", (t) => {
  const mnt = mountTmpfs(tempDir(t), "db", SIZE);
  const file = join(mnt, "reaper.db");
  const store = new Store(file, T0);
  t.after(() => store.close());
  insert(store, 0, 20);

  const reader = new BetterSqlite3(file, { readonly: true });
  t.after(() => {
    if (reader.open) reader.close();
  });
  reader.exec("BEGIN");
  assert.equal((reader.prepare("SELECT COUNT(*) AS n FROM sessions").get() as { n: number }).n, 20);

  // New sessions (pages the database file does not have yet), then heartbeats until the disk is full.
  insert(store, 20, 40);
  let at = T0;
  let flushes = 0;
  assert.throws(() => {
    for (; flushes < 10_000; flushes++) flush(store, 60, (at += 1000));
  }, unavailable);
  assert.equal(store.available, false);
  assert.match(store.lastFault ?? "", /^SQLITE_FULL/);
  t.diagnostic(`full after ${flushes} flushes: WAL ${sizeOf(`${file}-wal`)} bytes, ${free(mnt)} free`);
  assert.ok(free(mnt) < 4096, `${free(mnt)} bytes free`);
  const committed = at - 1000;

  reader.exec("COMMIT");
  reader.close();
  assert.equal(store.probe(at), true, store.lastFault ?? "");
  assert.equal(store.available, true);
  assert.equal(store.getSession("s59")?.lastHeartbeatAt, committed, "what committed before the disk filled");
  // Writes go on, new pages and rewritten ones.
  insert(store, 60, 5);
  flush(store, 65, (at += 1000));
  assert.equal(store.getSession("s64")?.lastHeartbeatAt, at);
  assert.deepEqual(store.counts(), { live: 65, reaping: 0, reaped: 0 });
  assert.equal(sizeOf(`${file}.reserve`), RESERVE, "the reserve is whole again");
  assert.ok(sizeOf(`${file}-wal`) < HEADROOM, `WAL ${sizeOf(`${file}-wal`)} bytes`);
  assert.ok(free(mnt) >= HEADROOM / 2, `${free(mnt)} bytes free`);
});

/**
 * A disk that someone else filled: what the store holds (its reserve, its WAL) could not buy
 * the room it needs, so nothing of it is freed (their writer would take it). A little room
 * back is not enough either (the store would run out again mid-reap); once the file system
 * has room for the store's reserve and headroom, the probe commits.
 */
test("a disk someone else filled is left alone; the store commits again once its reserve and headroom fit", (t) => {
  const mnt = mountTmpfs(tempDir(t), "db", SIZE);
  const file = join(mnt, "reaper.db");
  const store = new Store(file, T0);
  t.after(() => store.close());
  insert(store, 0, 20);
  flush(store, 20, T0 + 1000);

  const filler = join(mnt, "filler");
  fillUp(filler);
  let at = T0 + 1000;
  assert.throws(() => {
    for (let i = 0; i < 1000; i++) flush(store, 20, (at += 1000));
  }, unavailable);
  const held = { wal: sizeOf(`${file}-wal`), reserve: sizeOf(`${file}.reserve`), db: sizeOf(file) };
  for (let i = 0; i < 3; i++) assert.equal(store.probe((at += 1000)), false);
  assert.deepEqual(
    { wal: sizeOf(`${file}-wal`), reserve: sizeOf(`${file}.reserve`), db: sizeOf(file) },
    held,
    "the store freed what it holds while someone else fills the disk",
  );
  assert.ok(free(mnt) < 4096, `${free(mnt)} bytes free`);

  // Some room back, but with the WAL (which a checkpoint would empty) less than the headroom: still out.
  truncateSync(filler, sizeOf(filler) - Math.max(4096, HEADROOM - held.wal - 16 * 1024));
  assert.equal(store.probe((at += 1000)), false);
  assert.equal(store.available, false);
  t.diagnostic(store.lastFault ?? "");
  assert.match(store.lastFault ?? "", /^SQLITE_FULL.*has \d+ KiB free.* KiB short$/);
  assert.equal(held.reserve, RESERVE);

  // Room enough.
  truncateSync(filler, sizeOf(filler) - HEADROOM);
  assert.equal(store.probe((at += 1000)), true, store.lastFault ?? "");
  flush(store, 20, (at += 1000));
  assert.equal(store.getSession("s19")?.lastHeartbeatAt, at);
  assert.equal(sizeOf(`${file}.reserve`), RESERVE);
});
