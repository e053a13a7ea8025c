import { performance } from "node:perf_hooks";

/**
 * The daemon's notion of time, injected everywhere a timestamp or a deadline is computed
 * (pino's lib/time.js, graphile-worker's useNodeTime): domain code never calls Date.now(),
 * so expiry can be tested on a fake clock instead of on sleeps.
 *
 * Two clocks, as etcd's lessor and logind's idle timers keep them: `now()` is the wall
 * clock, for display and the record only; `mono()` is monotonic, and every deadline runs on
 * it. A wall-clock step (NTP, `date -s`) then moves what the record says, never when a
 * session expires. Timers (`at`) are armed on the monotonic clock, as Node's setTimeout is.
 *
 * Only detection timers go through the clock. Operational waits (a step's timeout, the
 * SIGTERM grace period) are real time by nature: they wait for real processes.
 */
export interface Clock {
  /** Wall clock: milliseconds since the epoch. For display and the record. */
  now(): number;
  /** Monotonic milliseconds from an arbitrary origin: deadlines and stall detection. */
  mono(): number;
  /** Calls `fn` once the monotonic clock reaches `at`; returns a cancel function. */
  at(at: number, fn: () => void): () => void;
}

/** setTimeout's delay is a signed 32-bit int; longer waits are re-armed in steps. */
const MAX_TIMER_MS = 2 ** 31 - 1;

export const systemClock: Clock = {
  now: () => Date.now(),
  // performance.now() is CLOCK_MONOTONIC (libuv's hrtime): it does not move with the wall
  // clock, and it keeps counting while the process is stopped (SIGSTOP, a VM freeze).
  mono: () => performance.now(),
  at(at, fn) {
    let timer: NodeJS.Timeout | undefined;
    const arm = (): void => {
      const delay = at - performance.now();
      if (delay > MAX_TIMER_MS) {
        timer = setTimeout(arm, MAX_TIMER_MS);
      } else {
        timer = setTimeout(fn, Math.max(0, Math.ceil(delay)));
      }
      timer.unref();
    };
    arm();
    return () => clearTimeout(timer);
  },
};

/**
 * A clock that moves only when told to; timers fire synchronously inside `advance`. The
 * monotonic clock starts far from the wall clock, so that a value of one used as the other
 * shows in a test.
 */
export class FakeClock implements Clock {
  private current: number;
  private monotonic = 1_000_000;
  private timers: { at: number; fn: () => void; id: number }[] = [];
  private nextId = 0;

  constructor(start = Date.UTC(2026, 0, 1)) {
    this.current = start;
  }

  now(): number {
    return this.current;
  }

  mono(): number {
    return this.monotonic;
  }

  at(at: number, fn: () => void): () => void {
    const id = this.nextId++;
    this.timers.push({ at, fn, id });
    return () => {
      this.timers = this.timers.filter((t) => t.id !== id);
    };
  }

  /** Time passes normally: both clocks move, and each timer fires at its moment. */
  advance(ms: number): void {
    const target = this.monotonic + ms;
    for (;;) {
      const due = this.nextDue(target);
      if (!due) break;
      const step = Math.max(0, due.at - this.monotonic);
      this.monotonic += step;
      this.current += step;
      due.fn();
    }
    this.current += target - this.monotonic;
    this.monotonic = target;
  }

  /**
   * The process did not run for `ms` (SIGSTOP, a VM freeze, a blocked loop): both clocks
   * move at once, then the timers that came due fire, all late, in their order.
   */
  stall(ms: number): void {
    this.monotonic += ms;
    this.current += ms;
    this.advance(0);
  }

  /** The wall clock is stepped (NTP, `date -s`); monotonic time does not move. */
  stepWall(ms: number): void {
    this.current += ms;
  }

  private nextDue(target: number): { at: number; fn: () => void; id: number } | undefined {
    let due: { at: number; fn: () => void; id: number } | undefined;
    for (const t of this.timers) if (t.at <= target && (due === undefined || t.at < due.at)) due = t;
    if (due !== undefined) this.timers = this.timers.filter((t) => t !== due);
    return due;
  }
}

/** Year 10000: from here on Date#toISOString writes an expanded year (+010000-…). */
const ISO_FAST_LIMIT = 253402300800000;
let isoMinute = Number.NaN;
let isoPrefix = "";

/**
 * `new Date(ms).toISOString()`, the same string, for the hot paths (every heartbeat answers
 * its deadline): the "YYYY-MM-DDTHH:MM:" of the last minute asked is kept, so most calls
 * only append seconds and milliseconds (Date#toISOString costs about 1 µs here; this, a
 * tenth of that). Anything but a whole number of ms from 1970 to 9999 goes to Date.
 */
export function isoTime(ms: number): string {
  if (!Number.isInteger(ms) || ms < 0 || ms >= ISO_FAST_LIMIT) return new Date(ms).toISOString();
  const minute = Math.floor(ms / 60_000);
  if (minute !== isoMinute) {
    isoPrefix = new Date(minute * 60_000).toISOString().slice(0, 17);
    isoMinute = minute;
  }
  const inMinute = ms - minute * 60_000;
  const sec = Math.floor(inMinute / 1000);
  const milli = inMinute - sec * 1000;
  return `${isoPrefix}${sec < 10 ? "0" : ""}${sec}.${milli < 10 ? "00" : milli < 100 ? "0" : ""}${milli}Z`;
}
