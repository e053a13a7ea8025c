import { readFileSync } from "node:fs";
import { join } from "node:path";
import { CLOCK_TICKS } from "./stat.js";

/** What a session's processes use now (or used, for a cgroup's peak). */
export interface UsageSample {
  /** CPU seconds, user + system, the processes' waited-for children included. */
  readonly cpuSec: number;
  /** Resident bytes now (the sum over the processes), or the cgroup's memory.peak. */
  readonly memoryBytes: number;
  readonly memorySource: "memory.peak" | "rss";
  readonly processes: number;
}

/** Resident bytes of one process (VmRSS), 0 if gone. */
function rssOf(pid: number): number {
  try {
    const m = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, "latin1"));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

/** utime + stime + cutime + cstime of one process, in seconds; 0 if gone. */
function cpuOf(pid: number): number {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, "latin1");
    // Fields after the command (which may hold spaces and parentheses): state is field 3.
    const f = text.slice(text.lastIndexOf(")") + 2).split(" ");
    const ticks = Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14]);
    return Number.isFinite(ticks) ? ticks / CLOCK_TICKS : 0;
  } catch {
    return 0;
  }
}

/** The sum of resident memory over these processes (a liveness pass's peak sample). */
export function rssSum(pids: readonly number[]): number {
  let sum = 0;
  for (const pid of pids) sum += rssOf(pid);
  return sum;
}

/** What these processes use now. */
export function processUsage(pids: readonly number[]): UsageSample {
  let cpuSec = 0;
  for (const pid of pids) cpuSec += cpuOf(pid);
  return { cpuSec, memoryBytes: rssSum(pids), memorySource: "rss", processes: pids.length };
}

/**
 * What a cgroup's processes used over its life: cpu.stat's usage_usec (every process that
 * ever ran in it, exited ones included) and memory.peak where the memory controller is on;
 * null if the cgroup cannot be read. `processes`: its members now.
 */
export function cgroupUsage(dir: string, members: readonly number[]): UsageSample | null {
  let cpuSec: number;
  try {
    const m = /^usage_usec (\d+)$/m.exec(readFileSync(join(dir, "cpu.stat"), "latin1"));
    if (!m) return null;
    cpuSec = Number(m[1]) / 1e6;
  } catch {
    return null;
  }
  try {
    const peak = Number(readFileSync(join(dir, "memory.peak"), "latin1").trim());
    if (Number.isFinite(peak))
      return { cpuSec, memoryBytes: peak, memorySource: "memory.peak", processes: members.length };
  } catch {
    // no memory controller here: the resident sum of the members now
  }
  return { cpuSec, memoryBytes: rssSum(members), memorySource: "rss", processes: members.length };
}
