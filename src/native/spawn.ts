import { accessSync, closeSync, constants, openSync, readSync } from "node:fs";
import { addon } from "./addon.js";

/** Where programs the daemon runs itself are looked up: never the caller's or the unit's PATH. */
export const SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/** What a program's stderr may add to a step's detail. */
const STDERR_BYTES = 4096;
/**
 * Programs running at once. A storm's reaps mostly wait and run by the thousand; what costs
 * the host CPU and memory is the programs they start (an rm each): those queue here.
 */
const MAX_RUNNING = 32;

export interface Ran {
  /** The exit code, or -1 when a signal ended it. */
  code: number;
  /** The signal that ended it, or 0. */
  signal: number;
  /** Its stderr (the first 4 KB, trimmed). */
  stderr: string;
}

export interface RunOptions {
  /** The working directory, as an open directory fd (not a path looked up again). */
  cwdFd: number;
  /** Run as this uid and gid (supplementary groups dropped); our own when absent. */
  as?: { uid: number; gid: number };
  /** Aborting kills the program (SIGKILL through its pidfd); the promise still waits for its exit. */
  signal?: AbortSignal;
}

const resolved = new Map<string, string>();

/** The absolute path of `name` on SYSTEM_PATH (cached), or throws ENOENT. */
export function systemProgram(name: string): string {
  let path = resolved.get(name);
  if (path !== undefined) return path;
  for (const dir of SYSTEM_PATH.split(":")) {
    try {
      accessSync(`${dir}/${name}`, constants.X_OK);
      path = `${dir}/${name}`;
      break;
    } catch {
      // not here
    }
  }
  if (path === undefined) {
    throw Object.assign(new Error(`${name}: not found on ${SYSTEM_PATH}`), { code: "ENOENT" });
  }
  resolved.set(name, path);
  return path;
}

let devNull: number | null = null;
/** The exit watches of running programs: a watch whose handle is collected stops watching. */
const watches = new Set<object>();
/**
 * The pidfd watches do not hold the event loop open (a daemon's watches must not): while a
 * slot is taken, this timer does, so a caller awaiting a program is never dropped by an idle loop.
 */
let keepAlive: NodeJS.Timeout | null = null;

/**
 * Runs a short program to its end with the native addon's vfork-style spawn (spawnAt, on a
 * libuv pool thread): the event loop pays ~0.05 ms per program, where a fork's page-table
 * copy grows with the daemon's memory (~17 ms with 300 MB, figure 9) and blocks every
 * heartbeat meanwhile. The program gets /dev/null as stdin and stdout, a memfd as stderr (never a pipe that could fill), only
 * fds 0-2, SYSTEM_PATH and LC_ALL=C, and all signals at their defaults. Its exit is seen
 * through its pidfd (no SIGCHLD handler), and it is reaped with waitpid.
 *
 * Rejects (with the errno's name as `code`) when the addon is not built or the program could
 * not be started; resolves with how it ended otherwise.
 */
export async function runProgram(file: string, args: readonly string[], opts: RunOptions): Promise<Ran> {
  // A slot: free now, or handed over by a program that ended (first come, first served).
  if (active < MAX_RUNNING) {
    if (active++ === 0) keepAlive = setInterval(() => undefined, 3_600_000);
  } else {
    await new Promise<void>((r) => slots.push(r));
  }
  try {
    if (opts.signal?.aborted) {
      throw Object.assign(new Error("not started: aborted while waiting for a free slot"), { code: "ABORT_ERR" });
    }
    return await start(file, args, opts);
  } finally {
    const next = slots.shift();
    if (next !== undefined) next();
    else if (--active === 0 && keepAlive !== null) {
      clearInterval(keepAlive);
      keepAlive = null;
    }
  }
}

/** Slots taken (MAX_RUNNING at most), and the callers waiting for one, in order. */
let active = 0;
const slots: (() => void)[] = [];

async function start(file: string, args: readonly string[], opts: RunOptions): Promise<Ran> {
  if (addon === null) throw Object.assign(new Error("the native addon is not built"), { code: "ENOSYS" });
  const native = addon;
  devNull ??= openSync("/dev/null", "r+");
  const stderr = native.memfdCreate("reaper-stderr");
  let child: { pid: number; pidfd: number };
  try {
    child = await native.spawnAt(
      file,
      [file.slice(file.lastIndexOf("/") + 1), ...args],
      [`PATH=${SYSTEM_PATH}`, "LC_ALL=C"],
      opts.cwdFd,
      [devNull, devNull, stderr],
      opts.as?.uid ?? -1,
      opts.as?.gid ?? -1,
    );
  } catch (err) {
    closeSync(stderr);
    throw err instanceof Error ? err : new Error(String(err));
  }
  return new Promise<Ran>((resolve, reject) => {
    const kill = (): void => {
      try {
        native.pidfdSendSignal(child.pidfd, 9);
      } catch {
        // exited already
      }
    };
    const finish = (): Ran => {
      const status = native.waitExited(child.pid) ?? { code: -1, signal: 0 };
      const buf = Buffer.alloc(STDERR_BYTES);
      let n = 0;
      try {
        n = readSync(stderr, buf, 0, STDERR_BYTES, 0);
      } finally {
        closeSync(stderr);
      }
      return { ...status, stderr: buf.subarray(0, n).toString("utf8").trim() };
    };
    let watch: object;
    try {
      watch = native.watchExit(child.pidfd, () => {
        watches.delete(watch);
        opts.signal?.removeEventListener("abort", kill);
        native.closeFd(child.pidfd);
        resolve(finish());
      });
    } catch (err) {
      // No watch (epoll refused the fd): the program is killed and reaped, and the call fails.
      kill();
      native.closeFd(child.pidfd);
      const reap = (tries: number): void => {
        if (native.waitExited(child.pid) === null && tries > 0) setTimeout(() => reap(tries - 1), 10);
      };
      reap(100);
      closeSync(stderr);
      reject(err instanceof Error ? err : new Error(String(err)));
      return;
    }
    watches.add(watch);
    opts.signal?.addEventListener("abort", kill, { once: true });
    if (opts.signal?.aborted) kill();
  });
}
