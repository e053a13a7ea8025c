import { spawn } from "node:child_process";
import { lstatSync } from "node:fs";
import type { Logger } from "pino";
import { errorMessage } from "../errors.js";
import { checkPath } from "./validate.js";

export type RemoveResult = { status: "removed" | "absent" } | { status: "refused" | "failed"; detail: string };

/**
 * The one code path through which the daemon deletes anything. The policy is checked again
 * at delete time (a component may have become a symlink since registration), then GNU
 * `rm -rf --one-file-system` does the walk: coreutils walks with fts and openat, never
 * following a symlink met during the walk and never crossing a mount point. It runs with the
 * path owner's uid/gid when the daemon is root, so even a race cannot delete what that user
 * could not.
 */
export async function removePath(
  path: string,
  roots: readonly string[],
  uid: number,
  log: Logger,
  signal: AbortSignal,
): Promise<RemoveResult> {
  let checked;
  try {
    checked = checkPath(path, roots, uid);
  } catch (err) {
    log.warn({ path, err }, "delete refused");
    return { status: "refused", detail: errorMessage(err) };
  }
  if (checked.stat === null) return { status: "absent" };
  const asOwner = process.geteuid?.() === 0 && uid !== 0;
  const detail = await new Promise<string | null>((resolve) => {
    const child = spawn("rm", ["-rf", "--one-file-system", "--", path], {
      stdio: ["ignore", "ignore", "pipe"],
      signal,
      ...(asOwner ? { uid, gid: checked.stat?.gid ?? uid } : {}),
    });
    let stderr = "";
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d.slice(0, 4096)));
    child.on("error", (err) => resolve(errorMessage(err)));
    child.on("close", (code) => resolve(code === 0 ? null : stderr.trim() || `rm exited with ${code}`));
  });
  if (!lexists(path)) {
    log.info({ path, uid: asOwner ? uid : 0 }, "path deleted");
    return { status: "removed" };
  }
  return { status: "failed", detail: detail ?? "the path still exists after rm" };
}

/** Like existsSync, but a dangling symlink exists. */
function lexists(path: string): boolean {
  try {
    lstatSync(path);
    return true;
  } catch {
    return false;
  }
}
