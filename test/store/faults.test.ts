import assert from "node:assert/strict";
import BetterSqlite3 from "better-sqlite3";
import { closeSync, openSync, readFileSync, statSync, writeSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { ReaperError } from "../../src/errors.js";
import type { Session } from "../../src/model/session.js";
import { DatabaseLock } from "../../src/store/lock.js";
import { Store, isStoreFault } from "../../src/store/store.js";
import { storedSession, tempDir } from "../helpers.js";

const T0 = Date.UTC(2026, 0, 1);

const session = (id: string): Session => storedSession(id, { owner: null }, T0);

function code(err: unknown): string | undefined {
  return err instanceof ReaperError ? err.code : undefined;
}

test("a write lock held by another connection: SR_STORE_UNAVAILABLE at once, nothing half-done, a probe brings it back", (t) => {
  const file = join(tempDir(t), "reaper.db");
  const store = new Store(file, T0);
  t.after(() => store.close());
  const health: string[] = [];
  store.onHealth({ unavailable: (f) => health.push(`down ${f}`), available: () => health.push("up") });
  store.insertSession(session("before"));

  // Another process's `BEGIN EXCLUSIVE` (a second connection: a real SQLite lock).
  const other = new BetterSqlite3(file);
  t.after(() => other.close());
  other.exec("BEGIN EXCLUSIVE");
  const t0 = performance.now();
  assert.throws(
    () => store.transaction(() => store.insertSession(session("during"))),
    (err) => code(err) === "SR_STORE_UNAVAILABLE",
  );
  const waited = performance.now() - t0;
  assert.ok(waited < 2000, `the loop was blocked ${waited} ms`);
  assert.equal(store.available, false);
  assert.equal(health.length, 1);
  assert.match(health[0] ?? "", /^down SQLITE_BUSY/);
  // While unavailable, a write fails at once (no second wait on the lock), and still in the envelope.
  const t1 = performance.now();
  assert.throws(
    () => store.transaction(() => store.fence("before", "forced", T0)),
    (err) => code(err) === "SR_STORE_UNAVAILABLE",
  );
  assert.ok(performance.now() - t1 < 50);
  // Reads go on (WAL: a writer never blocks readers).
  assert.equal(store.getSession("before")?.state, "live");
  assert.equal(store.probe(T0 + 1), false);
  assert.equal(store.available, false);

  other.exec("ROLLBACK");
  assert.equal(store.probe(T0 + 2), true);
  assert.equal(store.available, true);
  assert.deepEqual(health.slice(1), ["up"]);
  assert.equal(store.getSession("during"), undefined, "a refused registration left a row");
  store.transaction(() => store.insertSession(session("after")));
  assert.deepEqual(store.counts(), { live: 2, reaping: 0, reaped: 0 });
});

test("isStoreFault: locks, full disks, I/O errors and damage are store faults; constraints and bugs are not", () => {
  for (const c of [
    "SQLITE_BUSY",
    "SQLITE_FULL",
    "SQLITE_IOERR_WRITE",
    "SQLITE_READONLY",
    "SQLITE_CORRUPT",
    "SQLITE_NOTADB",
  ]) {
    assert.equal(isStoreFault({ code: c }), true, c);
  }
  for (const c of ["SQLITE_CONSTRAINT_UNIQUE", "SQLITE_ERROR", "SR_SESSION_EXISTS", undefined]) {
    assert.equal(isStoreFault({ code: c }), false, String(c));
  }
  assert.equal(isStoreFault(new TypeError("x")), false);
});

test("a corrupt page is found at start: SR_STORE_CORRUPT, with what to do", (t) => {
  const file = join(tempDir(t), "reaper.db");
  const store = new Store(file, T0);
  store.transaction(() => {
    for (let i = 0; i < 400; i++) store.insertSession({ ...session(`s${i}`), labels: { pad: "x".repeat(200) } });
  });
  store.checkpoint();
  store.close();
  const size = statSync(file).size;
  assert.ok(size > 8 * 4096, `only ${size} bytes`);
  // Garbage over a page in the middle of the file (not the header: the file still opens).
  const fd = openSync(file, "r+");
  writeSync(fd, Buffer.alloc(4096, 0xa5), 0, 4096, 4096 * Math.floor(size / 4096 / 2));
  closeSync(fd);
  assert.throws(
    () => new Store(file, T0),
    (err) =>
      code(err) === "SR_STORE_CORRUPT" &&
      /corrupt/.test((err as Error).message) &&
      /move the file/.test((err as Error).message),
  );
});

test("a database that cannot be written stops the start with SR_STORE_UNUSABLE, not a stack", (t) => {
  const dir = tempDir(t);
  const file = join(dir, "reaper.db");
  new Store(file, T0).close();
  // Not a file SQLite can open as a database: a directory where the file should be.
  assert.throws(
    () => new Store(dir, T0),
    (err) => code(err) === "SR_STORE_UNUSABLE" && (err as Error).message.includes(dir),
  );
});

test("one daemon per database: the lock refuses a second holder and names the first", (t) => {
  const file = join(tempDir(t), "reaper.db");
  const first = DatabaseLock.acquire(file, 4242);
  assert.equal(readFileSync(`${file}.lock`, "utf8"), "4242\n");
  assert.throws(
    () => DatabaseLock.acquire(file, 4343),
    (err) => code(err) === "SR_ALREADY_RUNNING" && /pid 4242/.test((err as Error).message),
  );
  assert.equal(readFileSync(`${file}.lock`, "utf8"), "4242\n", "the refused one wrote its pid");
  first.release();
  first.release();
  const second = DatabaseLock.acquire(file, 4343);
  t.after(() => second.release());
  assert.equal(readFileSync(`${file}.lock`, "utf8"), "4343\n");
});
