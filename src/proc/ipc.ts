import { spawn } from "node:child_process";
import { lstatSync, readFileSync, readdirSync, readlinkSync } from "node:fs";
import { join } from "node:path";
import { passwdFileEntry } from "./passwd.js";
import { readStat, readUid } from "./stat.js";
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

export interface IpcQuery {
  /** The engine's uid: POSIX objects and SysV semaphores and queues are matched by owner. */
  readonly uid: number;
  /** When the session was registered (wall ms): only objects created since are its. */
  readonly since: number;
  /** Pids of the session's processes (every one ever tracked): SysV shm is matched by creator pid. */
  readonly pids: ReadonlySet<number>;
  /**
   * The session's processes by identity, as the caller knows them (journaled trees, the
   * verification's finds): those still alive are its leftovers, and an object one of them
   * uses is still the session's, in use.
   */
  readonly members?: readonly { readonly pid: number; readonly startTime: number }[];
}

/** A second of slack for file-system timestamps against the daemon's clock. */
const SLACK_MS = 1000;

/**
 * IPC objects a session leaves when its engine dies without cleaning up (PostgreSQL after a
 * SIGKILL leaves /dev/shm/PostgreSQL.* and a SysV segment):
 *
 * - POSIX shared memory and named semaphores in /dev/shm owned by the engine's uid and
 *   created since the session was registered (birth time, else change time);
 * - SysV shared memory whose creator pid (`cpid`) was one of the session's processes;
 * - SysV semaphore sets and message queues created by the engine's uid since registration
 *   (the kernel keeps no creator pid for them).
 *
 * An object in use is listed only when it is still the session's for sure, with `inUse`
 * saying who uses it: SysV shm of the session's creator attached by anyone (`nattch` > 0:
 * the segment outlives the reap as long as its attacher does), a POSIX file open or mapped
 * by a live member of the session (a survivor of the reap). A POSIX file only processes
 * outside the session use is left out: another cluster of the same user keeps its own, and
 * owner and birth time alone do not make it the session's. `since` should be when the
 * engine started (its objects made before registration are its too). Matching by owner is for
 * an engine of its own uid: for a root engine everything root made meanwhile would match, so
 * only SysV shm (by creator pid) is looked at. What the same uid made meanwhile outside the
 * session, and left unused, is taken for the session's: the kernel records no creator.
 */
export async function ipcLeftovers(q: IpcQuery): Promise<IpcObject[]> {
  const out: IpcObject[] = [];
  const byOwner = q.uid !== 0;
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
      if (!st.isFile() || st.uid !== q.uid || born < q.since - SLACK_MS) continue;
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
  // Who of the session's survivors uses what: read only when something is in use at all.
  const shm = sysv("shm");
  const anyInUse = used.size > 0 || shm.some((r) => q.pids.has(Number(r.cpid)) && r.nattch !== "0");
  const survivors = anyInUse ? liveMembers(q.members ?? []) : [];
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
  for (const r of shm) {
    const cpid = Number(r.cpid);
    if (!q.pids.has(cpid)) continue;
    const base = { kind: "sysv_shm", item: String(r.shmid), uid: Number(r.uid) } as const;
    if (r.nattch === "0") {
      out.push({ ...base, why: `created by pid ${cpid} of the session` });
      continue;
    }
    const inUse = attachers(r, survivors);
    out.push({ ...base, why: `created by pid ${cpid} of the session, still attached by ${inUse}`, inUse });
  }
  for (const [kind, file, idKey] of byOwner
    ? ([
        ["sysv_sem", "sem", "semid"],
        ["sysv_msg", "msg", "msqid"],
      ] as const)
    : []) {
    for (const r of sysv(file)) {
      if (Number(r.cuid) !== q.uid || Number(r.ctime) * 1000 < q.since - SLACK_MS) continue;
      out.push({
        kind,
        item: String(r[idKey]),
        uid: Number(r.uid),
        why: "created by the engine's uid during the session",
      });
    }
  }
  return out;
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

let bootMs: number | null | undefined;

/** When a process started, on the wall clock (boot time + its start ticks); null if unknown. */
export function startedAtMs(startTime: number): number | null {
  if (bootMs === undefined) {
    try {
      const m = /^btime (\d+)$/m.exec(readFileSync("/proc/stat", "latin1"));
      bootMs = m ? Number(m[1]) * 1000 : null;
    } catch {
      bootMs = null;
    }
  }
  return bootMs === null ? null : bootMs + (startTime / 100) * 1000;
}
