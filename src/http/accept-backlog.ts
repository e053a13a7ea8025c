import { closeSync } from "node:fs";
import type { Server } from "node:net";
import type { Logger } from "pino";

/**
 * Connections taken from the listen backlog per turn of the event loop beside the one libuv
 * accepted. libuv (1.45+, Node 20) accepts a single connection per turn: during a reap storm a
 * turn lasts 10-20 ms, so new connections (a shell's curl, a client without a kept
 * connection) were accepted at 50-100 a second and waited in the backlog, up to a second
 * each (docs/benchmarks.md, figure 7). 32 a turn, at ~0.3 ms each.
 */
export const ACCEPTS_PER_TURN = 32;

/** The connections waiting in a listening socket's backlog, up to `max` (the addon's accept4 loop). */
export type AcceptPending = (listenFd: number, max: number) => number[];

/** A handle as net.Server's onconnection sees it: the listening one, an accepted one. */
interface Handle {
  readonly fd?: number;
  onconnection?: (this: unknown, err: number, client?: Handle) => unknown;
  close(): void;
}
/** The accepted handle's class (Node's Pipe or TCP wrap): a handle made of an fd accepted here. */
type HandleClass = new (type: number) => Handle & { open(fd: number): number };
/** Pipe and TCP wraps' type for a connected socket (PipeConstants.SOCKET, TCPConstants.SOCKET). */
const SOCKET = 0;

/**
 * Once `server` listens, each connection libuv accepts is followed, in the same turn, by the
 * rest of the backlog (up to ACCEPTS_PER_TURN): each fd is made a handle of the class libuv's
 * accept gave and handed to the same accept callback, so it is screened (connection limits),
 * counted and served exactly as libuv's would be. Attach after anything that wraps the
 * listening handle's callback (src/http/connection-limits.ts): this wrapper must be outermost.
 * Without the addon, or a handle that cannot be made so, libuv's one connection a turn stays.
 */
export function acceptBacklog(server: Server, pending: AcceptPending | undefined, log: Logger): void {
  if (pending === undefined) return;
  server.on("listening", () => {
    const listen = (server as unknown as { _handle?: Handle | null })._handle;
    const accept = listen?.onconnection;
    if (listen === undefined || listen === null || typeof accept !== "function") return;
    listen.onconnection = (err, client) => {
      const out = accept.call(listen, err, client);
      if (err === 0 && client !== undefined) drain(listen, client, accept, pending, log);
      return out;
    };
  });
}

function drain(
  listen: Handle,
  first: Handle,
  accept: NonNullable<Handle["onconnection"]>,
  pending: AcceptPending,
  log: Logger,
): void {
  const fd = listen.fd;
  const Made = first.constructor as HandleClass | undefined;
  const proto = (Made as { prototype?: { open?: unknown } } | undefined)?.prototype;
  if (typeof fd !== "number" || fd < 0 || typeof Made !== "function" || typeof proto?.open !== "function") return;
  let fds: number[];
  try {
    fds = pending(fd, ACCEPTS_PER_TURN);
  } catch (err) {
    log.error({ err }, "the listening socket's backlog could not be read: one connection a turn");
    return;
  }
  let next = 0;
  try {
    for (; next < fds.length; next++) {
      const c = fds[next] as number;
      let client: InstanceType<HandleClass> | undefined;
      try {
        client = new Made(SOCKET);
        const failed = client.open(c);
        if (failed !== 0) throw new Error(`open: ${failed}`);
      } catch (err) {
        client?.close(); // a handle whose open() failed does not own the fd: closed here
        closeQuietly(c);
        log.error({ err }, "a connection accepted from the backlog could not be opened: it was closed");
        continue;
      }
      accept.call(listen, 0, client);
    }
  } finally {
    // An accept callback that threw leaves the rest unhanded: closed, never leaked.
    for (next++; next < fds.length; next++) closeQuietly(fds[next] as number);
  }
}

/** Closes an fd accepted here and not handed on. */
function closeQuietly(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    // closed already
  }
}
