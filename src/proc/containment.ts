import { createHash } from "node:crypto";
import { accessSync, constants, mkdirSync, readFileSync, rmdirSync, watch, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Logger } from "pino";
import { type Containment, type ProcessIdentity, processKey } from "../model/session.js";
import { cgroup2Mount, cgroupOf, cgroupPids, ownCgroup } from "./cgroup.js";
import { liveness } from "./identity.js";
import { childrenOf } from "./tree.js";

export type { Containment };

/** Rounds of "move the tree, look again" before newcomers are given up on (a fork loop). */
const MOVE_ROUNDS = 10;

/**
 * The session cgroups' parent, found once at start:
 *
 * - `containment.cgroup_base` configured: that directory of the cgroup v2 tree (made if missing).
 * - Under systemd with `Delegate=yes` (the daemon's own cgroup is a `.service` it may write):
 *   the service's cgroup. A cgroup with children may hold no process of its own, so the
 *   daemon moves itself into `<service>/daemon` and sessions go to `<service>/sessions/`.
 * - Otherwise, as root on a host whose cgroup v2 root is writable (this is how the hybrid
 *   hierarchy's /sys/fs/cgroup/unified is used): `<root>/session-reaper/<database hash>/`, so
 *   that daemons of different databases (tests) never share a directory.
 *
 * `why` is set when no base could be had; sessions then get `containment: none`.
 */
export class SessionCgroups {
  readonly base: string | null;
  readonly why: string | null;
  /** The cgroup each made cgroup's engine came from, for `undo`. */
  private readonly origins = new Map<string, string>();

  private constructor(
    base: string | null,
    why: string | null,
    /** The base is this daemon's own (the database's hash dir): removed at stop once empty. */
    private readonly ownsBase = false,
  ) {
    this.base = base;
    this.why = why;
  }

  /**
   * At daemon stop: stops the background removals of its session cgroups (removeOnceEmptied;
   * one last try each), then removes a base of its own once no session cgroup is left in it.
   */
  close(): void {
    if (this.base !== null) stopRemovals(this.base);
    if (!this.ownsBase || this.base === null) return;
    try {
      rmdirSync(this.base);
    } catch {
      // sessions still live (their cgroups stay for the next start), or gone already
    }
  }

  static none(why: string): SessionCgroups {
    return new SessionCgroups(null, why);
  }

  static find(configured: string, database: string, log: Logger): SessionCgroups {
    const mount = cgroup2Mount();
    if (mount === null) return SessionCgroups.none("the host has no cgroup v2 hierarchy");
    let base: string;
    let owns = false;
    try {
      if (configured !== "") {
        base = join(mount, configured);
        mkdirSync(base, { recursive: true });
      } else {
        const own = cgroupOf("self") ?? "/";
        if (own.endsWith(".service") && writable(join(mount, own))) {
          // Delegated to us by systemd: the daemon into a leaf, sessions beside it.
          mkdirSync(join(mount, own, "daemon"), { recursive: true });
          writeFileSync(join(mount, own, "daemon", "cgroup.procs"), String(process.pid));
          base = join(mount, own, "sessions");
        } else {
          const hash = createHash("sha256").update(database).digest("hex").slice(0, 8);
          base = join(mount, "session-reaper", hash);
          owns = true;
        }
        mkdirSync(base, { recursive: true });
      }
      if (!writable(join(base, "cgroup.procs"))) throw new Error(`${base}/cgroup.procs is not writable`);
    } catch (err) {
      const why = `no cgroup could be made: ${(err as Error).message}`;
      log.warn({ why }, "sessions will not be contained");
      return SessionCgroups.none(why);
    }
    log.info({ base }, "sessions are contained in cgroups below this base");
    return new SessionCgroups(base, null, owns);
  }

  /**
   * Contains a new session: the engine's own cgroup if it already has one (a scope made for
   * it), else a cgroup made at `<base>/<id>` into which the engine's whole current tree is
   * moved, round after round until a look finds no newcomer (a child forked meanwhile is born
   * inside once its parent is). Each pid's identity is checked before and after its move; with
   * `onlyUid` (a non-admin's session) processes of other uids are not moved. Throws when the
   * cgroup cannot be made or the engine cannot be moved.
   */
  contain(id: string, engine: ProcessIdentity, tree: readonly ProcessIdentity[], onlyUid?: number): Containment {
    const own = ownCgroup(engine.pid, engine.startTime, onlyUid);
    if (own.usable) return { kind: "cgroup", path: own.dir, made: false };
    if (this.base === null) return { kind: "none", why: this.why ?? "no cgroup base" };
    const dir = join(this.base, id);
    mkdirSync(dir, { recursive: true });
    if (cgroupPids(dir).length > 0) throw new Error(`${dir} already holds processes`);
    const from = cgroupOf(engine.pid);
    if (from !== null) this.origins.set(dir, from);
    const moved = new Set<string>();
    // The tree as seen at registration first; then, round after round, the children of what
    // was moved (/proc/<pid>/task/*/children: forked before its parent's move, so born
    // outside), until a round finds none. A child forked after its parent's move is born
    // inside. No walk of the whole /proc per round.
    let fresh: readonly ProcessIdentity[] = tree.length > 0 ? tree : [engine];
    try {
      for (let round = 0; round < MOVE_ROUNDS && fresh.length > 0; round++) {
        for (const p of fresh) {
          moved.add(processKey(p));
          if (onlyUid !== undefined && p.uid !== onlyUid) continue;
          moveInto(dir, p);
        }
        fresh = fresh.flatMap((p) => childrenOf(p)).filter((c) => !moved.has(processKey(c)));
      }
      if (!cgroupPids(dir).includes(engine.pid)) throw new Error(`the engine (pid ${engine.pid}) could not be moved`);
    } catch (err) {
      this.release({ kind: "cgroup", path: dir, made: true });
      throw err;
    }
    return { kind: "cgroup", path: dir, made: true };
  }

  /**
   * The cgroup this daemon makes for session `id` (`<base>/<id>`), if it exists: what a session
   * whose stored containment cannot be read was contained in (a damaged row). A scope the engine
   * had of its own is not found this way; nothing else is ever at that path but the session's.
   */
  madeFor(id: string): Containment | null {
    // A session id (SESSION_ID_PATTERN) never holds a "/": anything else names no cgroup of ours.
    if (this.base === null || !/^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$/.test(id)) return null;
    const dir = join(this.base, id);
    try {
      accessSync(join(dir, "cgroup.procs"), constants.F_OK);
    } catch {
      return null;
    }
    return { kind: "cgroup", path: dir, made: true };
  }

  /** Removes a cgroup the daemon made, once empty; false if it is not (yet). */
  release(c: Containment): boolean {
    if (c.kind !== "cgroup" || !c.made) return true;
    this.origins.delete(c.path);
    try {
      rmdirSync(c.path);
      return true;
    } catch (err) {
      return (err as NodeJS.ErrnoException).code === "ENOENT";
    }
  }

  /**
   * A registration that failed after its engine was contained (the store could not commit):
   * its processes go back where the engine came from, and the cgroup is removed, so that a
   * retry starts from the same place.
   */
  undo(c: Containment): void {
    if (c.kind !== "cgroup" || !c.made) return;
    const from = this.origins.get(c.path);
    const mount = cgroup2Mount();
    if (from !== undefined && mount !== null) {
      for (const pid of cgroupPids(c.path)) {
        try {
          writeFileSync(join(mount, from, "cgroup.procs"), String(pid));
        } catch {
          // gone
        }
      }
    }
    this.release(c);
  }
}

function writable(path: string): boolean {
  try {
    accessSync(path, constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

/** Moves one process into `dir`, checking that the pid still names it before and after. */
function moveInto(dir: string, p: ProcessIdentity): void {
  if (liveness(p) !== "alive") return;
  const from = cgroupOf(p.pid);
  try {
    writeFileSync(join(dir, "cgroup.procs"), String(p.pid));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ESRCH") return; // gone meanwhile
    throw err;
  }
  if (liveness(p) === "alive") return;
  // The pid changed hands between the check and the write: put the stranger back.
  const mount = cgroup2Mount();
  if (from !== null && mount !== null) {
    try {
      writeFileSync(join(mount, from, "cgroup.procs"), String(p.pid));
    } catch {
      // it is gone too
    }
  }
}

/** Whether anything still runs in the cgroup (cgroup.events `populated`). */
export function populated(dir: string): boolean {
  try {
    return /^populated 1$/m.test(readFileSync(join(dir, "cgroup.events"), "latin1"));
  } catch {
    return false; // removed
  }
}

/**
 * Resolves once the cgroup is empty (`populated 0`), woken by the kernel's notification on
 * cgroup.events (inotify) rather than a sleep loop; false if `timeoutMs` passes first (never,
 * with Infinity) or `signal` aborts. With `unref`, the wait keeps no process alive.
 */
export function emptied(
  dir: string,
  timeoutMs: number,
  signal?: AbortSignal,
  opts: { unref?: boolean } = {},
): Promise<boolean> {
  if (!populated(dir)) return Promise.resolve(true);
  return new Promise((resolve) => {
    let done = false;
    const finish = (v: boolean): void => {
      if (done) return;
      done = true;
      watcher?.close();
      clearTimeout(timer);
      clearInterval(backstop);
      signal?.removeEventListener("abort", onAbort);
      resolve(v);
    };
    const check = (): void => {
      if (!populated(dir)) finish(true);
    };
    const onAbort = (): void => finish(false);
    let watcher: ReturnType<typeof watch> | undefined;
    try {
      watcher = watch(join(dir, "cgroup.events"), check);
      watcher.on("error", () => check());
    } catch {
      watcher = undefined;
    }
    // A backstop, not the mechanism: a notification lost (the file removed) is seen within a second.
    const backstop = setInterval(check, 1000);
    // setTimeout takes Infinity for 1 ms: no timer at all then.
    const timer = Number.isFinite(timeoutMs) ? setTimeout(() => finish(!populated(dir)), timeoutMs) : undefined;
    if (opts.unref === true) {
      watcher?.unref();
      backstop.unref();
      timer?.unref();
    }
    signal?.addEventListener("abort", onAbort);
    check();
  });
}

/** Session cgroups waiting to empty before they are removed (removeOnceEmptied), by path. */
const pendingRemovals = new Map<string, AbortController>();

/**
 * A session cgroup the reap could not remove (something still runs in it: a process the
 * session may not signal, one in uninterruptible sleep, one frozen by the v1 freezer) is
 * removed in the background once it empties: its cgroup.events says `populated 0`, then
 * rmdir. A process forked in it meanwhile makes the rmdir fail (EBUSY): the wait starts
 * again. Keeps no process alive; `SessionCgroups.close` ends the waits at daemon stop, and
 * the cgroup then stays, as a live session's does.
 */
export function removeOnceEmptied(dir: string, log: Logger): void {
  if (pendingRemovals.has(dir)) return;
  const stop = new AbortController();
  pendingRemovals.set(dir, stop);
  void (async () => {
    try {
      while (await emptied(dir, Infinity, stop.signal, { unref: true })) {
        try {
          rmdirSync(dir);
        } catch (err) {
          const code = (err as NodeJS.ErrnoException).code;
          if (code === "EBUSY" && populated(dir)) continue; // repopulated meanwhile: wait again
          if (code !== "ENOENT") log.warn({ cgroup: dir, err }, "session cgroup could not be removed");
          return;
        }
        log.info({ cgroup: dir }, "session cgroup removed once it emptied");
        return;
      }
    } finally {
      if (pendingRemovals.get(dir) === stop) pendingRemovals.delete(dir);
    }
  })();
}

/** Ends the background removals below `base` (a daemon's stop): one last rmdir each, then left. */
function stopRemovals(base: string): void {
  for (const [dir, stop] of pendingRemovals) {
    if (!dir.startsWith(base + "/")) continue;
    stop.abort();
    pendingRemovals.delete(dir);
    try {
      rmdirSync(dir);
    } catch {
      // still populated: left for an operator (it is a leftover of its session)
    }
  }
}
