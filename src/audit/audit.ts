import { EventEmitter } from "node:events";
import type { Logger } from "pino";
import type { Clock } from "../clock.js";
import { ReaperError } from "../errors.js";
import type { NewEvent, Store } from "../store/store.js";

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
  "orphan.found",
  "daemon.stalled",
] as const;
export type AuditEventName = (typeof AUDIT_EVENTS)[number];

/** The stored event's fields, with the event name narrowed to the audit vocabulary. */
export interface AuditEvent extends Omit<NewEvent, "at" | "event"> {
  event: AuditEventName;
}

export interface RecordedAuditEvent extends AuditEvent {
  at: number;
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
      this.store.insertEvent(full);
      this.pending.push(full);
      return;
    }
    try {
      this.store.transaction(() => this.store.insertEvent(full));
    } catch (err) {
      if (!(err instanceof ReaperError && err.code === "SR_STORE_UNAVAILABLE")) throw err;
      full.detail = { ...full.detail, stored: false };
    }
    this.publish(full);
  }

  /**
   * The line and the event, after the commit. Never throws: the decision is committed, and
   * what fails here (a listener) must not turn it into an error for the caller.
   */
  private publish(e: RecordedAuditEvent): void {
    const { at, ...fields } = e;
    void at; // pino stamps the line with the same injected clock (see createLogger)
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
