import { copyFileSync } from "node:fs";
import { join } from "node:path";
import { start, tempDir } from "./resources.js";
import { sleep } from "./report.js";
import { seedLiveSessions, type SeedEngine } from "./sessions.js";

/** Engine processes the seeded sessions name: real, long-lived (`sleep`), killed at cleanup. */
export const SEED_ENGINES = 10;

export async function sleepers(count: number): Promise<number[]> {
  const pids = Array.from({ length: count }, () => start("sleep", ["3600"]).pid as number);
  await sleep(50); // let them exec, so their identity is sleep's, not node's fork
  return pids;
}

/**
 * Databases holding `count` live sessions each (one per count), written once and copied per
 * daemon start, so every start recovers exactly the same population. The sessions name
 * `engines` round-robin (see seedLiveSessions; `seed` is passed on to it).
 */
export class Population {
  private readonly masters = new Map<number, string>();
  private readonly dir = tempDir("sr-bench-db-");

  constructor(
    private readonly engines: readonly (number | SeedEngine)[],
    private readonly seed: Parameters<typeof seedLiveSessions>[3] = {},
  ) {}

  /** A fresh copy of a database with `count` live sessions, in `into`. */
  database(count: number, into: string): string {
    let master = this.masters.get(count);
    if (master === undefined) {
      master = join(this.dir, `live-${count}.db`);
      seedLiveSessions(master, count, this.engines, this.seed);
      this.masters.set(count, master);
    }
    const db = join(into, "reaper.db");
    copyFileSync(master, db);
    return db;
  }
}
