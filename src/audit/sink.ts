import { closeSync, mkdirSync, openSync, writeSync } from "node:fs";
import { dirname } from "node:path";
import { errorMessage } from "../errors.js";

/** How long a write to a full pipe (EAGAIN) is retried before the line is dropped. */
const EAGAIN_BUDGET_MS = 100;
/** At most one note on stderr per this many ms about lines that could not be written. */
const NOTE_EVERY_MS = 10_000;

/**
 * Where log and audit lines go (stdout for journald, or a file): synchronous writes, so a
 * daemon killed with SIGKILL loses no line sitting in a buffer.
 *
 * A sink that fails (a full disk, a closed pipe, a file made read-only) never throws: a
 * committed change must not turn into a 500, and a failing line must not crash the daemon
 * (pino's own destination throws from write(), and from its fatal handler). The line is
 * dropped and counted; SQLite's audit rows stay the source of truth. A note goes to stderr
 * at most every ten seconds, unless stderr is the sink that fails.
 */
export class LogSink {
  private fd: number;
  private readonly ownsFd: boolean;
  private droppedLines = 0;
  private lastNote = Number.NEGATIVE_INFINITY;
  private lastError: string | null = null;
  /** Told of every dropped line (the daemon's metric). */
  onDrop: ((error: string) => void) | null = null;

  /** `file` empty: stdout. */
  constructor(file: string) {
    if (file === "") {
      this.fd = 1;
      this.ownsFd = false;
    } else {
      mkdirSync(dirname(file), { recursive: true });
      this.fd = openSync(file, "a", 0o640);
      this.ownsFd = true;
    }
  }

  /** Lines dropped since start. */
  get dropped(): number {
    return this.droppedLines;
  }

  write(line: string): void {
    if (this.fd < 0) return;
    const buf = Buffer.from(line);
    let off = 0;
    let waitedMs = 0;
    while (off < buf.length) {
      try {
        off += writeSync(this.fd, buf, off, buf.length - off);
      } catch (err) {
        const code = (err as { code?: string }).code;
        if (code === "EAGAIN" && waitedMs < EAGAIN_BUDGET_MS) {
          Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 5);
          waitedMs += 5;
          continue;
        }
        this.drop(code ?? errorMessage(err));
        return;
      }
    }
  }

  /** Writes are synchronous: nothing is ever buffered. */
  flushSync(): void {}

  close(): void {
    if (this.ownsFd && this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }

  private drop(error: string): void {
    this.droppedLines++;
    this.lastError = error;
    try {
      this.onDrop?.(error);
    } catch {
      // a metric cannot fail the write path
    }
    const now = performance.now();
    if (now - this.lastNote < NOTE_EVERY_MS || this.fd === 2) return;
    this.lastNote = now;
    try {
      writeSync(
        2,
        `reaperd: a log line could not be written (${this.lastError}); ${this.droppedLines} dropped so far\n`,
      );
    } catch {
      // stderr is gone too: the metric still counts
    }
  }
}
