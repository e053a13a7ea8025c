import { spawn } from "node:child_process";
import { lstatSync, readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { passwdFileEntry } from "./passwd.js";
import { filesInUse } from "./users.js";

/** Where POSIX shared memory and named semaphores live (shm_open, sem_open). */
export const POSIX_SHM_DIR = "/dev/shm";

/** An IPC object a session left behind (systemd-logind's RemoveIPC= lesson). */
export interface IpcObject {
  readonly kind: "posix_shm" | "sysv_shm" | "sysv_sem" | "sysv_msg";
  /** The file's path (posix_shm), or the SysV id. */
  readonly item: string;
  readonly uid: number;
  /** Why it is the session's. */
  readonly why: string;
}

export interface IpcQuery {
  /** The engine's uid: POSIX objects and SysV semaphores and queues are matched by owner. */
  readonly uid: number;
  /** When the session was registered (wall ms): only objects created since are its. */
  readonly since: number;
  /** Pids of the session's processes (every one ever tracked): SysV shm is matched by creator pid. */
  readonly pids: ReadonlySet<number>;
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
 * Only objects no live process is attached to are listed: SysV shm with `nattch` 0, POSIX
 * files no live process has open or mapped (another cluster of the same user keeps its own;
 * a survivor of the session keeps its, and is itself reported). `since` should be when the
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
  out.push(...posix.filter((o) => !used.has(o.item)));
  for (const r of sysv("shm")) {
    const cpid = Number(r.cpid);
    if (!q.pids.has(cpid) || r.nattch !== "0") continue;
    out.push({
      kind: "sysv_shm",
      item: String(r.shmid),
      uid: Number(r.uid),
      why: `created by pid ${cpid} of the session`,
    });
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
