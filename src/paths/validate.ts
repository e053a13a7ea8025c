import { lstatSync, type Stats } from "node:fs";
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

/**
 * The path policy, applied at registration and again right before deletion: absolute,
 * normalized, strictly below one of the allowed roots (never a root itself), no symbolic
 * link in any component from the root down, on the root's file system, and owned by `uid`.
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
  const exists = current === path && stat !== null;
  if (exists && stat !== null && stat.uid !== uid) {
    throw new ReaperError(
      "SR_PATH_NOT_OWNED",
      `${field}: "${path}" is owned by uid ${stat.uid}, not the engine's uid ${uid}`,
    );
  }
  return { path, root, stat: exists ? stat : null };
}
