import { spawn } from "node:child_process";
import { lstatSync, readFileSync, readdirSync, readlinkSync } from "node:fs";
import { join } from "node:path";
import { type ProcessIdentity, processKey } from "../model/session.js";
import { bootId } from "./identity.js";
import { passwdFileEntry } from "./passwd.js";
import { CLOCK_TICKS, readStat, readUid } from "./stat.js";
import { filesInUse } from "./users.js";

/** Where POSIX shared memory and named semaphores live (shm_open, sem_open). */
export const POSIX_SHM_DIR = "/dev/shm";

/** An IPC object a session left behind (systemd-logind's RemoveIPC= lesson). */
export interface IpcObject {
  readonly kind: "posix_shm" | "sysv_shm" | "sysv_sem" | "sysv_msg";
  /** The file's path (posix_shm), or the SysV id. */
  readonly item: string;
  readonly uid: number;
  /** Why it is the session's (and, when in use, who uses it). */
  readonly why: string;
  /**
   * Who still attaches, maps or has it open ("pid 42 (postgres, uid 70), a leftover of the
   * session"), when someone does: an object in use lives as long as its user, so it is
   * reported, never removed, and the verification cannot call it gone.
   */
  readonly inUse?: string;
}

/** A process of the session, by identity, as the caller knows it. */
export interface IpcMember {
  readonly pid: number;
  /** /proc/<pid>/stat start time (clock ticks after boot). */
  readonly startTime: number;
  /** Its uid as recorded (a journaled tree has it, terminate's record not); absent or -1: unknown. */
  readonly uid?: number;
}

export interface IpcQuery {
  /**
   * The engine, by identity: POSIX objects and SysV semaphores and queues are matched by its
   * uid and its start; nothing is matched for an engine of another boot (IPC lives in memory)
   * or for none (pid 0: a path's session).
   */
  readonly engine: ProcessIdentity;
  /**
   * The session's processes by identity (every one ever journaled, and the verification's
   * finds): SysV shm is matched by creator, and those still alive are survivors: an object one
   * of them uses is still the session's, in use.
   */
  readonly members: readonly IpcMember[];
}

/**
 * IPC objects a session leaves when its engine dies without cleaning up (PostgreSQL after a
 * SIGKILL leaves /dev/shm/PostgreSQL.* and a SysV segment). An object is the session's by
 * identity, never by a pid or an owner alone (pid_max is 32768 on many hosts: a pid comes
 * round again within minutes, and a segment outlives its creator by hours):
 *
 * - SysV shared memory whose creator pid (`cpid`) is a member's *and* whose `ctime` is not
 *   before that member's start, created and owned by the engine's uid or the member's own
 *   (`cuid` and `uid`): a segment another process made under that pid before the member was
 *   born, or another user made under it after the member died, is not the session's;
 * - SysV semaphore sets and message queues created and owned by the engine's uid, with a
 *   `ctime` not before the engine's start (the kernel keeps no creator pid for them);
 * - POSIX shared memory and named semaphores in /dev/shm owned by the engine's uid, born
 *   (else changed) not before the engine's start.
 *
 * Times: a member's start is taken as its earliest possible wall-clock moment (bootedAtMs:
 * never after the truth, a few tens of ms before it at most). SysV keeps `ctime` in whole
 * seconds, truncated, so an object counts as made after a start when its `ctime` is in the
 * start's second or a later one: rounding never makes an object made after the start look
 * older. The start's own second is taken as the member's: a segment made in that second
 * under a recycled pid needs the pid space to wrap in under a second (or a root writing
 * ns_last_pid), while an engine making its segment in its first second (ipcmk, a small
 * PostgreSQL cluster) is common. `ctime` is the last change (IPC_SET; for semaphores also
 * SETVAL and SETALL), never before the creation, so a change can only make an object look
 * younger: none of the session's is lost by it, and an object of the same uid made before the
 * member and changed after its start is taken for the session's (only its owner, creator or
 * root may change it). A wall-clock step since the start shifts the comparison by its size
 * (forward: the session's objects of its first moments look older and are missed; backward:
 * older ones of its uid are taken), as it shifts /proc/stat's `btime`. A member with no uid
 * on record counts with its uid now if it still runs, else with the engine's alone. Known
 * limit: a segment the same uid made under the pid of a member that died (no exit time is
 * kept) is taken for the session's.
 *
 * An object in use is listed only when it is still the session's for sure, with `inUse`
 * saying who uses it: SysV shm of the session's creator attached by anyone (`nattch` > 0:
 * the segment outlives the reap as long as its attacher does), a POSIX file open or mapped
 * by a live member of the session (a survivor of the reap). A POSIX file only processes
 * outside the session use is left out: another cluster of the same user keeps its own, and
 * owner and birth time alone do not make it the session's. Matching by owner is for an
 * engine of its own uid: for a root engine everything root made meanwhile would match, so only
 * SysV shm (by creator) is looked at. What the engine's uid made meanwhile outside the
 * session, and left unused, is taken for the session's: the kernel records no creator for it.
 */
export async function ipcLeftovers(q: IpcQuery): Promise<IpcObject[]> {
  const boot = q.engine.pid > 0 && q.engine.bootId === bootId() ? bootedAtMs() : null;
  if (boot === null) return [];
  const startedAt = (m: { startTime: number }): number => boot + (m.startTime * 1000) / CLOCK_TICKS;
  const out: IpcObject[] = [];
  const byOwner = q.engine.uid !== 0;
  const engineSince = startedAt(q.engine);
  let names: string[] = [];
  try {
    if (byOwner) names = readdirSync(POSIX_SHM_DIR);
  } catch {
    // no /dev/shm
  }
  const posix: IpcObject[] = [];
  for (const name of names) {
    try {
      const st = lstatSync(join(POSIX_SHM_DIR, name));
      const born = st.birthtimeMs > 0 ? st.birthtimeMs : st.ctimeMs;
      if (!st.isFile() || st.uid !== q.engine.uid || born < engineSince) continue;
      posix.push({
        kind: "posix_shm",
        item: join(POSIX_SHM_DIR, name),
        uid: st.uid,
        why: "owned by the engine's uid, created while it ran, used by no live process",
      });
    } catch {
      // removed meanwhile
    }
  }
  const used = await filesInUse(new Set(posix.map((o) => o.item)));
  // SysV shm by creator: the member that made it, by pid, start and uid.
  const uids = recordedUids(q.members);
  const creatorOf = (r: Record<string, string>): IpcMember | undefined =>
    q.members.find((m) => {
      if (m.pid !== Number(r.cpid) || Number(r.ctime) < Math.floor(startedAt(m) / 1000)) return false;
      const own = uids.get(processKey(m)) ?? uidIfAlive(m);
      const sessions = (uid: number): boolean => uid === q.engine.uid || uid === own;
      return sessions(Number(r.cuid)) && sessions(Number(r.uid));
    });
  const shm = sysv("shm").flatMap((r) => {
    const creator = creatorOf(r);
    return creator === undefined ? [] : [{ r, creator }];
  });
  // Who of the session's survivors uses what: read only when something is in use at all.
  const anyInUse = used.size > 0 || shm.some(({ r }) => r.nattch !== "0");
  const survivors = anyInUse ? liveMembers(q.members) : [];
  for (const o of posix) {
    if (!used.has(o.item)) {
      out.push(o);
      continue;
    }
    const user = survivors.find((m) => m.files().has(o.item));
    if (user === undefined) continue; // another process's of the same user, as far as can be told
    const inUse = `${user.name}, a leftover of the session`;
    out.push({
      ...o,
      why: `owned by the engine's uid, created while it ran, still open or mapped by ${inUse}`,
      inUse,
    });
  }
  for (const { r, creator } of shm) {
    const base = { kind: "sysv_shm", item: String(r.shmid), uid: Number(r.uid) } as const;
    const by = `created by pid ${creator.pid} of the session since its start`;
    if (r.nattch === "0") {
      out.push({ ...base, why: by });
      continue;
    }
    const inUse = attachers(r, survivors);
    out.push({ ...base, why: `${by}, still attached by ${inUse}`, inUse });
  }
  for (const [kind, file, idKey] of byOwner
    ? ([
        ["sysv_sem", "sem", "semid"],
        ["sysv_msg", "msg", "msqid"],
      ] as const)
    : []) {
    for (const r of sysv(file)) {
      if (Number(r.cuid) !== q.engine.uid || Number(r.uid) !== q.engine.uid) continue;
      if (Number(r.ctime) < Math.floor(engineSince / 1000)) continue;
      out.push({
        kind,
        item: String(r[idKey]),
        uid: Number(r.uid),
        why: "created by the engine's uid since the engine started",
      });
    }
  }
  return out;
}

/** The uid recorded for each member identity ("pid:startTime"), by any record that has one. */
function recordedUids(members: readonly IpcMember[]): Map<string, number> {
  const out = new Map<string, number>();
  for (const m of members) {
    if (m.uid !== undefined && m.uid >= 0) out.set(processKey(m), m.uid);
  }
  return out;
}

/** A member's uid now, if it still runs under its identity (a zombie has none to tell). */
function uidIfAlive(m: IpcMember): number | undefined {
  const st = readStat(m.pid);
  if (st === null || st.startTime !== m.startTime || st.state === "Z" || st.state === "X") return undefined;
  return readUid(m.pid) ?? undefined;
}

interface LiveMember {
  readonly pid: number;
  /** "pid 42 (postgres, uid 70)". */
  readonly name: string;
  /** The files it has open or mapped (as in /proc/<pid>/fd and maps), read on first use. */
  files(): ReadonlySet<string>;
  /** The SysV segments it has attached (a SysV mapping's inode is the shmid), read on first use. */
  segments(): ReadonlySet<string>;
}

/** Those of `members` still alive with their identity (a zombie attaches and maps nothing). */
function liveMembers(members: readonly { pid: number; startTime: number }[]): LiveMember[] {
  const out = new Map<number, LiveMember>();
  for (const m of members) {
    if (out.has(m.pid)) continue;
    const st = readStat(m.pid);
    if (st === null || st.startTime !== m.startTime || st.state === "Z" || st.state === "X") continue;
    let maps: string[] | undefined;
    const mapLines = (): string[] => {
      if (maps === undefined) {
        try {
          maps = readFileSync(`/proc/${m.pid}/maps`, "latin1").split("\n");
        } catch {
          maps = [];
        }
      }
      return maps;
    };
    let files: Set<string> | undefined;
    let segments: Set<string> | undefined;
    out.set(m.pid, {
      pid: m.pid,
      name: `pid ${m.pid} (${st.comm}, uid ${readUid(m.pid) ?? "?"})`,
      files() {
        if (files === undefined) {
          files = new Set();
          for (const line of mapLines()) {
            const slash = line.indexOf("/");
            if (slash >= 0) files.add(line.slice(slash).replace(/ \(deleted\)$/, ""));
          }
          let fds: string[] = [];
          try {
            fds = readdirSync(`/proc/${m.pid}/fd`);
          } catch {
            // gone, or not readable
          }
          for (const fd of fds) {
            try {
              files.add(readlinkSync(`/proc/${m.pid}/fd/${fd}`).replace(/ \(deleted\)$/, ""));
            } catch {
              // closed meanwhile
            }
          }
        }
        return files;
      },
      segments() {
        if (segments === undefined) {
          segments = new Set();
          for (const line of mapLines()) {
            // "7f…-7f… rw-s 00000000 00:01 98331    /SYSV00000000 (deleted)"
            const f = line.trim().split(/\s+/);
            if (f[5]?.startsWith("/SYSV") && f[4] !== undefined) segments.add(f[4]);
          }
        }
        return segments;
      },
    });
  }
  return [...out.values()];
}

/**
 * Who attaches a SysV segment: the session's survivors that do, by name; else the count the
 * kernel keeps, and the last process to attach or detach (`lpid`) if it still runs (finding
 * every attacher would take a read of every process's maps).
 */
function attachers(r: Record<string, string>, survivors: readonly LiveMember[]): string {
  const mine = survivors.filter((m) => m.segments().has(String(r.shmid)));
  if (mine.length > 0) {
    return `${mine.map((m) => m.name).join(", ")}, ${mine.length === 1 ? "a leftover" : "leftovers"} of the session`;
  }
  const n = Number(r.nattch);
  const lpid = Number(r.lpid);
  const last = lpid > 0 ? readStat(lpid) : null;
  const count = `${n} process${n === 1 ? "" : "es"} outside the session's known processes`;
  return last === null
    ? count
    : `${count} (the last to attach or detach: pid ${lpid} (${last.comm}, uid ${readUid(lpid) ?? "?"}))`;
}

/** The rows of /proc/sysvipc/<file>, keyed by the header's column names. */
function sysv(file: "shm" | "sem" | "msg"): Record<string, string>[] {
  let text: string;
  try {
    text = readFileSync(`/proc/sysvipc/${file}`, "latin1");
  } catch {
    return [];
  }
  const [header, ...rows] = text.split("\n").filter((l) => l.trim() !== "");
  const keys = (header ?? "").trim().split(/\s+/);
  return rows.map((row) => {
    const cells = row.trim().split(/\s+/);
    return Object.fromEntries(keys.map((k, i) => [k, cells[i] ?? ""]));
  });
}

/**
 * Removes a SysV object with ipcrm(1), run as its owner (who may always remove it): the
 * daemon's root never touches another user's object on a session's behalf. Resolves with
 * ipcrm's error, or null once removed (or already gone).
 */
export function removeSysv(o: IpcObject): Promise<string | null> {
  const flag = { sysv_shm: "-m", sysv_sem: "-s", sysv_msg: "-q", posix_shm: null }[o.kind];
  if (flag === null) return Promise.resolve("not a SysV object");
  return new Promise((resolve) => {
    let err = "";
    const child = spawn("ipcrm", [flag, o.item], {
      stdio: ["ignore", "ignore", "pipe"],
      ...(process.geteuid?.() === 0 ? { uid: o.uid, gid: gidOf(o.uid) } : {}),
    });
    child.stderr?.setEncoding("utf8").on("data", (d: string) => (err += d));
    child.once("error", (e) => resolve(e.message));
    child.once("exit", (code) =>
      resolve(code === 0 || /invalid id|not found/i.test(err) ? null : err.trim() || `exit ${code}`),
    );
  });
}

/** The uid's primary gid from /etc/passwd, or the uid itself (as useradd's user groups do). */
function gidOf(uid: number): number {
  return passwdFileEntry(uid)?.gid ?? uid;
}

/**
 * When this boot began on the wall clock (ms), as the earliest it can be: never after the
 * truth, a few tens of ms before it at most (/proc/stat's `btime` is whole seconds, up to one
 * early), so that `bootedAtMs() + start ticks × 10` is no later than the process's start.
 * Read anew each time: a wall-clock step moves it (as it moves `btime`). Real time by nature:
 * it is compared with the kernel's own wall-clock stamps, never with the daemon's clock. Null
 * when /proc/uptime cannot be read.
 */
function bootedAtMs(): number | null {
  for (let attempt = 0; ; attempt++) {
    try {
      const before = uptimeMs();
      const wall = Date.now();
      const after = uptimeMs();
      // /proc/uptime is boot time in 10 ms steps, truncated; the wall clock read between the two:
      // boot = wall - uptime at that moment >= wall - (after + 10 ms). A wide gap (the daemon
      // preempted between the reads) only loosens the bound; it is read again a few times.
      if (after - before <= 20 || attempt >= 4) return wall - after - 10;
    } catch {
      return null;
    }
  }
}

function uptimeMs(): number {
  const up = Number(readFileSync("/proc/uptime", "latin1").split(" ")[0]);
  if (!Number.isFinite(up)) throw new Error("unreadable /proc/uptime");
  return Math.round(up * 100) * 10;
}
