import { readFileSync, readdirSync } from "node:fs";

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
}

/** PF_KTHREAD in include/linux/sched.h. */
const PF_KTHREAD = 0x00200000;

/** Parses /proc/<pid>/stat; null when the process does not exist (or vanished mid-read). */
export function readStat(pid: number): ProcStat | null {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, "latin1");
  } catch {
    return null;
  }
  return parseStat(text);
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
  };
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

/** Every process visible in /proc (threads are not listed there, only thread-group leaders). */
export function listStats(): ProcStat[] {
  const out: ProcStat[] = [];
  for (const name of readdirSync("/proc")) {
    const c = name.charCodeAt(0);
    if (c < 48 || c > 57) continue;
    const st = readStat(Number(name));
    if (st) out.push(st);
  }
  return out;
}
