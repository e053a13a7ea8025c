import { randomFillSync } from "node:crypto";
import { closeSync, openSync, rmSync, statSync, statfsSync, truncateSync, writeSync } from "node:fs";
import { dirname } from "node:path";

/** The WAL's bound is this share of the file system under the database, within the limits below. */
const WAL_SHARE = 16;
const WAL_LIMIT_MIN = 64 * 1024;
/** SQLite's own default (1000 pages of 4 KiB, checkpointed at commit): big disks keep its pace. */
const WAL_LIMIT_MAX = 4 * 1024 * 1024;
const CHUNK = 64 * 1024;

/** What the store holds and what is free on the file system under the database, in bytes. */
export interface SpaceReading {
  /** Free for the daemon's user (statfs f_bavail: what an unprivileged writer may still take). */
  free: number;
  /** The reserve file's size. */
  reserve: number;
  /** The WAL file's size. */
  wal: number;
}

/**
 * The disk under the database, kept able to come back from full.
 *
 * A WAL checkpoint copies pages from the WAL into the database file, which grows by the pages
 * that are new: on a full disk the checkpoint fails, so the WAL can never be emptied, and every
 * write needs the WAL to grow: a store stuck unavailable with nothing else on the disk. Three
 * things keep that from happening:
 *
 * - a bound on the WAL (`walLimit`, 1/16 of the file system, 64 KiB to 4 MiB): the store
 *   checkpoints and truncates the WAL whenever a commit leaves it at or above the bound;
 * - a reserve file beside the database (`reserveSize` = the bound): released when a checkpoint
 *   has no room to grow the database (it holds at least what a bounded WAL can add), recreated
 *   before the store commits again;
 * - `headroom` (twice the bound): after running out, the store commits again only with its
 *   reserve whole and this much free, room for the WAL to reach its bound and for the
 *   transaction that crosses it. A disk that someone else filled is left alone (what the store
 *   holds could not buy that much room, so nothing of it is freed); once they free space, the
 *   store checkpoints, remakes its reserve and commits.
 *
 * The reserve is written with bytes that do not compress, so that it holds real blocks on a
 * compressing file system too (a file of zeros, or a sparse one, would hold none).
 */
export class DiskSpace {
  /** The WAL is checkpointed and truncated once a commit leaves it this large. */
  readonly walLimit: number;
  readonly reserveSize: number;
  readonly headroom: number;
  readonly reservePath: string;
  private readonly walPath: string;
  private readonly dir: string;

  constructor(database: string) {
    this.dir = dirname(database);
    this.walPath = `${database}-wal`;
    this.reservePath = `${database}.reserve`;
    const fs = statfsSync(this.dir);
    const share = Math.floor((fs.blocks * fs.bsize) / WAL_SHARE / 4096) * 4096;
    this.walLimit = Math.min(WAL_LIMIT_MAX, Math.max(WAL_LIMIT_MIN, share));
    this.reserveSize = this.walLimit;
    this.headroom = 2 * this.walLimit;
  }

  read(): SpaceReading {
    const fs = statfsSync(this.dir);
    return { free: fs.bavail * fs.bsize, reserve: sizeOf(this.reservePath), wal: sizeOf(this.walPath) };
  }

  walBytes(): number {
    return sizeOf(this.walPath);
  }

  /**
   * Bytes the file system lacks before the store may commit again: its reserve whole and
   * `headroom` free, counting what the store itself holds (the reserve, the WAL, which a
   * checkpoint empties). 0: enough.
   */
  shortfall(r: SpaceReading = this.read()): number {
    return Math.max(0, this.reserveSize + this.headroom - r.free - r.reserve - r.wal);
  }

  /**
   * Grows the reserve file to its size; true when it is whole. On a full disk it keeps what
   * fit (ENOSPC, EDQUOT), to be grown later; any other error is thrown.
   */
  fillReserve(): boolean {
    let have = sizeOf(this.reservePath);
    // Larger than its size (the file system was smaller at an earlier start): cut to size.
    if (have > this.reserveSize) truncateSync(this.reservePath, this.reserveSize);
    if (have >= this.reserveSize) return true;
    const fd = openSync(this.reservePath, "a", 0o600);
    try {
      const chunk = Buffer.allocUnsafe(CHUNK);
      while (have < this.reserveSize) {
        const n = Math.min(CHUNK, this.reserveSize - have);
        randomFillSync(chunk, 0, n);
        try {
          have += writeSync(fd, chunk, 0, n);
        } catch (err) {
          const code = (err as NodeJS.ErrnoException).code;
          if (code === "ENOSPC" || code === "EDQUOT") return false;
          throw err;
        }
      }
      return true;
    } finally {
      closeSync(fd);
    }
  }

  /** Deletes the reserve: its blocks are free for a checkpoint. */
  releaseReserve(): void {
    rmSync(this.reservePath, { force: true });
  }
}

/** A file's size; 0 when it does not exist (no WAL yet, the reserve released). */
function sizeOf(path: string): number {
  return statSync(path, { throwIfNoEntry: false })?.size ?? 0;
}

/** Bytes as an operator reads them: KiB below a MiB, else MiB with one decimal. */
export function bytes(n: number): string {
  return n < 1024 * 1024 ? `${Math.ceil(n / 1024)} KiB` : `${(n / (1024 * 1024)).toFixed(1)} MiB`;
}
