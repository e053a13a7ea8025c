import { relative } from "node:path";

/**
 * The longest unix socket path the kernel takes: sun_path is 108 bytes, NUL included. A
 * longer path is not refused by bind(2) everywhere: it may be cut short, and the socket made
 * under another name.
 */
export const SOCKET_PATH_MAX = 107;

/**
 * The path to bind or connect to for the unix socket at `path` (absolute): the path itself
 * when the kernel takes it, else the same file named relative to the working directory `cwd`
 * when that is short enough (a clone in a deep directory, whose ./reaper.sock is reached as
 * such), else null. The working directory of the daemon and of reaperctl never changes
 * while they run, so a relative name stays the same file.
 */
export function reachablePath(path: string, cwd = process.cwd()): string | null {
  if (Buffer.byteLength(path) <= SOCKET_PATH_MAX) return path;
  const near = relative(cwd, path);
  return near !== "" && Buffer.byteLength(near) <= SOCKET_PATH_MAX ? near : null;
}
