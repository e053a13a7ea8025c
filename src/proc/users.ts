import { readFileSync, readdirSync, readlinkSync } from "node:fs";
import { askShared, SharedReading } from "../pace/shared-reading.js";
import { loopTurn } from "../pace/turns.js";
import { isPidEntry, readStat, readUid } from "./stat.js";

import { SESSION_COOKIE } from "../model/session.js";
import { BUDGETS } from "../pace/budgets.js";

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
const YIELD_EVERY = BUDGETS.walkProcessesPerTurn;
/**
 * A walk begins at most every this many ms. A storm keeps scans coming: walking again at once
 * after each walk would spend the loop on walks of the whole host; 100 ms lets the scans of a
 * window share one, for at most 100 ms more per answer.
 */
const WALK_EVERY_MS = BUDGETS.readEveryMs;

/**
 * What one process exposes in /proc, each read at most once per walk, however many scans
 * ask for it: its environ, its cwd and root links, its fd links, the files it maps.
 */
class ProcView {
  private env: Buffer | null | undefined;
  private links: { cwd: string | null; root: string | null } | undefined;
  private fdTargets: string[] | undefined;
  private mapped: string[] | undefined;

  constructor(readonly pid: number) {}

  environ(): Buffer | null {
    if (this.env === undefined) {
      try {
        this.env = readFileSync(`/proc/${this.pid}/environ`);
      } catch {
        this.env = null;
      }
    }
    return this.env;
  }

  cwdRoot(): { cwd: string | null; root: string | null } {
    this.links ??= { cwd: link(`/proc/${this.pid}/cwd`), root: link(`/proc/${this.pid}/root`) };
    return this.links;
  }

  fds(): string[] {
    if (this.fdTargets === undefined) {
      this.fdTargets = [];
      let fds: string[] = [];
      try {
        fds = readdirSync(`/proc/${this.pid}/fd`);
      } catch {
        // gone, or not ours to read
      }
      for (const fd of fds) {
        const target = link(`/proc/${this.pid}/fd/${fd}`);
        if (target !== null) this.fdTargets.push(target);
      }
    }
    return this.fdTargets;
  }

  maps(): string[] {
    if (this.mapped === undefined) {
      this.mapped = [];
      let text = "";
      try {
        text = readFileSync(`/proc/${this.pid}/maps`, "latin1");
      } catch {
        // gone
      }
      for (const line of text.split("\n")) {
        const slash = line.indexOf("/");
        if (slash < 0) continue;
        const file = line.slice(slash);
        this.mapped.push(file.endsWith(" (deleted)") ? file.slice(0, -10) : file);
      }
    }
    return this.mapped;
  }
}

/**
 * One question asked of every process in a walk. What it looks for is declared (`keys`), so
 * that a walk serving hundreds of scans finds, per process, the few scans it concerns through
 * maps (a cookie, a path or one of its parents, a socket inode, a file), and calls only
 * their `visit`: the cost of a walk is its reads, not processes × scans.
 */
interface Scan {
  readonly skip?: ReadonlySet<number> | undefined;
  readonly keys: ScanKeys;
  /** Called for a process that has one of the scan's keys (and for no other). */
  visit(p: ProcView): void;
  /** Called once the walk has seen every process. */
  done(): void;
  fail(err: unknown): void;
}

interface ScanKeys {
  /** The cookie's value: processes whose environment has REAPER_SESSION_ID=<cookie>. */
  readonly cookie?: string | undefined;
  /** Processes with a cwd, root, fd or mapping at or below one of these. */
  readonly paths?: readonly string[] | undefined;
  /** Processes holding one of these socket inodes. */
  readonly sockets?: Iterable<number> | undefined;
  /** Processes with exactly one of these files open or mapped. */
  readonly files?: Iterable<string> | undefined;
}

/** The scans of one walk, by what they look for. */
class ScanIndex {
  readonly byCookie = new Map<string, Scan[]>();
  readonly byPath = new Map<string, Scan[]>();
  readonly bySocket = new Map<number, Scan[]>();
  readonly byFile = new Map<string, Scan[]>();

  constructor(scans: Iterable<Scan>) {
    for (const s of scans) {
      const k = s.keys;
      // Keyed as environ's bytes read as latin1, whatever the cookie's characters.
      if (k.cookie !== undefined) add(this.byCookie, Buffer.from(k.cookie).toString("latin1"), s);
      for (const p of k.paths ?? []) add(this.byPath, p, s);
      for (const inode of k.sockets ?? []) add(this.bySocket, inode, s);
      for (const f of k.files ?? []) add(this.byFile, f, s);
    }
  }

  /** The scans `p` concerns: read only what some scan asks about. */
  scansOf(p: ProcView): Set<Scan> {
    const out = new Set<Scan>();
    const addAll = (list: readonly Scan[] | undefined): void => {
      if (list !== undefined) for (const s of list) out.add(s);
    };
    if (this.byCookie.size > 0) {
      const env = p.environ();
      if (env !== null) for (const value of cookieValues(env)) addAll(this.byCookie.get(value));
    }
    const paths = this.byPath.size > 0;
    const byPath = (target: string): void => {
      // The target and each parent: a path scan matches at or below its path.
      addAll(this.byPath.get(target));
      for (let i = target.lastIndexOf("/"); i > 0; i = target.lastIndexOf("/", i - 1)) {
        addAll(this.byPath.get(target.slice(0, i)));
      }
    };
    if (paths) {
      const { cwd, root } = p.cwdRoot();
      if (cwd !== null) byPath(cwd);
      if (root !== null && root !== "/") byPath(root);
    }
    if (paths || this.bySocket.size > 0 || this.byFile.size > 0) {
      for (const target of p.fds()) {
        if (target.charCodeAt(0) !== 47) {
          if (this.bySocket.size === 0) continue;
          const m = SOCKET_LINK.exec(target);
          if (m !== null) addAll(this.bySocket.get(Number(m[1])));
          continue;
        }
        if (paths) byPath(target);
        addAll(this.byFile.get(target));
      }
    }
    if (paths || this.byFile.size > 0) {
      for (const file of p.maps()) {
        if (paths) byPath(file);
        addAll(this.byFile.get(file));
      }
    }
    return out;
  }
}

function add<K>(map: Map<K, Scan[]>, key: K, scan: Scan): void {
  const list = map.get(key);
  if (list === undefined) map.set(key, [scan]);
  else if (list[list.length - 1] !== scan) list.push(scan);
}

const COOKIE_PREFIX = Buffer.from(`${SESSION_COOKIE}=`);

/** The values of every REAPER_SESSION_ID variable in an environ block (NUL-terminated ones), as latin1. */
function cookieValues(env: Buffer): string[] {
  const out: string[] = [];
  for (let i = env.indexOf(COOKIE_PREFIX); i >= 0; i = env.indexOf(COOKIE_PREFIX, i + 1)) {
    if (i !== 0 && env[i - 1] !== 0) continue;
    const from = i + COOKIE_PREFIX.length;
    const end = env.indexOf(0, from);
    if (end >= 0) out.push(env.toString("latin1", from, end));
  }
  return out;
}

/**
 * One walk of /proc answers every scan asked before it began (src/pace/shared-reading.ts: at
 * most a walk per WALK_EVERY_MS, a scan asked during a walk waits for the next, as it must
 * see /proc as it is after it asked). Each process's files are read once per walk, whatever
 * the number of scans: a storm of reaps costs a walk per 100 ms, not one per reap step.
 */
async function walk(scans: Scan[]): Promise<void> {
  const live = new Set(scans);
  const index = new ScanIndex(scans);
  let names: string[] = [];
  try {
    names = readdirSync("/proc");
  } catch {
    // no /proc: nothing is found
  }
  let looked = 0;
  for (const name of names) {
    if (!isPidEntry(name)) continue;
    const view = new ProcView(Number(name));
    for (const s of index.scansOf(view)) {
      if (!live.has(s) || s.skip?.has(view.pid)) continue;
      try {
        s.visit(view);
      } catch (err) {
        live.delete(s);
        s.fail(err);
      }
    }
    // A paced turn: the walk's chunks share the loop's budget with the reaps it serves.
    if (++looked % YIELD_EVERY === 0) await loopTurn();
  }
  for (const s of live) s.done();
}

const walker = new SharedReading<Scan>(WALK_EVERY_MS, walk, (s, err) => s.fail(err));

/** How many /proc walks served how many scans since the start (shared walks: scans > walks). */
export function walkStats(): { walks: number; scans: number } {
  return { walks: walker.stats.reads, scans: walker.stats.asks };
}

/** A scan's answer, handed back at a paced turn (loopTurn): a walk answers many reaps at once. */
function scan<T>(make: (resolve: (value: T) => void) => Omit<Scan, "fail">): Promise<T> {
  return askShared<Scan, T>(walker, (resolve, reject) => ({ ...make(resolve), fail: reject }));
}

const under = (target: string, root: string): boolean =>
  target === root || (target.startsWith(root) && target.charCodeAt(root.length) === 47); /* / */

/**
 * Every live process (zombies and kernel threads have nothing to use) that carries the
 * session's cookie or uses one of its paths, each with every reason found. The answer to "is
 * anything of this session still alive, or still holding its files?", taken independently
 * of what the daemon believed the session's processes were.
 *
 * Cost: per process only what is asked (its environ for a cookie; its cwd and root links,
 * its fd links and its maps for paths; its fd links for sockets), read once per walk for all
 * the scans that share it (src/pace/shared-reading.ts); the walk yields to the event loop every YIELD_EVERY
 * processes, so heartbeats are served meanwhile. Nothing is read when nothing is asked.
 */
export function processUses(q: UseQuery): Promise<ProcessUse[]> {
  const paths = (q.paths ?? []).filter((p) => p.startsWith("/") && p !== "/");
  const needle = q.cookie === undefined ? null : Buffer.from(`${SESSION_COOKIE}=${q.cookie}\0`);
  const sockets = q.sockets ?? new Map<number, string>();
  if (paths.length === 0 && needle === null && sockets.size === 0) return Promise.resolve([]);
  const usesPath = (target: string): string | undefined => paths.find((p) => under(target, p));
  return scan<ProcessUse[]>((resolve) => {
    const out: ProcessUse[] = [];
    return {
      skip: q.skip,
      keys: { cookie: needle === null ? undefined : q.cookie, paths, sockets: [...sockets.keys()] },
      visit(p) {
        const reasons = fileUses(p, paths.length > 0 ? usesPath : null, sockets);
        const env = needle === null ? null : p.environ();
        if (env !== null && needle !== null && startsVariable(env, needle)) reasons.unshift("cookie");
        if (reasons.length === 0) return;
        const st = readStat(p.pid);
        if (st === null || st.state === "Z" || st.state === "X") return;
        out.push({
          pid: p.pid,
          startTime: st.startTime,
          comm: st.comm,
          uid: readUid(p.pid) ?? -1,
          why: reasons.join(", "),
        });
      },
      done: () => resolve(out),
    };
  });
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

/** A live process holding a socket: its pid and start time, as the walk saw it. */
export interface SocketHolder {
  readonly pid: number;
  readonly startTime: number;
}

/**
 * The live holders of each of these socket inodes (inode -> holders, in /proc order), from
 * the shared walk of /proc (processUses): one walk answers every reap that asks at about the
 * same time, instead of a synchronous walk of every process's fds per question.
 */
export async function socketHolders(inodes: Iterable<number>): Promise<Map<number, SocketHolder[]>> {
  const keys = new Map<number, string>();
  for (const inode of inodes) keys.set(inode, `socket:[${inode}]`);
  const out = new Map<number, SocketHolder[]>();
  if (keys.size === 0) return out;
  for (const u of await processUses({ sockets: keys })) {
    for (const reason of u.why.split(", ")) {
      const m = /^socket:\[(\d+)\]$/.exec(reason);
      if (m === null) continue;
      const inode = Number(m[1]);
      const holders = out.get(inode);
      const h = { pid: u.pid, startTime: u.startTime };
      if (holders === undefined) out.set(inode, [h]);
      else holders.push(h);
    }
  }
  return out;
}

/** Every reason (distinct, in the order found) for which the process counts: cwd, root, fds, sockets, maps. */
function fileUses(
  p: ProcView,
  usesPath: ((target: string) => string | undefined) | null,
  sockets: ReadonlyMap<number, string>,
): string[] {
  const reasons = new Set<string>();
  if (usesPath !== null) {
    const links = p.cwdRoot();
    for (const kind of ["cwd", "root"] as const) {
      const target = links[kind];
      const hit = target === null || (kind === "root" && target === "/") ? undefined : usesPath(target);
      if (hit !== undefined) reasons.add(`${kind} under ${hit}`);
    }
  }
  if (usesPath === null && sockets.size === 0) return [];
  for (const target of p.fds()) {
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
  for (const file of p.maps()) {
    const hit = usesPath(file);
    if (hit !== undefined) reasons.add(`maps under ${hit}`);
  }
  return [...reasons];
}

/**
 * Which of `files` some live process has open or mapped now (fd links and maps, in a shared
 * walk), for IPC objects: a shared memory file still mapped belongs to a live process
 * (another cluster of the same user, a survivor), never to a leftover.
 */
export function filesInUse(files: ReadonlySet<string>): Promise<Set<string>> {
  const used = new Set<string>();
  if (files.size === 0) return Promise.resolve(used);
  return scan<Set<string>>((resolve) => ({
    keys: { files },
    visit(p) {
      for (const target of p.fds()) if (files.has(target)) used.add(target);
      for (const file of p.maps()) if (files.has(file)) used.add(file);
    },
    done: () => resolve(used),
  }));
}
