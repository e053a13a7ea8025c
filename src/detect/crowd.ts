import type { Logger } from "pino";
import type { Clock } from "../clock.js";

/** An episode ends once no connection has been turned away for this long. */
export const CROWD_QUIET_MS = 1000;
/** The most heartbeat time crowding is forgiven: a bucket of 5 minutes … */
export const CROWD_BUDGET_MS = 5 * 60_000;
/** … refilled over an hour. */
export const CROWD_REFILL_MS = 60 * 60_000;

/** A stretch of time during which connections were turned away. */
export interface CrowdEpisode {
  /** Monotonic ms of the first and the last refusal. */
  readonly since: number;
  readonly last: number;
  /** Connections turned away (or that could not be accepted). */
  readonly refused: number;
  /** Heartbeat time forgiven: how far heartbeat deadlines were moved, in ms. */
  readonly forgivenMs: number;
  /** True if the budget ran out during the episode: later refusals moved no deadline. */
  readonly exhausted: boolean;
}

export interface CrowdWatchOptions {
  clock: Clock;
  log: Pick<Logger, "error">;
  /** The longest heartbeat timeout any profile allows (ms): the most one refusal can defer. */
  maxHeartbeatTimeoutMs: number;
  /** Heartbeat timeouts restart from now (LiveSessions.resumeHeartbeats). */
  resume: () => void;
  /** An episode ended (CROWD_QUIET_MS without a refusal). */
  ended: (episode: CrowdEpisode) => void;
}

/**
 * Time during which the daemon turned connections away, or could not accept them, does not
 * count against any session's heartbeat timeout: a heartbeat sent then may never have reached
 * the daemon, as during a stall. Only refusals that may have kept someone else out are told
 * here: the listener was full of busy connections of peers each within its limit
 * (src/http/connection-limits.ts), or accept(2) failed (file descriptors ran out). A peer over
 * its own uid's limit is turned away without moving anyone's deadline.
 *
 * Each such refusal moves the heartbeat floor to now (the restart rule, for heartbeat
 * timeouts only). What that forgives is charged to a budget: the time since the previous
 * move, at most the longest heartbeat timeout (the most a move can defer any session). The
 * budget holds CROWD_BUDGET_MS and refills over CROWD_REFILL_MS, so whoever can crowd the
 * daemon (many uids at their limits, each holding busy connections) defers heartbeat
 * expiry by at most that much an hour; evidence (an engine or owner gone) reaps meanwhile.
 */
export class CrowdWatch {
  private tokens = CROWD_BUDGET_MS;
  private refilledAt: number;
  /** Monotonic ms of the last move of the heartbeat floor. */
  private floor = Number.NEGATIVE_INFINITY;
  private episode: {
    since: number;
    last: number;
    refused: number;
    forgivenMs: number;
    exhausted: boolean;
  } | null = null;
  private cancel: (() => void) | null = null;

  constructor(private readonly opts: CrowdWatchOptions) {
    this.refilledAt = opts.clock.mono();
  }

  /** Whether connections are being turned away now (an episode is open). */
  get crowded(): boolean {
    return this.episode !== null;
  }

  /** A connection was turned away that its peer's own limit did not forbid. */
  refused(): void {
    const now = this.opts.clock.mono();
    this.refill(now);
    const e = (this.episode ??= { since: now, last: now, refused: 0, forgivenMs: 0, exhausted: false });
    e.last = now;
    e.refused++;
    const charge = Math.min(now - this.floor, this.opts.maxHeartbeatTimeoutMs);
    if (charge <= this.tokens) {
      this.tokens -= charge;
      e.forgivenMs += charge;
      this.floor = now;
      this.opts.resume();
    } else if (!e.exhausted) {
      e.exhausted = true;
      this.opts.log.error(
        { refused: e.refused, forgivenMs: Math.round(e.forgivenMs) },
        "connections are still turned away, past the crowding forgiven (5 minutes an hour): heartbeat deadlines run again",
      );
    }
    this.cancel ??= this.opts.clock.at(now + CROWD_QUIET_MS, () => this.quiet());
  }

  stop(): void {
    this.cancel?.();
    this.cancel = null;
  }

  private quiet(): void {
    this.cancel = null;
    const e = this.episode;
    if (e === null) return;
    const now = this.opts.clock.mono();
    if (now - e.last < CROWD_QUIET_MS) {
      this.cancel = this.opts.clock.at(e.last + CROWD_QUIET_MS, () => this.quiet());
      return;
    }
    this.episode = null;
    this.opts.ended({ ...e });
  }

  private refill(now: number): void {
    this.tokens = Math.min(
      CROWD_BUDGET_MS,
      this.tokens + ((now - this.refilledAt) * CROWD_BUDGET_MS) / CROWD_REFILL_MS,
    );
    this.refilledAt = now;
  }
}
