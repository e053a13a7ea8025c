import type { Clock } from "../clock.js";

/** How often the loop proves it runs. */
const TICK_MS = 250;

/**
 * Notices that the daemon did not run: SIGSTOP, a VM freeze, a debugger, a swap storm, a
 * synchronous call that blocked the loop. A tick every TICK_MS on the monotonic clock (which
 * keeps counting while the process is stopped); a gap between two looks longer than the
 * threshold is a stall. The detector looks too (`check`) before it judges any deadline, so
 * a stall is noticed before the first expiry after it, whichever timer fires first.
 *
 * A stall is downtime: the daemon did not hear the heartbeats sent meanwhile (they are
 * still in the socket's queue), so the restart rule applies from the moment it runs again.
 */
export class StallWatch {
  private last: number;
  private cancel: (() => void) | null = null;

  constructor(
    private readonly clock: Clock,
    private readonly thresholdMs: number,
    private readonly onStall: (stalledMs: number) => void,
  ) {
    this.last = clock.mono();
  }

  start(): void {
    this.last = this.clock.mono();
    this.arm();
  }

  stop(): void {
    this.cancel?.();
    this.cancel = null;
  }

  /** True if the loop was found stalled (and `onStall` was told) by this look. */
  check(): boolean {
    const now = this.clock.mono();
    const gap = now - this.last;
    this.last = now;
    if (gap <= this.thresholdMs) return false;
    this.onStall(gap);
    return true;
  }

  private arm(): void {
    this.cancel = this.clock.at(this.clock.mono() + TICK_MS, () => {
      this.check();
      this.arm();
    });
  }
}
