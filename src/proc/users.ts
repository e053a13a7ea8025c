import { readFileSync, readdirSync, readlinkSync } from "node:fs";
import { readStat, readUid } from "./stat.js";

import { SESSION_COOKIE } from "../sessions/types.js";

export { SESSION_COOKIE };

/** A live process found using something of a session: what it is and why it was found. */
export interface ProcessUse {
  readonly pid: number;
  readonly startTime: number;
  readonly comm: string;
  readonly uid: number;
  /** Every reason, comma-joined: "cookie", "cwd under /tmp/x", "root under …", "fd under …", "maps under …", "port 5432 (tcp ESTABLISHED)". */
  readonly why: string;
}

export interface UseQuery {
  /** Find processes using (cwd, root, an open fd, a mapped file) a path at or below one of these. */
  readonly paths?: readonly string[];
  /** Find processes whose environment carries REAPER_SESSION_ID=<cookie>. */
  readonly cookie?: string;
  /** Find processes holding one of these sockets (inode -> why, e.g. "port 5432 (ESTABLISHED)"). */
  readonly sockets?: ReadonlyMap<number, string>;
  /** Pids never reported (the daemon itself). */
  readonly skip?: ReadonlySet<number>;
}

/** Processes looked at between two yields to the event loop (about a millisecond's work). */
const YIELD_EVERY = 8;

/** Every pid in /proc but `skip`, yielding to the event loop every YIELD_EVERY of them. */
async function* everyPid(skip?: ReadonlySet<number>): AsyncGenerator<number> {
  let names: string[];
  try {
    names = readdirSync("/proc");
  } catch {
    return;
  }
  let looked = 0;
  for (const name of names) {
    const c = name.charCodeAt(0);
    if (c < 48 || c > 57) continue;
    const pid = Number(name);
    if (skip?.has(pid)) continue;
    if (++looked % YIELD_EVERY === 0) await new Promise((r) => setImmediate(r));
    yield pid;
  }
}

const under = (target: string, root: string): boolean =>
  target === root || (target.startsWith(root) && target.charCodeAt(root.length) === 47); /* / */

/**
 * One pass over /proc: every live process (zombies and kernel threads have nothing to use)
 * that carries the session's cookie or uses one of its paths, each with the first reason
 * found. The answer to "is anything of this session still alive, or still holding its
 * files?", taken independently of what the daemon believed the session's processes were.
 *
 * Cost: per process a stat, and only for what is asked: its environ (cookie), its cwd and
 * root links, its fd links and its maps (paths): a few tens of ms for a hundred processes,
 * so the pass yields to the event loop every YIELD_EVERY processes (heartbeats are served
 * meanwhile; a loop blocked for long would also count as a stall). Nothing is read when
 * nothing is asked.
 */
export async function processUses(q: UseQuery): Promise<ProcessUse[]> {
  const paths = (q.paths ?? []).filter((p) => p.startsWith("/") && p !== "/");
  const needle = q.cookie === undefined ? null : Buffer.from(`${SESSION_COOKIE}=${q.cookie}\0`);
  const sockets = q.sockets ?? new Map<number, string>();
  if (paths.length === 0 && needle === null && sockets.size === 0) return [];
  const usesPath = (target: string): string | undefined => paths.find((p) => under(target, p));
  const out: ProcessUse[] = [];
  for await (const pid of everyPid(q.skip)) {
    const reasons = fileUses(pid, paths.length > 0 ? usesPath : null, sockets);
    if (needle !== null && carries(pid, needle)) reasons.unshift("cookie");
    if (reasons.length === 0) continue;
    const why = reasons.join(", ");
    const st = readStat(pid);
    if (st === null || st.state === "Z" || st.state === "X") continue;
    out.push({ pid, startTime: st.startTime, comm: st.comm, uid: readUid(pid) ?? -1, why });
  }
  return out;
}

function carries(pid: number, needle: Buffer): boolean {
  let env: Buffer;
  try {
    env = readFileSync(`/proc/${pid}/environ`);
  } catch {
    return false;
  }
  return startsVariable(env, needle);
}

/** `needle` ("NAME=value\0") at the start of one variable: the first, or after a NUL. */
function startsVariable(env: Buffer, needle: Buffer): boolean {
  for (let i = env.indexOf(needle); i >= 0; i = env.indexOf(needle, i + 1)) {
    if (i === 0 || env[i - 1] === 0) return true;
  }
  return false;
}

/** A /proc link's target; a file deleted since shows as "PATH (deleted)", taken as PATH. */
function link(path: string): string | null {
  try {
    const target = readlinkSync(path);
    return target.endsWith(" (deleted)") ? target.slice(0, -10) : target;
  } catch {
    return null;
  }
}

const SOCKET_LINK = /^socket:\[(\d+)\]$/;

/** Every reason (distinct, in the order found) for which the process counts: cwd, root, fds, sockets, maps. */
function fileUses(
  pid: number,
  usesPath: ((target: string) => string | undefined) | null,
  sockets: ReadonlyMap<number, string>,
): string[] {
  const reasons = new Set<string>();
  if (usesPath !== null) {
    for (const kind of ["cwd", "root"] as const) {
      const target = link(`/proc/${pid}/${kind}`);
      const hit = target === null || (kind === "root" && target === "/") ? undefined : usesPath(target);
      if (hit !== undefined) reasons.add(`${kind} under ${hit}`);
    }
  }
  let fds: string[] = [];
  try {
    fds = readdirSync(`/proc/${pid}/fd`);
  } catch {
    // gone, or not ours to read
  }
  for (const fd of fds) {
    const target = link(`/proc/${pid}/fd/${fd}`);
    if (target === null) continue;
    if (target.charCodeAt(0) !== 47) {
      // socket:[…], pipe:[…], anon_inode:…
      const m = sockets.size > 0 ? SOCKET_LINK.exec(target) : null;
      const hit = m === null ? undefined : sockets.get(Number(m[1]));
      if (hit !== undefined) reasons.add(hit);
      continue;
    }
    const hit = usesPath?.(target);
    if (hit !== undefined) reasons.add(`fd under ${hit}`);
  }
  if (usesPath === null) return [...reasons];
  let maps = "";
  try {
    maps = readFileSync(`/proc/${pid}/maps`, "latin1");
  } catch {
    // gone
  }
  for (const line of maps.split("\n")) {
    const slash = line.indexOf("/");
    if (slash < 0) continue;
    const file = line.slice(slash);
    const hit = usesPath(file.endsWith(" (deleted)") ? file.slice(0, -10) : file);
    if (hit !== undefined) reasons.add(`maps under ${hit}`);
  }
  return [...reasons];
}

/**
 * Which of `files` some live process has open or mapped now (one pass over /proc: fd links
 * and maps), for IPC objects: a shared memory file still mapped belongs to a live process
 * (another cluster of the same user, a survivor), never to a leftover.
 */
export async function filesInUse(files: ReadonlySet<string>): Promise<Set<string>> {
  const used = new Set<string>();
  if (files.size === 0) return used;
  for await (const name of everyPid()) {
    let fds: string[] = [];
    try {
      fds = readdirSync(`/proc/${name}/fd`);
    } catch {
      // gone
    }
    for (const fd of fds) {
      const target = link(`/proc/${name}/fd/${fd}`);
      if (target !== null && files.has(target)) used.add(target);
    }
    let maps = "";
    try {
      maps = readFileSync(`/proc/${name}/maps`, "latin1");
    } catch {
      // gone
    }
    for (const line of maps.split("\n")) {
      const slash = line.indexOf("/");
      if (slash < 0) continue;
      const file = line.slice(slash);
      const path = file.endsWith(" (deleted)") ? file.slice(0, -10) : file;
      if (files.has(path)) used.add(path);
    }
  }
  return used;
}
