import type { Logger } from "pino";
import { ReaperError } from "../errors.js";
import type { Store } from "../store/store.js";
import type { HeartbeatWrite } from "../model/live-session.js";
import type { LiveSessions } from "./live.js";
import { BUDGETS } from "../pace/budgets.js";

/** Rows per flush transaction: keeps each event-loop block to a few ms. */
const FLUSH_CHUNK = BUDGETS.flushRecords;

/**
 * Writes the live sessions' records (last heartbeat, last activity, the indexed deadline) to
 * SQLite, coalesced: once per changed session per interval, in chunks that yield to the
 * event loop. Heartbeats need no durability (the restart rule), so nothing waits on this;
 * what it buys is a true record: `reaperctl show`, the database and a reaped session's row
 * say when the session was last heard from.
 *
 * While the store cannot commit, nothing is lost: the writes stay taken in the registry and
 * go out with the first flush that commits.
 */
export class WriteBehind {
  private timer: NodeJS.Timeout | null = null;
  private flushing: Promise<void> | null = null;

  constructor(
    private readonly registry: LiveSessions,
    private readonly store: Store,
    private readonly log: Logger,
    private readonly intervalMs: number,
  ) {}

  start(): void {
    this.timer = setInterval(() => void this.flush(), this.intervalMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
  }

  /** One flush at a time; a call during one returns it. */
  flush(): Promise<void> {
    if (this.flushing !== null) return this.flushing;
    const run = this.run().finally(() => {
      if (this.flushing === run) this.flushing = null;
    });
    this.flushing = run;
    return run;
  }

  /** Waits for a running flush, then writes everything left in one go (daemon stop). */
  async flushAll(): Promise<void> {
    await this.flushing;
    this.write(this.registry.takeDirty());
  }

  private async run(): Promise<void> {
    if (!this.store.available || this.registry.dirtyCount === 0) return;
    const dirty = this.registry.takeDirty();
    for (let i = 0; i < dirty.length; i += FLUSH_CHUNK) {
      if (!this.write(dirty.slice(i, i + FLUSH_CHUNK))) {
        this.registry.untake(dirty.slice(i + FLUSH_CHUNK));
        return;
      }
      await new Promise((r) => setImmediate(r));
    }
  }

  /** One transaction; on failure the writes go back to the registry. True if committed. */
  private write(batch: readonly HeartbeatWrite[]): boolean {
    if (batch.length === 0) return true;
    try {
      if (!this.store.db.open) return false;
      this.store.writeHeartbeats(batch);
      return true;
    } catch (err) {
      this.registry.untake(batch);
      if (!(err instanceof ReaperError && err.code === "SR_STORE_UNAVAILABLE")) {
        this.log.error({ err }, "heartbeat flush failed");
      }
      return false;
    }
  }
}
