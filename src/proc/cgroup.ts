import { existsSync, readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { readStat, readUid } from "./stat.js";

let cachedMount: string | null | undefined;

/** Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified in hybrid mode). */
export function cgroup2Mount(): string | null {
  if (cachedMount !== undefined) return cachedMount;
  cachedMount = null;
  try {
    for (const line of readFileSync("/proc/self/mountinfo", "latin1").split("\n")) {
      // "36 25 0:31 / /sys/fs/cgroup rw,... shared:9 - cgroup2 cgroup2 rw,..."
      const [left, right] = line.split(" - ");
      if (right?.startsWith("cgroup2 ")) {
        cachedMount = left?.split(" ")[4] ?? null;
        break;
      }
    }
  } catch {
    // no /proc/self/mountinfo: no cgroup v2
  }
  return cachedMount;
}

/** The process's cgroup v2 path ("/user.slice/…"), or null. */
export function cgroupOf(pid: number | "self"): string | null {
  try {
    const line = readFileSync(`/proc/${pid}/cgroup`, "latin1")
      .split("\n")
      .find((l) => l.startsWith("0::"));
    return line ? line.slice(3) : null;
  } catch {
    return null;
  }
}

/** Every pid in a cgroup and its descendant cgroups. */
export function cgroupPids(dir: string): number[] {
  const out: number[] = [];
  const walk = (d: string): void => {
    try {
      for (const p of readFileSync(join(d, "cgroup.procs"), "latin1").split("\n")) if (p) out.push(Number(p));
      for (const e of readdirSync(d, { withFileTypes: true })) if (e.isDirectory()) walk(join(d, e.name));
    } catch {
      // the cgroup went away while we looked
    }
  };
  walk(dir);
  return out;
}

export type CgroupVerdict = { usable: true; dir: string } | { usable: false; why: string };

/**
 * Whether the engine runs in a cgroup of its own that `cgroup.kill` may end at once: a
 * cgroup v2 other than the root, not the daemon's own nor an ancestor of it, with a
 * `cgroup.kill` file (Linux 5.14+), in which no process is older than the engine. A cgroup
 * made for the engine (a systemd scope, a runner's job cgroup) passes; a shared one fails,
 * since it holds processes started before the engine. Descendants that escaped the tree
 * (double fork, setsid) stay in the cgroup, and this is what reaches them.
 */
export function ownCgroup(enginePid: number, engineStartTime: number, onlyUid?: number): CgroupVerdict {
  const mount = cgroup2Mount();
  if (mount === null) return { usable: false, why: "no cgroup v2" };
  const path = cgroupOf(enginePid);
  if (path === null || path === "/") return { usable: false, why: "the engine is in the root cgroup" };
  const mine = cgroupOf("self") ?? "/";
  if (mine === path || mine.startsWith(path + "/")) return { usable: false, why: "the daemon shares this cgroup" };
  const dir = join(mount, path);
  if (!existsSync(join(dir, "cgroup.kill"))) return { usable: false, why: "no cgroup.kill (Linux < 5.14)" };
  const older = cgroupPids(dir).filter((p) => {
    const st = readStat(p);
    return st !== null && st.startTime < engineStartTime;
  });
  if (older.length > 0) {
    return { usable: false, why: `the cgroup holds processes older than the engine (${older.slice(0, 5).join(", ")})` };
  }
  if (onlyUid !== undefined) {
    const others = cgroupPids(dir).filter((p) => {
      const uid = readUid(p);
      return uid !== null && uid !== onlyUid;
    });
    if (others.length > 0) {
      return {
        usable: false,
        why: `the cgroup holds processes of other uids than ${onlyUid} (${others.slice(0, 5).join(", ")})`,
      };
    }
  }
  return { usable: true, dir };
}
