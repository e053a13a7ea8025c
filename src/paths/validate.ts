import { lstatSync, readFileSync, type Stats } from "node:fs";
import { isAbsolute, normalize, sep } from "node:path";
import { ReaperError } from "../errors.js";

export interface CheckedPath {
  readonly path: string;
  readonly root: string;
  /** lstat of the path; null when it does not exist (yet, or any more). */
  readonly stat: Stats | null;
}

function lstatOrNull(p: string): Stats | null {
  try {
    return lstatSync(p);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw err;
  }
}

/** mountinfo escapes blanks and backslashes as octal (\040, \011, \012, \134). */
const unescapeMount = (s: string): string =>
  s.replace(/\\([0-7]{3})/g, (_m, o: string) => String.fromCharCode(parseInt(o, 8)));

/** Every mount point in the daemon's mount namespace (where rm runs), from /proc/self/mountinfo. */
export function mountPoints(mountinfo = "/proc/self/mountinfo"): string[] {
  let text: string;
  try {
    text = readFileSync(mountinfo, "utf8");
  } catch {
    return [];
  }
  const out: string[] = [];
  for (const line of text.split("\n")) {
    const field = line.split(" ")[4];
    if (field !== undefined) out.push(unescapeMount(field));
  }
  return out;
}

/**
 * A mount point at the path, below it, or between its allowed root and it. A bind mount of
 * the same file system has the same st_dev, so neither the device check nor rm's
 * --one-file-system sees it: only the mount table does. rm would descend into it and delete
 * whatever was mounted there (say, `mount --bind /etc /tmp/x/etc`).
 */
function mountInTheWay(path: string, root: string): string | undefined {
  return mountPoints().find(
    (m) => m === path || m.startsWith(path + sep) || (path.startsWith(m + sep) && m.startsWith(root + sep)),
  );
}

/**
 * The path policy, applied at registration and again right before deletion: absolute,
 * normalized, strictly below one of the allowed roots (never a root itself), no symbolic
 * link in any component from the root down, on the root's file system with no mount point at,
 * above (below the root) or below it, and owned by `uid`.
 * A path that does not exist yet is accepted (an engine may register its temp dir before
 * creating it); its existing ancestors are still checked.
 */
export function checkPath(path: string, roots: readonly string[], uid: number, field = "path"): CheckedPath {
  if (!isAbsolute(path) || normalize(path) !== path || (path.endsWith(sep) && path !== sep) || path.includes("\0")) {
    throw new ReaperError("SR_INVALID_PATH", `${field}: "${path}" must be an absolute, normalized path`);
  }
  if (roots.includes(path) || path === sep) {
    throw new ReaperError("SR_INVALID_PATH", `${field}: "${path}" is an allowed root itself, not a path below one`);
  }
  const root = roots.find((r) => path.startsWith(r + sep));
  if (root === undefined) {
    throw new ReaperError(
      "SR_PATH_OUTSIDE_ROOT",
      `${field}: "${path}" is not below an allowed root (${roots.join(", ") || "none configured"})`,
    );
  }
  const rootStat = lstatOrNull(root);
  if (rootStat === null || !rootStat.isDirectory()) {
    throw new ReaperError("SR_PATH_OUTSIDE_ROOT", `${field}: the allowed root ${root} is not a directory`);
  }
  let current = root;
  let stat: Stats | null = rootStat;
  for (const part of path.slice(root.length + 1).split(sep)) {
    current += sep + part;
    stat = lstatOrNull(current);
    if (stat === null) break;
    if (stat.isSymbolicLink()) {
      throw new ReaperError("SR_PATH_SYMLINK", `${field}: "${current}" is a symbolic link`);
    }
    if (stat.dev !== rootStat.dev) {
      throw new ReaperError("SR_PATH_OTHER_FS", `${field}: "${current}" is on another file system than ${root}`);
    }
  }
  const mount = mountInTheWay(path, root);
  if (mount !== undefined) {
    throw new ReaperError(
      "SR_PATH_OTHER_FS",
      `${field}: "${mount}" is a mount point ${mount === path ? "" : mount.startsWith(path) ? `below "${path}" ` : `above "${path}" `}(a bind mount, maybe); nothing on another mount is deleted`,
    );
  }
  const exists = current === path && stat !== null;
  if (exists && stat !== null && stat.uid !== uid) {
    throw new ReaperError(
      "SR_PATH_NOT_OWNED",
      `${field}: "${path}" is owned by uid ${stat.uid}, not the engine's uid ${uid}`,
    );
  }
  return { path, root, stat: exists ? stat : null };
}
