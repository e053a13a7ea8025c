import { closeSync, fstatSync, ftruncateSync, mkdirSync, openSync, readSync, writeSync } from "node:fs";
import { dirname } from "node:path";
import { errorMessage } from "../errors.js";

/** How long a write to a full pipe (EAGAIN) is retried before the line is dropped. */
const EAGAIN_BUDGET_MS = 100;
/** At most one note on stderr per this many ms about lines that could not be written. */
const NOTE_EVERY_MS = 10_000;
/** Dropped audit lines named in memory until they are reported; beyond, only counted. */
const NAMES_KEPT = 10_000;
/** Names per report: a report is one log line, and journald splits lines over 48 KiB. */
const NAMES_PER_REPORT = 100;

/** An audit line that could not be written, by the fields `audit verify` needs. */
export interface DroppedAuditLine {
  event: string;
  sessionId?: string;
}

/**
 * Lines the sink dropped, as one report (the `daemon.lines_dropped` event's detail). Reports
 * add up: `lines` and `auditLines` count what this report accounts for, `events` names at
 * most NAMES_PER_REPORT of its audit lines and `unnamed` is how many of them no report names.
 */
export interface DroppedLines {
  /** Lines dropped, operational and audit. */
  lines: number;
  auditLines: number;
  events: DroppedAuditLine[];
  unnamed: number;
  /** The last error (ENOSPC, EPIPE, …). */
  error: string;
  /** The `time` of the first and last dropped line of the whole stretch. */
  from: string | null;
  to: string | null;
}

/** Dropped lines not reported yet. */
interface Unreported {
  lines: number;
  names: DroppedAuditLine[];
  unnamed: number;
  from: string | null;
  to: string | null;
}

/**
 * Where log and audit lines go (stdout for journald, or a file): synchronous writes, so a
 * daemon killed with SIGKILL loses no line sitting in a buffer.
 *
 * A sink that fails (a full disk, a closed pipe, a file made read-only) never throws: a
 * committed change must not turn into a 500, and a failing line must not crash the daemon
 * (pino's own destination throws from write(), and from its fatal handler). The line is
 * dropped and counted; SQLite's audit rows stay the source of truth. A note goes to stderr
 * at most every ten seconds, unless stderr is the sink that fails.
 *
 * A line is written whole or not at all. A full file system takes the part of a line that
 * fits in its last block and refuses the rest (a short write, then ENOSPC): the part written
 * is cut off again (ftruncate), or else, where the file cannot be cut (a pipe, journald's
 * stream, an append-only file), the next line starts with a newline, so the damage stays one
 * malformed line that `audit verify` names instead of fusing with, and losing, the next one.
 * What was dropped is named (audit lines by event and session) and handed over through
 * `onRecovered` once a line is written again; the daemon records it as `daemon.lines_dropped`.
 */
export class LogSink {
  private fd: number;
  private readonly file: string;
  private droppedLines = 0;
  private lastNote = Number.NEGATIVE_INFINITY;
  private lastError: string | null = null;
  /** The file does not end with a newline (a partial line that could not be cut). */
  private torn = false;
  /** Dropped since the last report, or null. */
  private unreported: Unreported | null = null;
  private recoveryScheduled = false;
  /** Told of every dropped line (the daemon's metric). */
  onDrop: ((error: string) => void) | null = null;
  /**
   * Called on a later turn of the event loop (never from inside a write, which pino is in)
   * once a line is written after lines were dropped: `takeDropped` then has the report.
   */
  onRecovered: (() => void) | null = null;

  /** `file` empty: stdout. */
  constructor(file: string) {
    this.file = file;
    this.fd = file === "" ? 1 : this.open();
  }

  /** Lines dropped since start. */
  get dropped(): number {
    return this.droppedLines;
  }

  /** Whether lines go to a file of the sink's own (not stdout), which `reopen` can open again. */
  get ownsFile(): boolean {
    return this.file !== "";
  }

  write(line: string): void {
    if (this.fd < 0) return;
    const buf = Buffer.from(this.torn ? `\n${line}` : line);
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
        if (off > 0) this.cut(buf, off);
        this.drop(line, code ?? errorMessage(err));
        return;
      }
    }
    this.torn = false;
    if (this.unreported !== null && !this.recoveryScheduled) {
      this.recoveryScheduled = true;
      setImmediate(() => {
        this.recoveryScheduled = false;
        try {
          this.onRecovered?.();
        } catch {
          // the report is the daemon's; a failure there cannot fail the write path
        }
      });
    }
  }

  /**
   * The next report of dropped lines (at most NAMES_PER_REPORT names; call again until null),
   * with the last error. Taking it means it will be recorded: it is forgotten here.
   */
  takeDropped(): DroppedLines | null {
    const u = this.unreported;
    if (u === null) return null;
    const events = u.names.splice(0, NAMES_PER_REPORT);
    // The last report also accounts for the operational lines and the unnamed audit lines.
    const lines = u.names.length === 0 ? u.lines : events.length;
    const report: DroppedLines = {
      lines,
      auditLines: events.length + (u.names.length === 0 ? u.unnamed : 0),
      events,
      unnamed: u.names.length === 0 ? u.unnamed : 0,
      error: this.lastError ?? "unknown",
      from: u.from,
      to: u.to,
    };
    u.lines -= lines;
    if (u.names.length === 0) this.unreported = null;
    return report;
  }

  /**
   * Opens the file again at its path (logrotate moved it away and sends SIGHUP): lines go to
   * the new file from now on, and the old one is closed as it stands, every line in it whole.
   * Throws if it cannot be opened; lines then go on to the file already open.
   */
  reopen(): void {
    if (this.file === "" || this.fd < 0) return;
    const fd = this.open();
    const old = this.fd;
    this.fd = fd;
    closeSync(old);
  }

  /** Writes are synchronous: nothing is ever buffered. */
  flushSync(): void {}

  close(): void {
    if (this.file !== "" && this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }

  /** Opens the file for appending; one that does not end with a newline gets one before the next line. */
  private open(): number {
    mkdirSync(dirname(this.file), { recursive: true });
    const fd = openSync(this.file, "a", 0o640);
    this.torn = !endsWithNewline(this.file, fd);
    return fd;
  }

  /**
   * `written` bytes of `buf` are in the file and the rest never will be: the file is cut back
   * to where it was before them. Nothing else appends to the file, so that is its size less
   * what was written (also after a copytruncate emptied it meanwhile). Where it cannot be cut,
   * the next line starts on a line of its own.
   */
  private cut(buf: Buffer, written: number): void {
    try {
      const st = fstatSync(this.fd);
      if (!st.isFile() || st.size < written) throw new Error("not a file that can be cut");
      ftruncateSync(this.fd, st.size - written);
    } catch {
      this.torn = buf[written - 1] !== 0x0a;
    }
  }

  private drop(line: string, error: string): void {
    this.droppedLines++;
    this.lastError = error;
    this.remember(line);
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

  /**
   * Counts a dropped line for the next report; an audit line is named by its event and
   * session. A report's own line that is dropped is folded back into the next report, so the
   * reports in the log add up to every line dropped (its row in SQLite stays).
   */
  private remember(line: string): void {
    const u = (this.unreported ??= { lines: 0, names: [], unnamed: 0, from: null, to: null });
    let rec: { audit?: unknown; event?: unknown; sessionId?: unknown; time?: unknown; detail?: unknown } = {};
    try {
      rec = JSON.parse(line) as typeof rec; // lines are dropped rarely: parsing them is cheap enough
    } catch {
      // not JSON: counted, not named
    }
    if (rec.audit === true && rec.event === "daemon.lines_dropped" && isReport(rec.detail)) {
      const d = rec.detail;
      u.lines += d.lines;
      for (const name of d.events) this.name(u, name);
      u.unnamed += d.unnamed;
      if (d.from !== null && (u.from === null || d.from < u.from)) u.from = d.from;
      if (d.to !== null && (u.to === null || d.to > u.to)) u.to = d.to;
      return;
    }
    u.lines++;
    if (typeof rec.time === "string") {
      u.from ??= rec.time;
      u.to = rec.time;
    }
    if (rec.audit !== true) return;
    if (typeof rec.event !== "string") u.unnamed++;
    else
      this.name(
        u,
        typeof rec.sessionId === "string" ? { event: rec.event, sessionId: rec.sessionId } : { event: rec.event },
      );
  }

  private name(u: Unreported, name: DroppedAuditLine): void {
    if (u.names.length < NAMES_KEPT) u.names.push(name);
    else u.unnamed++;
  }
}

/** A `daemon.lines_dropped` detail as this sink writes it. */
function isReport(d: unknown): d is DroppedLines {
  const r = d as Partial<DroppedLines> | null;
  return (
    typeof r === "object" &&
    r !== null &&
    typeof r.lines === "number" &&
    typeof r.unnamed === "number" &&
    Array.isArray(r.events) &&
    (r.from === null || typeof r.from === "string") &&
    (r.to === null || typeof r.to === "string")
  );
}

/** Whether the file is empty or ends with a newline (true when that cannot be read). */
function endsWithNewline(file: string, fd: number): boolean {
  let size: number;
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) return true;
    size = st.size;
  } catch {
    return true;
  }
  if (size === 0) return true;
  let rfd: number | null = null;
  try {
    // The append descriptor is write-only.
    rfd = openSync(file, "r");
    const last = Buffer.alloc(1);
    return readSync(rfd, last, 0, 1, size - 1) !== 1 || last[0] === 0x0a;
  } catch {
    return true;
  } finally {
    if (rfd !== null) closeSync(rfd);
  }
}
