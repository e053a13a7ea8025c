import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";

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
