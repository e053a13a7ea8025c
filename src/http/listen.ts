import type { Server } from "node:http";
import { chmodSync, chownSync, lstatSync, mkdirSync, unlinkSync } from "node:fs";
import { connect } from "node:net";
import { dirname } from "node:path";
import type { FastifyInstance } from "fastify";
import { unixFd } from "../auth/caller.js";
import { ReaperError } from "../errors.js";
import { addon } from "../native/addon.js";
import { reachablePath } from "../paths/socket-path.js";

/** True if something accepts connections on this unix socket. */
export async function socketAnswers(path: string): Promise<boolean> {
  return (await socketHolder(path)) !== false;
}

/**
 * Who accepts connections on this unix socket: false if nothing does; else the listening
 * process's pid as the kernel recorded it (SO_PEERCRED seen from the connecting side), or
 * null when it cannot be read.
 */
export function socketHolder(path: string): Promise<number | null | false> {
  return new Promise((resolve) => {
    const c = connect({ path: reachablePath(path) ?? path });
    c.once("connect", () => {
      let pid: number | null = null;
      const fd = unixFd(c);
      try {
        if (fd !== null && addon !== null) pid = addon.peerCred(fd).pid;
      } catch {
        // unreadable: the message names the socket only
      }
      c.destroy();
      resolve(pid !== null && pid > 0 ? pid : null);
    });
    c.once("error", () => resolve(false));
  });
}

/** The unix socket's listen backlog: systemd/session-reaper.socket's Backlog= (the kernel caps it at somaxconn). */
export const LISTEN_BACKLOG = 1024;

/**
 * Listens on a unix socket with the given mode. A stale socket file left by a crashed daemon
 * is replaced; a socket another daemon still answers on is not (two daemons on one host
 * would both reap the same engines).
 */
export async function listenUnix(app: FastifyInstance, path: string, mode: number, gid: number | null): Promise<void> {
  // The kernel cuts a longer path short and binds another name (config/load.ts refuses one
  // that no relative name reaches either; this is the last guard before anything is made).
  const bindPath = reachablePath(path);
  if (bindPath === null) {
    throw new ReaperError("SR_CONFIG_INVALID", `api.socket: ${path} is longer than a unix socket path may be`);
  }
  try {
    mkdirSync(dirname(path), { recursive: true });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? String(err);
    throw new ReaperError("SR_CONFIG_INVALID", `api.socket: cannot make the directory ${dirname(path)} (${code})`);
  }
  let existing;
  try {
    existing = lstatSync(path);
  } catch {
    existing = null;
  }
  if (existing !== null) {
    if (!existing.isSocket()) {
      throw new ReaperError("SR_CONFIG_INVALID", `api.socket: ${path} exists and is not a socket`);
    }
    if (await socketAnswers(path)) {
      throw new ReaperError("SR_CONFIG_INVALID", `api.socket: another daemon is already listening on ${path}`);
    }
    unlinkSync(path);
  }
  // The socket unit's Backlog=: a burst of connections waits in the kernel's queue while the
  // loop is busy, instead of being refused (EAGAIN) past Node's default of 511.
  await app.listen({ path: bindPath, backlog: LISTEN_BACKLOG });
  try {
    // The group first: until then the mode applies to the daemon's own group.
    if (gid !== null) chownSync(path, -1, gid);
    chmodSync(path, mode);
  } catch (err) {
    // A socket that cannot be given its mode is not served, and not left behind.
    await new Promise<void>((resolve) => app.server.close(() => resolve()));
    try {
      unlinkSync(path);
    } catch {
      // closing a listening unix server unlinks its file already
    }
    throw err;
  }
}

/**
 * Serves on a listening socket inherited from systemd (socket activation). The socket stays
 * systemd's: it is neither created nor unlinked here, so connections made while the daemon
 * restarts wait in its backlog instead of failing.
 */
export async function listenFd(app: FastifyInstance, fd: number): Promise<void> {
  await app.ready();
  await new Promise<void>((resolve, reject) => {
    app.server.once("error", reject);
    app.server.listen({ fd }, () => {
      app.server.off("error", reject);
      resolve();
    });
  });
}

/** Loopback TCP (api.tcp.listen): a port already taken is a configuration error, said plainly. */
export async function listenTcp(server: Server, host: string, port: number): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException): void => {
      reject(
        err.code === "EADDRINUSE" || err.code === "EADDRNOTAVAIL" || err.code === "EACCES"
          ? new ReaperError("SR_CONFIG_INVALID", `api.tcp.listen: cannot listen on ${host}:${port}: ${err.code}`)
          : err,
      );
    };
    server.once("error", onError);
    server.listen({ host, port, exclusive: true }, () => {
      server.off("error", onError);
      resolve();
    });
  });
}

/** Stops accepting, and ends idle keep-alive connections so close() does not wait for them. */
export function closeServer(server: Server): Promise<void> {
  return new Promise((resolve) => {
    server.close(() => resolve());
    server.closeIdleConnections();
  });
}
