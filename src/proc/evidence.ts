import { readFile } from "node:fs/promises";
import type { ProcessReading } from "../model/evidence.js";
import { readStat } from "./stat.js";

export type { ProcessReading, UnkillableEvidence } from "../model/evidence.js";

/** The innermost frames of a kernel stack kept: where it sleeps, and what called that. */
const STACK_LINES = 16;
/** Any one line kept (a frame, wchan, a cgroup), and /proc/<pid>/syscall's line. */
const LINE_CHARS = 256;
/** Cgroup lines kept: one per hierarchy (a hybrid host has a dozen). */
const CGROUP_LINES = 32;
/**
 * A file not read within this is given up as unreadable. /proc/<pid>/stack and /syscall take
 * the task's exec lock: a process stuck in D inside execve holds it, and a read would wait as
 * long. The reads are asynchronous (libuv's pool), so such a wait holds a pool thread, never
 * the event loop, and the reap goes on without that field.
 */
const READ_TIMEOUT_MS = 500;

/**
 * What the kernel says of a process that may not die (docs/how-a-session-ends.md): its state,
 * the function it sleeps in, its system call, its kernel stack and its cgroups, each read on
 * its own and null (or empty) when unreadable. Null as a whole when the pid no longer names
 * the process `p` (gone, or its pid reused: checked before and after the reads, by start
 * time). Never throws.
 */
export async function readEvidence(p: {
  readonly pid: number;
  readonly startTime: number;
}): Promise<ProcessReading | null> {
  const before = readStat(p.pid);
  if (before === null || before.startTime !== p.startTime) return null;
  const at = Date.now();
  const [wchan, syscall, stack, cgroup] = await Promise.all([
    procText(p.pid, "wchan"),
    procText(p.pid, "syscall"),
    procText(p.pid, "stack"),
    procText(p.pid, "cgroup"),
  ]);
  const after = readStat(p.pid);
  if (after === null || after.startTime !== p.startTime) return null;
  const frames = stack === null ? null : lines(stack);
  return {
    at,
    state: before.state,
    wchan: wchan === null ? null : cut(wchan.trim()),
    syscall: syscall === null ? null : cut(syscall.trim()),
    stack: frames === null ? null : frames.slice(0, STACK_LINES).map(cut),
    ...(frames !== null && frames.length > STACK_LINES ? { stackOmitted: frames.length - STACK_LINES } : {}),
    cgroups: cgroup === null ? [] : lines(cgroup).slice(0, CGROUP_LINES).map(cut),
  };
}

/** A /proc/<pid>/ file's text, or null: unreadable, gone, or not read within READ_TIMEOUT_MS. */
async function procText(pid: number, file: string): Promise<string | null> {
  let timer: NodeJS.Timeout | undefined;
  // A race, not an AbortSignal: readFile looks at a signal only between its reads, and the
  // read that waits on the kernel's lock is one of them.
  const givenUp = new Promise<null>((resolve) => (timer = setTimeout(() => resolve(null), READ_TIMEOUT_MS)));
  try {
    return await Promise.race([readFile(`/proc/${pid}/${file}`, "latin1").catch(() => null), givenUp]);
  } finally {
    clearTimeout(timer);
  }
}

const lines = (text: string): string[] => text.split("\n").filter((l) => l.trim() !== "");
const cut = (line: string): string => (line.length > LINE_CHARS ? `${line.slice(0, LINE_CHARS)}…` : line);
