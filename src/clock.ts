/**
 * The daemon's notion of time, injected everywhere a timestamp or a deadline is computed
 * (pino's lib/time.js, graphile-worker's useNodeTime): domain code never calls Date.now(),
 * so expiry can be tested on a fake clock instead of on sleeps.
 *
 * Only detection timers go through the clock. Operational waits (a step's timeout, the
 * SIGTERM grace period) are real time by nature: they wait for real processes.
 */
export interface Clock {
  /** Milliseconds since the epoch. */
  now(): number;
  /** Calls `fn` once the clock reaches `at` (ms since the epoch); returns a cancel function. */
  at(at: number, fn: () => void): () => void;
}

/** setTimeout's delay is a signed 32-bit int; longer waits are re-armed in steps. */
const MAX_TIMER_MS = 2 ** 31 - 1;

export const systemClock: Clock = {
  now: () => Date.now(),
  at(at, fn) {
    let timer: NodeJS.Timeout | undefined;
    const arm = (): void => {
      const delay = at - Date.now();
      if (delay > MAX_TIMER_MS) {
        timer = setTimeout(arm, MAX_TIMER_MS);
      } else {
        timer = setTimeout(fn, Math.max(0, delay));
      }
      timer.unref();
    };
    arm();
    return () => clearTimeout(timer);
  },
};

/** A clock that moves only when told to; timers fire synchronously inside `advance`. */
export class FakeClock implements Clock {
  private current: number;
  private timers: { at: number; fn: () => void; id: number }[] = [];
  private nextId = 0;

  constructor(start = Date.UTC(2026, 0, 1)) {
    this.current = start;
  }

  now(): number {
    return this.current;
  }

  at(at: number, fn: () => void): () => void {
    const id = this.nextId++;
    this.timers.push({ at, fn, id });
    return () => {
      this.timers = this.timers.filter((t) => t.id !== id);
    };
  }

  advance(ms: number): void {
    const target = this.current + ms;
    for (;;) {
      const due = this.timers.filter((t) => t.at <= target).sort((a, b) => a.at - b.at)[0];
      if (!due) break;
      this.timers = this.timers.filter((t) => t.id !== due.id);
      this.current = Math.max(this.current, due.at);
      due.fn();
    }
    this.current = target;
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
