/**
 * Retention: what a year on a busy host must not keep. Reaped sessions whose reap ended more
 * than `store.retain_reaped_sec` ago are purged with their reap steps and audit events, each
 * leaving a tombstone (id, when it ended, reason, outcome) kept `store.retain_tombstones_sec`;
 * audit events of no session (daemon.*, store.purged itself) go after `retain_reaped_sec` too.
 *
 * A pass runs in small batches, each one transaction with the `store.purged` event that says
 * what it removed (counts, the time range of the reaps' ends), and gives the loop back between
 * batches (the write lock is held for one batch, a few milliseconds). Then the free pages go
 * back to the file system a few at a time (incremental vacuum). Live and reaping sessions are
 * never selected: only rows in state `reaped` are (src/store/store.ts `purgeReaped`).
 */
import type { Logger } from "pino";
import type { Clock } from "../clock.js";
import { loopTurn } from "../pace/turns.js";
import type { Store } from "../store/store.js";
import type { AuditTrail } from "./audit.js";

/** Sessions per batch (each with its ~10 events and 6 steps): a few ms of the loop and the lock. */
const SESSIONS_PER_BATCH = 256;
/** Tombstones and events of no session per batch. */
const ROWS_PER_BATCH = 1024;
/** Pages given back to the file system per turn. */
const VACUUM_PAGES_PER_TURN = 512;
/** A pass at most this often, and at least every minute. */
const MIN_EVERY_MS = 1_000;
const MAX_EVERY_MS = 60_000;

export interface RetentionPolicy {
  readonly retainReapedSec: number;
  readonly retainTombstonesSec: number;
}

export interface PassResult {
  sessions: number;
  steps: number;
  events: number;
  tombstones: number;
  batches: number;
  freePagesLeft: number;
}

export class Retention {
  private timer: NodeJS.Timeout | null = null;
  private running: Promise<PassResult> | null = null;
  /** No pass is scheduled any more (stop). */
  private stopped = false;
  /** The pass under way ends at its next batch (stop waits for it). */
  private aborting = false;

  constructor(
    private readonly deps: { store: Store; audit: AuditTrail; clock: Clock; log: Logger; policy: RetentionPolicy },
  ) {}

  /** How often a pass runs: a quarter of the retention, between 1 s and a minute. */
  get everyMs(): number {
    const q = (this.deps.policy.retainReapedSec * 1000) / 4;
    return Math.min(MAX_EVERY_MS, Math.max(MIN_EVERY_MS, q));
  }

  /** Schedules the passes; none when `retain_reaped_sec` is 0 (reaped sessions are kept for ever). */
  start(): void {
    this.stopped = false;
    if (this.deps.policy.retainReapedSec === 0) return;
    this.schedule();
  }

  /** No more scheduled passes; the one under way stops at its next batch. `pass()` still runs one. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    this.aborting = true;
    await this.running?.catch(() => undefined);
    this.aborting = false;
  }

  private schedule(): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.pass()
        .catch((err: unknown) => this.deps.log.error({ err }, "retention pass failed"))
        .finally(() => this.schedule());
    }, this.everyMs);
    this.timer.unref();
  }

  /** One pass now (the next scheduled one still runs); a pass under way is joined. */
  pass(): Promise<PassResult> {
    this.running ??= this.run().finally(() => (this.running = null));
    return this.running;
  }

  private async run(): Promise<PassResult> {
    const { store, audit, clock, policy } = this.deps;
    const total: PassResult = { sessions: 0, steps: 0, events: 0, tombstones: 0, batches: 0, freePagesLeft: 0 };
    if (!store.available || policy.retainReapedSec === 0) return total;
    for (;;) {
      if (this.aborting) return total;
      const now = clock.now();
      const before = now - policy.retainReapedSec * 1000;
      const batch = audit.transaction(() => {
        // Read before this batch removes anything: it may remove the store.purged that holds it.
        const priorThrough = store.purgedThroughSeq();
        const purged = store.purgeReaped(before, SESSIONS_PER_BATCH, now);
        const tombstones =
          policy.retainTombstonesSec === 0
            ? 0
            : store.purgeTombstones(now - policy.retainTombstonesSec * 1000, ROWS_PER_BATCH);
        const { events: unsessioned, throughSeq } = store.purgeUnsessionedEvents(before, ROWS_PER_BATCH);
        const any = purged.sessions + tombstones + unsessioned > 0;
        if (any) {
          audit.record({
            event: "store.purged",
            detail: {
              sessions: purged.sessions,
              steps: purged.steps,
              events: purged.events + unsessioned,
              tombstones,
              from: purged.from,
              to: purged.to,
              before,
              retainReapedSec: policy.retainReapedSec,
              // The highest seq removed by this batch or any before it (the event stream answers
              // a `since` below it 410 SR_EVENTS_PURGED): carried from the newest store.purged,
              // which a batch may remove, so that the highest is never lost.
              throughSeq: Math.max(priorThrough, purged.throughSeq ?? 0, throughSeq ?? 0),
            },
          });
        }
        return {
          purged,
          tombstones,
          unsessioned,
          full:
            purged.sessions === SESSIONS_PER_BATCH || tombstones === ROWS_PER_BATCH || unsessioned === ROWS_PER_BATCH,
          any,
        };
      });
      if (batch.any) {
        total.batches++;
        total.sessions += batch.purged.sessions;
        total.steps += batch.purged.steps;
        total.events += batch.purged.events + batch.unsessioned;
        total.tombstones += batch.tombstones;
      }
      await loopTurn();
      if (!batch.full) break;
    }
    if (total.batches > 0) total.freePagesLeft = await this.vacuum();
    return total;
  }

  /** Free pages back to the file system, a few per turn; the pages left (0 without incremental vacuum). */
  private async vacuum(): Promise<number> {
    let left = Number.POSITIVE_INFINITY;
    while (!this.aborting && left > 0) {
      const next = this.deps.store.vacuumStep(VACUUM_PAGES_PER_TURN);
      if (next >= left) break; // nothing moved (another reader holds the pages)
      left = next;
      await loopTurn();
    }
    return Number.isFinite(left) ? left : 0;
  }
}
