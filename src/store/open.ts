/**
 * Opening the database: the file and its directory, the pragmas the store relies on, an
 * integrity check, and the migrations. Anything wrong stops the start with an error that says
 * what to do (SR_STORE_CORRUPT, SR_STORE_UNUSABLE: exit 78).
 */
import BetterSqlite3, { type Database } from "better-sqlite3";
import { mkdirSync } from "node:fs";
import { dirname } from "node:path";
import { ReaperError, errorMessage } from "../errors.js";
import { migrate } from "./migrate.js";
import { DiskSpace } from "./space.js";

/**
 * SQLite result codes that say the store cannot commit now, not that the daemon is wrong:
 * another process holds the lock, the disk is full, an I/O error, a file made read-only or
 * damaged under the daemon. Such a failure fences nothing and crashes nothing (the daemon
 * answers 503 SR_STORE_UNAVAILABLE and waits for the store to commit again).
 */
const STORE_FAULTS = /^SQLITE_(BUSY|LOCKED|FULL|IOERR|READONLY|CANTOPEN|CORRUPT|NOTADB|PROTOCOL|NOMEM|PERM)/;

export function isStoreFault(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" && STORE_FAULTS.test(code);
}

/**
 * Lock contention is waited for this long per statement, no longer: the wait blocks the
 * event loop (better-sqlite3 is synchronous), and heartbeats are served on it.
 */
export const BUSY_TIMEOUT_MS = 200;
export const PROBE_BUSY_TIMEOUT_MS = 20;

/** Why a store could not be opened, said so that an operator knows what to do. */
export function openError(err: unknown, path: string): ReaperError {
  if (err instanceof ReaperError) return err;
  const raw = (err as { code?: unknown }).code;
  const code = typeof raw === "string" ? raw : "";
  if (/^SQLITE_(CORRUPT|NOTADB)/.test(code)) return corrupt(path, errorMessage(err));
  return new ReaperError(
    "SR_STORE_UNUSABLE",
    `cannot open the database ${path} for writing (${code || "error"}: ${errorMessage(err)}): check that the file, its -wal and -shm files and its directory are writable by the daemon's user and that the disk has space`,
  );
}

export function corrupt(path: string, found: string): ReaperError {
  return new ReaperError(
    "SR_STORE_CORRUPT",
    `the database ${path} is corrupt (${found}); the daemon will not start on it. Stop here: move the file and its -wal and -shm files aside (keep them for inspection, e.g. sqlite3 FILE .recover), then restore a backup or start on a new, empty database; engines of sessions it listed as live are then unknown to the daemon (an orphan sweep profile can find them)`,
  );
}

/** A database up to this size is converted to incremental vacuum at open (a VACUUM: well under a second). */
const CONVERT_UP_TO_BYTES = 64 * 1024 * 1024;

/**
 * Retention frees pages; with auto_vacuum = INCREMENTAL they are given back to the file
 * system (the purge's `vacuumStep`), so the file shrinks after a burst. A new database gets
 * it before anything is written (openDatabase); an existing one needs a VACUUM (a rewrite of the whole file under
 * an exclusive lock), done here only for a small file. A larger one keeps reusing its free
 * pages (it stops growing, it does not shrink): docs/operations.md says how to convert it.
 * A VACUUM that fails (a full disk) changes nothing and does not stop the start.
 */
function incrementalVacuum(db: Database): void {
  if (db.memory || db.pragma("auto_vacuum", { simple: true }) === 2) return;
  const size =
    (db.pragma("page_count", { simple: true }) as number) * (db.pragma("page_size", { simple: true }) as number);
  if (size > CONVERT_UP_TO_BYTES) return;
  try {
    db.pragma("auto_vacuum = INCREMENTAL");
    db.exec("VACUUM");
  } catch {
    // stays as it was; the free pages are still reused
  }
}

function isEmpty(db: Database): boolean {
  return (db.prepare("SELECT COUNT(*) AS n FROM sqlite_schema").get() as { n: number }).n === 0;
}

/** Opens, checks and migrates the database at `path` (":memory:" for none on disk). */
export function openDatabase(path: string, now: number): { db: Database; space: DiskSpace | null } {
  let db: Database | null = null;
  let space: DiskSpace | null = null;
  try {
    if (path !== ":memory:") {
      mkdirSync(dirname(path), { recursive: true });
      space = new DiskSpace(path);
    }
    db = new BetterSqlite3(path);
    db.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
    // Before WAL: a new database takes its vacuum mode only before its header is written.
    const fresh = isEmpty(db);
    if (fresh) db.pragma("auto_vacuum = INCREMENTAL");
    db.pragma("journal_mode = WAL");
    // NORMAL in WAL mode: a commit survives a daemon crash; only an OS crash may lose the
    // last transactions, and the journal is replayed from whatever did reach the disk.
    db.pragma("synchronous = NORMAL");
    db.pragma("foreign_keys = ON");
    if (space !== null) {
      // The WAL's bound (see DiskSpace): SQLite checkpoints at the commit that crosses it
      // (writes outside `transaction` included), `boundWal` then truncates the file to zero,
      // and a WAL that SQLite restarts is cut back to its first transaction. So every write
      // after a checkpoint takes new blocks: a disk that someone else filled is found at the
      // next commit, never written on through blocks the WAL happened to hold.
      db.pragma(
        `wal_autocheckpoint = ${Math.ceil(space.walLimit / (db.pragma("page_size", { simple: true }) as number))}`,
      );
      db.pragma("journal_size_limit = 0");
    }
    // quick_check reads every page (not the indexes' contents): milliseconds for the few
    // MiB a session table takes, and garbage pages are found before anything acts on them.
    const check = db.pragma("quick_check(20)", { simple: false }) as { quick_check: string }[];
    const problems = check.map((r) => r.quick_check).filter((m) => m !== "ok");
    if (problems.length > 0) throw corrupt(path, `quick_check: ${problems.slice(0, 3).join("; ")}`);
    if (!fresh) incrementalVacuum(db);
    migrate(db, now);
  } catch (err) {
    db?.close();
    throw openError(err, path);
  }
  return { db, space };
}
