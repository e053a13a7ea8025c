import { closeSync, fstatSync, lstatSync, readdirSync, type Stats } from "node:fs";
import { dirname } from "node:path";
import type { Logger } from "pino";
import { errorMessage } from "../errors.js";
import { loopTurn } from "../pace/turns.js";
import { addon, AT_FDCWD } from "../native/addon.js";
import { runProgram, systemProgram } from "../native/spawn.js";
import { checkPath } from "./validate.js";

export type RemoveResult =
  | { status: "removed" | "absent"; attempts: number }
  | { status: "refused" | "failed"; detail: string; attempts: number };

/** rm gives up when a racing rename moves things under it: try again, up to this many times. */
const MAX_ATTEMPTS = 10;

/**
 * The one code path through which the daemon deletes anything.
 *
 * 1. The policy is checked (checkPath: below an allowed root, no symlink, same file system,
 *    owned by the engine's uid).
 * 2. The parent directory is opened one component at a time from the root with
 *    openat(O_DIRECTORY | O_NOFOLLOW) (the native addon), checking the file system of each:
 *    a component swapped for a symlink after step 1 is refused, never followed.
 * 3. GNU `rm -rf --one-file-system -- ./NAME` runs with that directory fd as its working
 *    directory (the child fchdirs to the fd itself, not to a path looked up again), as the
 *    path owner's uid/gid when the daemon is root (src/native/spawn.ts: no fork). rm walks
 *    with openat and never follows a symlink met during the walk, nor crosses a mount point.
 * 4. A race can make rm fail (a name it saw moved away): steps 1-3 are retried until the
 *    path is gone, refused, or MAX_ATTEMPTS is reached.
 *
 * Without the addon (not built) every delete is refused: handing rm an absolute path lets
 * a parent swapped for a symlink after step 1 be followed (test/paths/race.test.ts shows it).
 */
export async function removePath(
  path: string,
  roots: readonly string[],
  uid: number,
  log: Logger,
  signal: AbortSignal,
): Promise<RemoveResult> {
  let last: RemoveResult = { status: "failed", detail: "not attempted", attempts: 0 };
  for (let attempt = 1; attempt <= MAX_ATTEMPTS && !signal.aborted; attempt++) {
    const r = await removeOnce(path, roots, uid, log, signal);
    last = { ...r, attempts: attempt };
    if (r.status !== "failed") break;
  }
  if (last.status === "removed") log.info({ path, uid, attempts: last.attempts }, "path deleted");
  if (last.status === "refused") log.warn({ path, detail: last.detail }, "delete refused");
  return last;
}

type Once = { status: "removed" | "absent" } | { status: "refused" | "failed"; detail: string };

async function removeOnce(
  path: string,
  roots: readonly string[],
  uid: number,
  log: Logger,
  signal: AbortSignal,
): Promise<Once> {
  // A storm's deletes are paced (the checks' lstat and openat walk, rm's spawn) before the
  // checks, so that nothing waits between the checks and rm.
  await loopTurn();
  let checked;
  try {
    checked = checkPath(path, roots, uid);
  } catch (err) {
    return { status: "refused", detail: errorMessage(err) };
  }
  if (checked.stat === null) return { status: "absent" };
  if (addon === null) {
    return { status: "refused", detail: "the native addon is not built: no safe delete is possible (run npm ci)" };
  }

  const parts = path.slice(checked.root.length + 1).split("/");
  const name = parts.pop() as string;
  let dirfd: number;
  try {
    dirfd = addon.openDirAt(AT_FDCWD, checked.root);
  } catch (err) {
    return { status: "refused", detail: `cannot open the root ${checked.root}: ${errorMessage(err)}` };
  }
  try {
    const rootDev = fstatSync(dirfd).dev;
    for (const part of parts) {
      let next: number;
      try {
        next = addon.openDirAt(dirfd, part);
      } catch (err) {
        const code = (err as { code?: string }).code;
        if (code === "ENOENT") return { status: "absent" };
        if (code === "ELOOP" || code === "ENOTDIR") {
          return { status: "refused", detail: `"${part}" in ${path} is no longer a directory (a symlink swapped in?)` };
        }
        throw err;
      }
      closeSync(dirfd);
      dirfd = next;
      if (fstatSync(dirfd).dev !== rootDev)
        return { status: "refused", detail: `"${part}" in ${path} is a mount point` };
    }
    const inDir = `/proc/self/fd/${dirfd}/${name}`;
    const target = lstatOrNull(inDir);
    if (target === null) return { status: "absent" };
    if (target.uid !== uid) return { status: "refused", detail: `${path} is now owned by uid ${target.uid}` };
    if (target.dev !== rootDev) return { status: "refused", detail: `${path} is now a mount point` };
    const r = await runRm(["--", `./${name}`], dirfd, uid, target, log, signal, () => lstatOrNull(inDir) !== null);
    return r.status === "failed" ? { ...r, detail: whatIsLeft(path, inDir, dirfd, uid, target, r.detail) } : r;
  } catch (err) {
    return { status: "failed", detail: errorMessage(err) };
  } finally {
    closeSync(dirfd);
  }
}

/** Runs rm in the directory `dirfd` and reports whether the target is gone. */
async function runRm(
  args: string[],
  dirfd: number,
  uid: number,
  target: Stats,
  log: Logger,
  signal: AbortSignal,
  stillThere: () => boolean,
): Promise<Once> {
  // As the owner whenever that is not us: as root, or as the dedicated user holding
  // CAP_SETUID/CAP_SETGID (systemd/session-reaper.service). rm then holds no capability.
  // The native spawn, not a fork: a storm runs hundreds of these while heartbeats wait.
  const asOwner = uid !== process.geteuid?.();
  let detail: string | null;
  try {
    const ran = await runProgram(systemProgram("rm"), ["-rf", "--one-file-system", ...args], {
      cwdFd: dirfd,
      signal,
      ...(asOwner ? { as: { uid, gid: target.gid } } : {}),
    });
    // A storm's rm exits arrive by the dozen in one poll phase: their reaps go on paced.
    await loopTurn();
    detail =
      ran.code === 0
        ? null
        : ran.stderr || (ran.signal !== 0 ? `rm was killed by signal ${ran.signal}` : `rm exited with ${ran.code}`);
  } catch (err) {
    detail = errorMessage(err);
  }
  if (!stillThere()) return { status: "removed" };
  log.debug({ detail }, "rm left the path in place");
  return { status: "failed", detail: detail ?? "the path still exists after rm" };
}

/**
 * What a failed rm left, said plainly: rm's message alone ("Permission denied") reads as if
 * nothing was deleted, when typically everything inside was and only the directory itself
 * remains, because its parent is not writable by the uid rm ran as (a directory registered
 * directly below a root-owned one).
 */
function whatIsLeft(path: string, inDir: string, dirfd: number, uid: number, target: Stats, detail: string): string {
  let entries: string[];
  try {
    if (!lstatSync(inDir).isDirectory()) return detail;
    entries = readdirSync(inDir);
  } catch {
    return detail;
  }
  if (entries.length > 0) return detail;
  const parent = fstatSync(dirfd);
  const why = writableBy(parent, uid, target.gid)
    ? ""
    : `: its parent ${dirname(path)} is not writable by uid ${uid} (owner uid ${parent.uid}, mode ${(parent.mode & 0o7777).toString(8).padStart(4, "0")})`;
  return `its contents were removed; the empty directory itself remains${why} (${detail})`;
}

/** Whether the mode bits let uid (with gid, the group rm runs with) write in a directory. */
function writableBy(st: Stats, uid: number, gid: number): boolean {
  if (uid === 0) return true;
  if (st.uid === uid) return (st.mode & 0o200) !== 0;
  if (st.gid === gid) return (st.mode & 0o020) !== 0;
  return (st.mode & 0o002) !== 0;
}

function lstatOrNull(p: string): Stats | null {
  try {
    return lstatSync(p);
  } catch {
    return null;
  }
}
