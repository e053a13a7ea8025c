import { performance } from "node:perf_hooks";
import { BUDGETS } from "./budgets.js";

/*
 * Paces the synchronous work of many reaps: a turn of the event loop gives it BUDGET_MS at
 * most, so that when a shared reading (a /proc walk, the network tables) resolves a thousand
 * reaps at once, their next synchronous stretches (a socket snapshot, a journal write, an rm
 * spawn) do not run back to back while heartbeats wait in the socket. Between two turns the
 * loop polls I/O: a heartbeat waits for a few milliseconds of reap work, never for a storm's.
 * Reaps that only wait cost nothing here; what is paced is what takes the loop.
 */

/**
 * The loop time the paced work may take per turn (src/pace/budgets.ts): after that, the rest
 * waits for the next turn, and the I/O that arrived meanwhile (heartbeats) is read first.
 */
const BUDGET_MS = BUDGETS.turnMs;

class Pacer {
  private readonly waiting: (() => void)[] = [];
  private scheduled = false;

  /** `perTurn`: at most this many per turn, even within the time budget. */
  constructor(private readonly perTurn: number) {}

  /** Resolves at a later turn of the event loop, within the turn's budget. */
  turn(): Promise<void> {
    return new Promise((resolve) => {
      this.waiting.push(resolve);
      if (this.scheduled) return;
      this.scheduled = true;
      setImmediate(this.release);
    });
  }

  get backlog(): number {
    return this.waiting.length;
  }

  /**
   * Lets one waiter go, then (as a microtask queued behind its continuation's synchronous
   * part) the next, while the turn's budget lasts.
   */
  private readonly release = (): void => {
    const start = performance.now();
    let released = 0;
    const next = (): void => {
      const go = this.waiting.shift();
      if (go === undefined) {
        this.scheduled = false;
        return;
      }
      go();
      released++;
      queueMicrotask(() => {
        if (released < this.perTurn && performance.now() - start < BUDGET_MS) next();
        else if (this.waiting.length > 0) setImmediate(this.release);
        else this.scheduled = false;
      });
    };
    next();
  };
}

/**
 * One pacer for everything a storm does on the loop (a step's start, a poll's wake-up, a
 * shared reading's answer, a /proc walk's next chunk, an rm spawn): together they take at
 * most BUDGET_MS per turn.
 */
const paced = new Pacer(BUDGETS.turnWaiters);

export const loopTurn = (): Promise<void> => paced.turn();

/** How many reaps wait for a turn (a gauge of a storm's backlog). */
export function turnsWaiting(): number {
  return paced.backlog;
}
