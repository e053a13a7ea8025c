import { EventEmitter } from "node:events";
import type { Logger } from "pino";
import type { Clock } from "../clock.js";
import { ReaperError } from "../errors.js";
import type { NewEvent, Store } from "../store/store.js";
import type { DroppedLines } from "./sink.js";

export const AUDIT_EVENTS = [
  "daemon.started",
  "daemon.stopping",
  "daemon.stopped",
  "session.registered",
  "session.updated",
  "session.closed",
  "session.expired",
  "reap.started",
  "reap.step",
  "reap.finished",
  // A reap that left unkillable processes, finished once they were all gone (src/reaper/resolver.ts).
  "reap.resolved",
  "orphan.found",
  "daemon.stalled",
  "daemon.lines_dropped",
  "session.damaged",
  "store.purged",
  "session.warning",
  "session.extended",
] as const;
export type AuditEventName = (typeof AUDIT_EVENTS)[number];

/** The stored event's fields, with the event name narrowed to the audit vocabulary. */
export interface AuditEvent extends Omit<NewEvent, "at" | "event"> {
  event: AuditEventName;
}

export interface RecordedAuditEvent extends AuditEvent {
  at: number;
  /**
   * Its row's seq in audit_events (SQLite AUTOINCREMENT: commit order), which the event stream
   * (GET /v1/events) resumes from; absent when the row could not be stored (`stored: false`).
   */
  seq?: number;
}

/**
 * The audit trail: each decision is one row in SQLite and one pino JSON line (stdout, so
 * journald, or a file), and is emitted as a typed event so tests and the daemon's own parts
 * can wait for it instead of sleeping.
 *
 * `record` inside a store transaction persists with that transaction; the line is written
 * and the event emitted only once the transaction has committed, so the trail never
 * announces a decision the database does not hold.
 */
export class AuditTrail {
  readonly events = new EventEmitter<{ audit: [RecordedAuditEvent] }>();
  private pending: RecordedAuditEvent[] | null = null;
  private pendingAfter: (() => void)[] = [];

  constructor(
    private readonly store: Store,
    private readonly log: Logger,
    private readonly clock: Clock,
  ) {
    this.events.setMaxListeners(0);
  }

  /** Runs `fn` in one transaction; events recorded inside are published after commit. */
  transaction<T>(fn: () => T): T {
    if (this.pending !== null) return fn();
    this.pending = [];
    let result: T;
    let committed: RecordedAuditEvent[];
    let after: (() => void)[];
    try {
      result = this.store.transaction(fn);
      committed = this.pending;
      after = this.pendingAfter;
    } finally {
      this.pending = null;
      this.pendingAfter = [];
    }
    for (const e of committed) this.publish(e);
    for (const fn of after) fn();
    return result;
  }

  /**
   * Runs `fn` in a transaction shared with every other `commitSoon` of the same turn of the
   * event loop (a group commit), and resolves once that transaction has committed and its
   * events are published: what awaits it acts only on a committed record, as with
   * `transaction`, but a storm's step records cost one commit a turn, not one each. If the
   * store cannot commit (SR_STORE_UNAVAILABLE), every write of the group rejects with that;
   * if the group fails for another reason, each write is retried in a transaction of its
   * own, so one faulty write fails only itself.
   */
  commitSoon(fn: () => void): Promise<void> {
    return new Promise((resolve, reject) => {
      this.group.push({ fn, resolve, reject });
      if (this.group.length === 1) setImmediate(() => this.flushGroup());
    });
  }

  /** Group commits made and the writes they carried (for tests). */
  readonly groupStats = { commits: 0, writes: 0 };
  private group: { fn: () => void; resolve: () => void; reject: (err: unknown) => void }[] = [];

  private flushGroup(): void {
    const batch = this.group;
    this.group = [];
    try {
      this.transaction(() => {
        for (const w of batch) w.fn();
      });
    } catch (err) {
      const store = err instanceof ReaperError && err.code === "SR_STORE_UNAVAILABLE";
      for (const w of batch) {
        if (store || batch.length === 1) {
          w.reject(err);
          continue;
        }
        try {
          this.transaction(w.fn);
          w.resolve();
        } catch (own) {
          w.reject(own);
        }
      }
      return;
    }
    this.groupStats.commits++;
    this.groupStats.writes += batch.length;
    for (const w of batch) w.resolve();
  }

  /**
   * Runs `fn` once the current transaction has committed (at once outside one), after its
   * events are published; dropped if it rolls back. What acts on a decision (the reaper
   * queueing a fenced session) waits for the outermost commit, also when the decision is
   * taken inside a larger transaction (the orphan sweep inserts and fences in one).
   */
  afterCommit(fn: () => void): void {
    if (this.pending !== null) this.pendingAfter.push(fn);
    else fn();
  }

  /**
   * Records one event. Inside a transaction it commits or rolls back with it (and a store
   * failure propagates to the transaction's caller). Outside one, the row is its own
   * transaction; if the store cannot commit it (SR_STORE_UNAVAILABLE), the line is still
   * written and the event emitted, marked `stored: false`: a daemon-level event (stopping,
   * stalled) must not fail what records it.
   */
  record(e: AuditEvent): void {
    const full: RecordedAuditEvent = { ...e, at: this.clock.now() };
    if (full.durationMs !== undefined) full.durationMs = Math.round(full.durationMs);
    if (this.pending !== null) {
      full.seq = this.store.insertEvent(full);
      this.pending.push(full);
      return;
    }
    try {
      full.seq = this.store.transaction(() => this.store.insertEvent(full));
    } catch (err) {
      if (!(err instanceof ReaperError && err.code === "SR_STORE_UNAVAILABLE")) throw err;
      full.detail = { ...full.detail, stored: false };
    }
    this.publish(full);
  }

  /**
   * Records what the log sink could not write, once it writes again (`take`: the sink's
   * `takeDropped`): one `daemon.lines_dropped` per report, naming the audit lines the log
   * lacks, so that `audit verify` can account for them. Never throws: what cannot be recorded
   * now (the store is closed, the daemon stopping) stays counted in the metric.
   */
  recordDroppedLines(take: () => DroppedLines | null): void {
    // Taken first: a report whose own line is dropped again goes to the next round, not this one.
    const reports: DroppedLines[] = [];
    for (let d = take(); d !== null; d = take()) reports.push(d);
    try {
      for (const d of reports) this.record({ event: "daemon.lines_dropped", detail: { ...d } });
    } catch {
      // the metric counted every line; the stderr note said so
    }
  }

  /**
   * The line and the event, after the commit. Never throws: the decision is committed, and
   * what fails here (a listener) must not turn it into an error for the caller.
   */
  private publish(e: RecordedAuditEvent): void {
    const { at, seq, ...fields } = e;
    void at; // pino stamps the line with the same injected clock (see createLogger)
    void seq; // the row's own: the line stays as it was (audit verify reads lines, not rows)
    try {
      this.log.info(fields, e.event);
    } catch {
      // the sink counts what it could not write (src/audit/sink.ts)
    }
    try {
      this.events.emit("audit", e);
    } catch {
      // a listener's failure is its own
    }
  }
}
