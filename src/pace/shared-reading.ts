import { performance } from "node:perf_hooks";
import { loopTurn } from "./turns.js";

/**
 * One reading of the host (a walk of /proc, the kernel's network tables) shared by everyone
 * who asks at about the same time. An ask made while no reading is due starts one at the next
 * turn of the event loop (so the asks of that turn share it), or once `everyMs` have passed
 * since the previous reading began; an ask made during a reading waits for the next one,
 * because it must see the host as it is after it asked (a verification after a kill, a
 * delete after the last holder went). A storm of a thousand reaps costs a reading per
 * `everyMs`, not one per reap.
 *
 * The reading gets the whole batch of asks and answers each (an ask carries its own
 * resolve); if it throws, `fail` answers every ask of the batch it had not answered.
 */
export class SharedReading<A> {
  private pending: A[] = [];
  private scheduled = false;
  private reading = false;
  private lastAt = Number.NEGATIVE_INFINITY;
  /** Readings done and asks served, for tests and the benchmarks' reports. */
  readonly stats = { reads: 0, asks: 0 };

  constructor(
    private readonly everyMs: number,
    private readonly read: (batch: A[], begunAt: number) => Promise<void> | void,
    private readonly fail: (ask: A, err: unknown) => void,
  ) {}

  ask(a: A): void {
    this.stats.asks++;
    this.pending.push(a);
    if (this.scheduled || this.reading) return;
    this.scheduled = true;
    const wait = this.lastAt + this.everyMs - performance.now();
    if (wait > 0) setTimeout(() => void this.drain(), wait);
    else setImmediate(() => void this.drain());
  }

  private async drain(): Promise<void> {
    this.scheduled = false;
    this.reading = true;
    try {
      while (this.pending.length > 0) {
        const wait = this.lastAt + this.everyMs - performance.now();
        if (wait > 0) await new Promise((r) => setTimeout(r, wait));
        this.lastAt = performance.now();
        this.stats.reads++;
        const batch = this.pending.splice(0);
        try {
          await this.read(batch, this.lastAt);
        } catch (err) {
          for (const a of batch) this.fail(a, err);
        }
      }
    } finally {
      this.reading = false;
    }
  }
}

/**
 * Asks a shared reading and waits for the answer, handed back at a paced turn (loopTurn): one
 * reading answers many reaps at once, and they go on a few per turn, not all in the turn the
 * reading ended.
 */
export async function askShared<A, T>(
  reading: SharedReading<A>,
  make: (resolve: (value: T) => void, reject: (err: unknown) => void) => A,
): Promise<T> {
  const answer = await new Promise<T>((resolve, reject) => reading.ask(make(resolve, reject)));
  await loopTurn();
  return answer;
}
