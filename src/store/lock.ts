import { closeSync, ftruncateSync, mkdirSync, openSync, readFileSync, writeSync } from "node:fs";
import { dirname } from "node:path";
import { ReaperError, errorMessage } from "../errors.js";
import { addon } from "../native/addon.js";

/**
 * Exactly one daemon per database: an flock(2) on `<database>.lock`, taken before the
 * database is opened (before migrations, recovery or any write) and held for the daemon's
 * life. The kernel drops it when the process dies, however it dies, so a crashed daemon
 * never leaves a stale lock. The file holds the holder's pid, for the refusal's message.
 *
 * Two daemons on one database would both fence, both reap and both count: the second one
 * must refuse before it writes anything (SR_ALREADY_RUNNING, exit 78).
 */
export class DatabaseLock {
  private constructor(
    readonly path: string,
    private fd: number | null,
  ) {}

  /** Takes the lock, or throws SR_ALREADY_RUNNING naming the holder. `:memory:` needs none. */
  static acquire(database: string, pid: number): DatabaseLock {
    const path = `${database}.lock`;
    if (database === ":memory:") return new DatabaseLock(path, null);
    if (addon === null) {
      throw new ReaperError(
        "SR_STORE_UNUSABLE",
        `cannot lock ${path}: the native addon is not built (npm ci builds it), and without the lock a second daemon could reap the same sessions`,
      );
    }
    let fd: number;
    try {
      mkdirSync(dirname(path), { recursive: true });
      fd = openSync(path, "a+", 0o600);
    } catch (err) {
      throw new ReaperError("SR_STORE_UNUSABLE", `cannot open the lock file ${path}: ${errorMessage(err)}`);
    }
    let taken: boolean;
    try {
      taken = addon.flockExclusive(fd);
    } catch (err) {
      closeSync(fd);
      throw new ReaperError("SR_STORE_UNUSABLE", `cannot lock ${path}: ${errorMessage(err)}`);
    }
    if (!taken) {
      closeSync(fd);
      let holder = "";
      try {
        holder = readFileSync(path, "utf8").trim();
      } catch {
        // unreadable: the message says so
      }
      throw new ReaperError(
        "SR_ALREADY_RUNNING",
        `another reaperd${/^\d+$/.test(holder) ? ` (pid ${holder})` : ""} holds ${path}: one daemon per database; stop it first, or give this one another [store] path`,
        { holder: /^\d+$/.test(holder) ? Number(holder) : null },
      );
    }
    try {
      ftruncateSync(fd, 0);
      writeSync(fd, `${pid}\n`);
    } catch {
      // the pid is only for the message; the lock itself is held
    }
    return new DatabaseLock(path, fd);
  }

  /** Releases the lock (daemon stop). Idempotent. */
  release(): void {
    if (this.fd === null) return;
    closeSync(this.fd);
    this.fd = null;
  }
}
