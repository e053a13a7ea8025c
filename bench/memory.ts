/**
 * Figure 5, memory: reaperd's resident set (VmRSS) with 0, 10,000 and 100,000 live sessions,
 * each a fresh daemon that recovered that many sessions from its database, sampled after it
 * settled. Goal: under 150 MB at 100,000.
 */
import { startReaperd } from "./lib/daemon.js";
import { Population, SEED_ENGINES, sleepers } from "./lib/population.js";
import { MB, rssBytes } from "./lib/proc.js";
import { QUICK, fmt, judge, median, report, runFigure, say, sleep } from "./lib/report.js";
import { cleanupAll, tempDir } from "./lib/resources.js";

const COUNTS = QUICK ? [0, 10_000, 20_000] : [0, 10_000, 100_000];
const SETTLE_MS = QUICK ? 3_000 : 8_000;
const GOAL_MB = 150;
const NOISE_MB = 5;

async function rssWith(population: Population, count: number): Promise<number> {
  const dir = tempDir();
  const daemon = await startReaperd({ dir, db: population.database(count, dir) });
  await sleep(SETTLE_MS);
  const samples: number[] = [];
  for (let i = 0; i < 5; i++) {
    samples.push(rssBytes(daemon.pid) / MB);
    await sleep(200);
  }
  await daemon.stop();
  return median(samples);
}

async function main(): Promise<number> {
  const population = new Population(await sleepers(SEED_ENGINES));
  const rss = new Map<number, number>();
  for (const count of COUNTS) {
    rss.set(count, await rssWith(population, count));
    say(`${count} sessions: ${fmt(rss.get(count) as number)} MB`);
  }
  const base = rss.get(0) as number;
  return report(
    "Figure 5: memory",
    COUNTS.filter((c) => c > 0).map((count, i, all) => {
      const mb = rss.get(count) as number;
      const judged = i === all.length - 1;
      return {
        figure: `RSS, ${count} live sessions (MB)`,
        baseline: `${fmt(base)} (no session)`,
        result: `${fmt(mb)} (+${fmt(((mb - base) * 1000) / count, 2)} KB/session)`,
        ratio: fmt(mb / base),
        goal: judged ? `< ${GOAL_MB} MB` : "reported",
        pass: judged ? judge(mb, GOAL_MB, NOISE_MB, "below").pass : null,
        withinNoise: judged && judge(mb, GOAL_MB, NOISE_MB, "below").withinNoise,
        noise: judged ? `${NOISE_MB} MB` : "",
      };
    }),
    [`each count a fresh daemon that recovered its sessions, sampled after ${SETTLE_MS / 1000} s`],
  );
}

runFigure(main, cleanupAll);
