import { closeSync, openSync, readFileSync, readSync, readdirSync, readlinkSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { BUDGETS } from "../pace/budgets.js";

/** The fields of /proc/<pid>/stat the daemon relies on. */
export interface ProcStat {
  readonly pid: number;
  readonly comm: string;
  /** R, S, D, Z (zombie), T, t, X (dead), I, … */
  readonly state: string;
  readonly ppid: number;
  readonly pgrp: number;
  readonly sid: number;
  readonly flags: number;
  /** Field 22: clock ticks after boot. With the boot id, it names a process for good. */
  readonly startTime: number;
  /**
   * Field 24: resident pages. VmRSS in pages, but read from the kernel's per-CPU counters
   * without summing them: it may lag VmRSS by up to max(32, 2 x CPUs) pages per CPU for each
   * of file, anon and shmem pages (a few hundred KB on a small host), nothing for a peak.
   */
  readonly rssPages: number;
}

/**
 * USER_HZ, the unit of /proc/<pid>/stat's times (start time, CPU time): fixed at 100 by the
 * kernel's ABI on every architecture Node runs on (x86, arm, arm64, ppc64, s390x, riscv64,
 * loongarch).
 */
export const CLOCK_TICKS = 100;

/**
 * Clock ticks after boot, now, as /proc's start times count them (/proc/uptime is boot time
 * too, in 10 ms steps, truncated: a process started after this call has a start time of at
 * least this); null when /proc/uptime cannot be read.
 */
export function ticksSinceBoot(): number | null {
  let text: string;
  try {
    text = readFileSync("/proc/uptime", "latin1");
  } catch {
    return null;
  }
  // "12345.67 …": read as whole hundredths, never through a float (0.29 * 100 is 28.999…).
  const m = /^(\d+)\.(\d\d)\s/.exec(text);
  return m === null ? null : Number(m[1]) * CLOCK_TICKS + Number(m[2]);
}

let cachedBootMs: number | undefined;

/** When the host booted (/proc/stat `btime`, whole seconds), ms since the epoch. */
export function bootTimeMs(): number {
  if (cachedBootMs === undefined) {
    const m = /^btime (\d+)$/m.exec(readFileSync("/proc/stat", "latin1"));
    cachedBootMs = m ? Number(m[1]) * 1000 : 0;
  }
  return cachedBootMs;
}

/** When a process started, ms since the epoch, from its /proc/<pid>/stat start time. */
export function startedAtMs(startTime: number): number {
  return bootTimeMs() + (startTime * 1000) / CLOCK_TICKS;
}

/** The command line, arguments joined by single spaces; null when the process vanished. */
export function readCmdline(pid: number): string | null {
  try {
    const raw = readFileSync(`/proc/${pid}/cmdline`, "utf8");
    return raw.replace(/\0+$/, "").split("\0").join(" ");
  } catch {
    return null;
  }
}

/** The executable (/proc/<pid>/exe); null when unreadable (another user's, without CAP_SYS_PTRACE) or gone. */
export function readExe(pid: number): string | null {
  try {
    return readlinkSync(`/proc/${pid}/exe`).replace(/ \(deleted\)$/, "");
  } catch {
    return null;
  }
}

/** Whether an entry of /proc names a process (its name is a pid, so it starts with a digit). */
export function isPidEntry(name: string): boolean {
  const c = name.charCodeAt(0);
  return c >= 48 && c <= 57;
}

/** PF_KTHREAD in include/linux/sched.h. */
const PF_KTHREAD = 0x00200000;

/**
 * One buffer for every /proc/<pid>/stat read: a stat line is a few hundred bytes (comm is at
 * most 64), far below its size. The liveness pass reads one per process on the host every
 * 2 s, so this read is three syscalls (open, read, close; readFileSync makes five on /proc,
 * whose files report size 0) and allocates only the result.
 */
const statBuffer = Buffer.allocUnsafe(4096);

/** Parses /proc/<pid>/stat; null when the process does not exist (or vanished mid-read). */
export function readStat(pid: number): ProcStat | null {
  let fd: number;
  try {
    fd = openSync(`/proc/${pid}/stat`, "r");
  } catch {
    return null;
  }
  let n: number;
  try {
    n = readSync(fd, statBuffer, 0, statBuffer.length, null);
  } catch {
    return null;
  } finally {
    closeSync(fd);
  }
  if (n >= statBuffer.length) {
    // Cannot happen with today's kernels; read it whole rather than guess.
    try {
      return parseStat(readFileSync(`/proc/${pid}/stat`, "latin1"));
    } catch {
      return null;
    }
  }
  return parseStatBytes(statBuffer, n) ?? parseStat(statBuffer.toString("latin1", 0, n));
}

/** The fields parseStat reads, by field number (1-based, as in proc(5)). */
const PPID = 4;
const PGRP = 5;
const SID = 6;
const FLAGS = 9;
const START_TIME = 22;
const RSS = 24;

/**
 * parseStat on the bytes, without making the line a string and splitting it: the same result
 * for a well-formed line; null for anything else (the caller then parses the text).
 */
function parseStatBytes(b: Buffer, n: number): ProcStat | null {
  let open = -1;
  for (let i = 0; i < n; i++) {
    if (b[i] === 0x28) {
      open = i;
      break;
    }
  }
  let close = n - 1;
  while (close > open && b[close] !== 0x29) close--;
  // "pid (comm) S …": digits, a space, then comm up to the last ')', a space, the state.
  if (open < 2 || close <= open || close + 3 >= n || b[close + 1] !== 0x20 || b[close + 3] !== 0x20) return null;
  let pid = 0;
  for (let i = 0; i < open - 1; i++) {
    const c = b[i] as number;
    if (c < 0x30 || c > 0x39) return null;
    pid = pid * 10 + (c - 0x30);
  }
  const fields = [0, 0, 0, 0, 0, 0];
  let field = 4;
  let i = close + 4;
  while (field <= RSS) {
    let value = 0;
    let negative = false;
    const from = i;
    if (b[i] === 0x2d) {
      negative = true;
      i++;
    }
    for (; i < n; i++) {
      const c = b[i] as number;
      if (c === 0x20 || c === 0x0a) break;
      if (c < 0x30 || c > 0x39) return null;
      value = value * 10 + (c - 0x30);
    }
    if (i === from || i >= n) return null;
    if (negative) value = -value;
    if (field === PPID) fields[0] = value;
    else if (field === PGRP) fields[1] = value;
    else if (field === SID) fields[2] = value;
    else if (field === FLAGS) fields[3] = value;
    else if (field === START_TIME) fields[4] = value;
    else if (field === RSS) fields[5] = value;
    field++;
    i++; // the space
  }
  return {
    pid,
    comm: b.toString("latin1", open + 1, close),
    state: String.fromCharCode(b[close + 2] as number),
    ppid: fields[0] as number,
    pgrp: fields[1] as number,
    sid: fields[2] as number,
    flags: fields[3] as number,
    startTime: fields[4] as number,
    rssPages: fields[5] as number,
  };
}

export function parseStat(text: string): ProcStat | null {
  // comm may hold spaces and parentheses: it ends at the *last* ')'.
  const open = text.indexOf("(");
  const close = text.lastIndexOf(")");
  if (open < 0 || close < open) return null;
  const rest = text.slice(close + 2).split(" ");
  // rest[0] is field 3 (state); field N is rest[N - 3].
  const field = (n: number): number => Number(rest[n - 3]);
  return {
    pid: Number(text.slice(0, open - 1)),
    comm: text.slice(open + 1, close),
    state: rest[0] ?? "?",
    ppid: field(4),
    pgrp: field(5),
    sid: field(6),
    flags: field(9),
    startTime: field(22),
    rssPages: field(24),
  };
}

let pageBytes: number | undefined;

/**
 * The kernel's page size (stat's rss counts pages): the KernelPageSize of this process's first
 * mapping in /proc/self/smaps, read once; 4096 if it cannot be read.
 */
export function pageSize(): number {
  if (pageBytes === undefined) {
    pageBytes = 4096;
    try {
      const fd = openSync("/proc/self/smaps", "r");
      try {
        const n = readSync(fd, statBuffer, 0, statBuffer.length, null);
        const m = /^KernelPageSize:\s+(\d+) kB$/m.exec(statBuffer.toString("latin1", 0, n));
        if (m) pageBytes = Number(m[1]) * 1024;
      } finally {
        closeSync(fd);
      }
    } catch {
      // keep 4096
    }
  }
  return pageBytes;
}

export function isKernelThread(stat: ProcStat): boolean {
  return (stat.flags & PF_KTHREAD) !== 0 || stat.pid === 2 || stat.ppid === 2;
}

/** A zombie has exited and released its resources: for the reaper it is gone. */
export function isExited(stat: ProcStat): boolean {
  return stat.state === "Z" || stat.state === "X" || stat.state === "x";
}

/** Real uid (or gid) from /proc/<pid>/status; null when the process vanished. */
export function readUid(pid: number, which: "Uid" | "Gid" = "Uid"): number | null {
  try {
    const status = readFileSync(`/proc/${pid}/status`, "latin1");
    const m = new RegExp(`^${which}:\\s+(\\d+)`, "m").exec(status);
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

/**
 * listStats, read `chunk` processes at a time with `pause()` between chunks (the detector's
 * periodic pass yields to the event loop: a host's thousands of processes are not read in
 * one turn while heartbeats wait). `cost.busyMs` grows by the loop time the reads took.
 */
export async function listStatsPaced(
  pause: () => Promise<void>,
  chunk: number = BUDGETS.statLinesPerTurn,
  cost?: { busyMs: number },
): Promise<ProcStat[]> {
  const out: ProcStat[] = [];
  let n = 0;
  let from = performance.now();
  for (const name of readdirSync("/proc")) {
    if (!isPidEntry(name)) continue;
    if (++n % chunk === 0) {
      if (cost) cost.busyMs += performance.now() - from;
      await pause();
      from = performance.now();
    }
    const st = readStat(Number(name));
    if (st) out.push(st);
  }
  if (cost) cost.busyMs += performance.now() - from;
  return out;
}

/** Every process visible in /proc (threads are not listed there, only thread-group leaders). */
export function listStats(): ProcStat[] {
  const out: ProcStat[] = [];
  for (const name of readdirSync("/proc")) {
    if (!isPidEntry(name)) continue;
    const st = readStat(Number(name));
    if (st) out.push(st);
  }
  return out;
}
