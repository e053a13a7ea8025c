import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { fmt, say, sleep } from "./report.js";

let ticksPerSecond: number | undefined;

/** sysconf(_SC_CLK_TCK): the unit of utime and stime in /proc/<pid>/stat. */
export function clockTicks(): number {
  ticksPerSecond ??= Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim()) || 100;
  return ticksPerSecond;
}

/** CPU time (user + system) the process has used so far, in milliseconds. */
export function cpuMs(pid: number): number {
  const text = readFileSync(`/proc/${pid}/stat`, "latin1");
  const rest = text.slice(text.lastIndexOf(")") + 2).split(" ");
  // utime and stime are fields 14 and 15; rest[0] is field 3.
  const ticks = Number(rest[14 - 3]) + Number(rest[15 - 3]);
  return (ticks * 1000) / clockTicks();
}

/** Resident set size in bytes (VmRSS of /proc/<pid>/status). */
export function rssBytes(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, "latin1"));
  return m ? Number(m[1]) * 1024 : Number.NaN;
}

/** Megabytes (10^6 bytes), as the goals are stated. */
export const MB = 1_000_000;

/**
 * The CPU two processes use side by side, in percent of a core, over `windows` windows of
 * `windowMs` each (each window printed, `label` naming the second process).
 */
export async function cpuWindows(
  basePid: number,
  fullPid: number,
  windows: number,
  windowMs: number,
  label: string,
): Promise<{ base: number[]; full: number[] }> {
  const out = { base: [] as number[], full: [] as number[] };
  for (let w = 1; w <= windows; w++) {
    const b0 = cpuMs(basePid);
    const f0 = cpuMs(fullPid);
    const t0 = performance.now();
    await sleep(windowMs);
    const elapsed = performance.now() - t0;
    out.base.push(((cpuMs(basePid) - b0) / elapsed) * 100);
    out.full.push(((cpuMs(fullPid) - f0) / elapsed) * 100);
    say(
      `window ${w}: no session ${fmt(out.base.at(-1) as number, 3)} % of a core, ` +
        `${label} ${fmt(out.full.at(-1) as number, 3)} %`,
    );
  }
  return out;
}
