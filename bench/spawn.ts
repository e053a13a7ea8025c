/**
 * Figure 9, what a program costs the event loop: the daemon runs rm for every path it deletes,
 * by the hundred in a storm. Node's child_process.spawn forks, and a fork copies the page
 * tables of the whole process on the calling thread; the daemon's spawn (src/native/spawn.ts,
 * the addon's spawnAt: clone with CLONE_VM | CLONE_VFORK on a libuv pool thread) copies none
 * and leaves the loop before the child's execve. Both start `rm -rf -- ./absent` in a
 * directory, interleaved, in this process with a heap of 0 and then of 300 MB (a daemon
 * holding many sessions, or a storm's garbage): the loop time each call takes (from the call
 * until it returns), and the time to the program's end.
 */
import { spawn } from "node:child_process";
import { closeSync, openSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { runProgram, systemProgram } from "../src/native/spawn.js";
import { QUICK, fmt, median, report, runFigure, say } from "./lib/report.js";
import { cleanupAll, tempDir } from "./lib/resources.js";

const CALLS = QUICK ? 40 : 200;
const HEAPS_MB = [0, 300];
/** Our goal: the loop pays for a program at most a tenth of what a fork costs it. */
const GOAL_RATIO = 0.1;

interface Costs {
  loopMs: number[];
  totalMs: number[];
}

async function nodeSpawn(rm: string, dir: string): Promise<{ loop: number; total: number }> {
  const t0 = performance.now();
  const child = spawn(rm, ["-rf", "--", "./absent"], { cwd: dir, stdio: "ignore" });
  const loop = performance.now() - t0;
  await new Promise((r) => child.once("close", r));
  return { loop, total: performance.now() - t0 };
}

async function ourSpawn(rm: string, dirFd: number): Promise<{ loop: number; total: number }> {
  const t0 = performance.now();
  const running = runProgram(rm, ["-rf", "--", "./absent"], { cwdFd: dirFd });
  const loop = performance.now() - t0;
  const ran = await running;
  if (ran.code !== 0) throw new Error(`rm failed: ${ran.stderr}`);
  return { loop, total: performance.now() - t0 };
}

async function main(): Promise<number> {
  const rm = systemProgram("rm");
  const dir = tempDir();
  const dirFd = openSync(dir, "r");
  const rows = [];
  const held: Buffer[] = [];
  try {
    for (const heapMb of HEAPS_MB) {
      while (held.length < heapMb) held.push(Buffer.alloc(1 << 20, 1)); // touched: resident
      const node: Costs = { loopMs: [], totalMs: [] };
      const ours: Costs = { loopMs: [], totalMs: [] };
      for (let i = 0; i < CALLS; i++) {
        const a = await nodeSpawn(rm, dir);
        node.loopMs.push(a.loop);
        node.totalMs.push(a.total);
        const b = await ourSpawn(rm, dirFd);
        ours.loopMs.push(b.loop);
        ours.totalMs.push(b.total);
      }
      const n = median(node.loopMs);
      const o = median(ours.loopMs);
      say(
        `heap +${heapMb} MB: loop time per program, node spawn ${fmt(n, 3)} ms, ours ${fmt(o, 3)} ms; ` +
          `to the program's end ${fmt(median(node.totalMs))} ms and ${fmt(median(ours.totalMs))} ms`,
      );
      rows.push({
        figure: `event-loop time per program started (ms, median of ${CALLS}), heap +${heapMb} MB`,
        baseline: `${fmt(n, 3)} (child_process.spawn; to its end ${fmt(median(node.totalMs))} ms)`,
        result: `${fmt(o, 3)} (runProgram; to its end ${fmt(median(ours.totalMs))} ms)`,
        ratio: fmt(o / n, 3),
        goal: `≤ ${GOAL_RATIO} × (ours)`,
        pass: o / n <= GOAL_RATIO,
        noise: "none (medians)",
      });
    }
  } finally {
    closeSync(dirFd);
  }
  return report("Figure 9: what starting a program costs the event loop", rows, [
    `each row: ${CALLS} calls of each, interleaved, in this process (rss ${fmt(process.memoryUsage().rss / 2 ** 20, 0)} MB at the end)`,
  ]);
}

runFigure(main, cleanupAll);
