import type { IncomingMessage, Server, ServerResponse } from "node:http";
import type { Socket } from "node:net";
import type { Logger } from "pino";
import type { Caller, Callers } from "../auth/caller.js";
import type { Clock } from "../clock.js";
import type { Metrics } from "../metrics/metrics.js";

/** At most one log line per this many ms for each uid, limit and action. */
const LOG_EVERY_MS = 60_000;
/**
 * A uid at its limit makes room only by closing one of its connections idle for this long: a
 * peer reopening every connection closed then finds its others fresh, and its reconnections
 * are refused at accept (cheap) instead of each closing another (a socket and a parser each).
 */
export const EVICT_IDLE_MS = 1000;

/** Which limit turned a connection away, or made room for it. */
export type ConnectionLimit = "uid" | "total";

export interface ConnectionLimitsOptions {
  /** api.max_connections: connections of non-admin peers open at once. */
  readonly total: number;
  /** api.max_connections_per_uid: connections one non-admin uid holds open at once. */
  readonly perUid: number;
  readonly callers: Callers;
  readonly metrics: Pick<Metrics, "connectionRefused" | "connectionEvicted">;
  readonly log: Logger;
  readonly clock: Clock;
  /**
   * A connection was turned away although its uid was within its limit: every slot was held
   * by a busy connection, so a heartbeat may have been kept out (src/detect/crowd.ts).
   */
  readonly crowded: () => void;
}

/** The connections of one peer uid (null: SO_PEERCRED could not be read), least recently used first. */
interface Peer {
  readonly uid: number | null;
  readonly connections: Map<Socket, Connection>;
}

interface Connection {
  readonly peer: Peer;
  /** Requests read whose answer is not finished: a busy connection is never closed to make room. */
  inFlight: number;
  /** Monotonic ms of its accept or of its last answer. */
  usedAt: number;
}

/** The listening handle (Node's Pipe wrap) and an accepted connection's, as net.Server's onconnection sees them. */
interface ListenHandle {
  onconnection?: (this: unknown, err: number, client?: AcceptedHandle) => unknown;
}
interface AcceptedHandle {
  readonly fd?: number;
  close(): void;
}

const CONNECTION = Symbol("session-reaper.connection");
type Tracked = Socket & { [CONNECTION]?: Connection };

/**
 * Connection limits per peer uid on the unix socket, applied at accept, before a byte is
 * parsed: the peer's uid is read from the kernel (SO_PEERCRED, src/auth/caller.ts) as the
 * connection is accepted. Without them one local user holding idle connections (and
 * reopening each one closed) took every slot, and every other user's heartbeats were
 * refused until their sessions expired.
 *
 * - Root, the daemon's own uid and admins are never turned away, nor counted.
 * - One non-admin uid holds at most `perUid` connections: at the limit, its own least
 *   recently used connection idle for EVICT_IDLE_MS is closed to make room (as an idle
 *   keep-alive connection would be: clients reconnect); without one, the new connection is
 *   closed at once. Either way only that uid pays for its crowd.
 * - Non-admin connections together hold at most `total`: when full, the least recently used
 *   idle connection of the uid holding the most is closed; only when every one is busy with
 *   a request is the new one closed at once, and that refusal is `crowded` (it may have kept
 *   a heartbeat out, so the daemon does not count the time against heartbeat timeouts).
 *
 * A refusal is decided on the accepted handle, before Node makes a socket of it (the hook
 * where Node's own maxConnections check sits), so a peer reconnecting in a loop costs an
 * accept, a getsockopt and a close. Closes and refusals are counted
 * (session_reaper_connections_evicted_total, session_reaper_connections_refused_total) and
 * logged at most once a minute per uid, limit and action.
 */
export class ConnectionLimits {
  private readonly peers = new Map<number | null, Peer>();
  private users = 0;
  private admins = 0;
  private readonly logged = new Map<string, number>();
  /** The caller read off the handle being accepted, for the 'connection' event Node emits within the same call. */
  private screened: Caller | null = null;

  constructor(private readonly opts: ConnectionLimitsOptions) {}

  /** Connections open now, by kind of peer. */
  get open(): { admin: number; user: number } {
    return { admin: this.admins, user: this.users };
  }

  /**
   * Puts the limits in front of the HTTP server's own connection handling: a connection
   * turned away never reaches it (no socket where the accept hook is found, no parser, no
   * timers). Requests are followed to know which connections are busy.
   */
  attach(server: Server): void {
    const handlers = server.listeners("connection") as ((socket: Socket) => void)[];
    server.removeAllListeners("connection");
    server.on("connection", (socket: Socket) => {
      const caller = this.screened ?? this.opts.callers.of(socket);
      this.screened = null;
      if (!this.admit(socket, caller)) return;
      for (const handler of handlers) handler.call(server, socket);
    });
    server.prependListener("request", (req: IncomingMessage, res: ServerResponse) => {
      const c = (req.socket as Tracked)[CONNECTION];
      if (c === undefined) return;
      c.inFlight++;
      res.once("close", () => this.answered(req.socket, c));
    });
    server.on("listening", () => this.screenAccepts(server));
  }

  /**
   * Wraps the listening handle's onconnection (net.Server's accept callback): a connection
   * to refuse is closed there, before a socket is made of it. Where Node has no such hook,
   * the 'connection' listener decides alone, on a socket.
   */
  private screenAccepts(server: Server): void {
    const handle = (server as unknown as { _handle?: ListenHandle | null })._handle;
    const accept = handle?.onconnection;
    if (handle === undefined || handle === null || typeof accept !== "function") return;
    handle.onconnection = (err, client) => {
      if (err === 0 && client !== undefined && this.screen(client)) return;
      try {
        return accept.call(handle, err, client);
      } finally {
        this.screened = null;
      }
    };
  }

  /**
   * Closes an accepted handle its peer may not have (true), or keeps its caller for the
   * 'connection' event that follows. Runs in libuv's accept callback, so it never throws:
   * whatever fails leaves the decision to the 'connection' listener.
   */
  private screen(client: AcceptedHandle): boolean {
    try {
      const fd = client.fd;
      if (typeof fd !== "number" || fd < 0) return false;
      const caller = this.opts.callers.ofFd(fd);
      const peer = this.peers.get(caller.uid);
      const refused = caller.admin ? null : this.refusal(peer);
      if (refused === null) {
        this.screened = caller;
        return false;
      }
      client.close();
      this.refused(peer ?? { uid: caller.uid, connections: new Map() }, refused);
      return true;
    } catch (err) {
      this.opts.log.error({ err }, "a connection could not be screened at accept: it is judged as a socket");
      return false;
    }
  }

  /** Which limit refuses a new connection of this peer (no room can be made), or null. */
  private refusal(peer: Peer | undefined): ConnectionLimit | null {
    const now = this.opts.clock.mono();
    if (peer !== undefined && peer.connections.size >= this.opts.perUid) {
      return this.idleOf(peer, now - EVICT_IDLE_MS) === null ? "uid" : null;
    }
    if (this.users >= this.opts.total && this.largestWithIdle() === null) return "total";
    return null;
  }

  private admit(socket: Socket, caller: Caller): boolean {
    this.opts.callers.enter(socket, caller);
    if (caller.admin) {
      this.admins++;
      socket.once("close", () => this.admins--);
      return true;
    }
    const uid = caller.uid;
    const existing = this.peers.get(uid);
    const refused = this.refusal(existing);
    const peer = existing ?? { uid, connections: new Map<Socket, Connection>() };
    if (refused !== null) {
      socket.destroy();
      this.refused(peer, refused);
      return false;
    }
    const now = this.opts.clock.mono();
    if (peer.connections.size >= this.opts.perUid) {
      this.close(peer, this.idleOf(peer, now - EVICT_IDLE_MS) as Socket);
      this.tell(peer, "uid", "evicted");
    } else if (this.users >= this.opts.total) {
      const victim = this.largestWithIdle() as Peer;
      this.close(victim, this.idleOf(victim, Number.POSITIVE_INFINITY) as Socket);
      this.tell(victim, "total", "evicted");
    }
    if (existing === undefined) this.peers.set(uid, peer);
    const c: Connection = { peer, inFlight: 0, usedAt: now };
    (socket as Tracked)[CONNECTION] = c;
    peer.connections.set(socket, c);
    this.users++;
    socket.once("close", () => this.forget(socket, c));
    return true;
  }

  private refused(peer: Peer, limit: ConnectionLimit): void {
    this.tell(peer, limit, "refused");
    if (limit === "total") this.opts.crowded();
  }

  /**
   * A connection answered without a request event (the heartbeat lane answers in the same
   * turn as it reads, so nothing is ever in flight there): the most recently used.
   */
  used(socket: Socket): void {
    const c = (socket as Tracked)[CONNECTION];
    if (c !== undefined) this.touch(socket, c);
  }

  /** A request's answer is finished (or its connection closed): the connection is the most recently used. */
  private answered(socket: Socket, c: Connection): void {
    c.inFlight--;
    this.touch(socket, c);
  }

  private touch(socket: Socket, c: Connection): void {
    c.usedAt = this.opts.clock.mono();
    const connections = c.peer.connections;
    if (connections.get(socket) !== c) return;
    connections.delete(socket);
    connections.set(socket, c);
  }

  private forget(socket: Socket, c: Connection): void {
    if (c.peer.connections.get(socket) !== c) return; // closed to make room: already forgotten
    c.peer.connections.delete(socket);
    this.users--;
    if (c.peer.connections.size === 0 && this.peers.get(c.peer.uid) === c.peer) this.peers.delete(c.peer.uid);
  }

  /** The peer's least recently used idle connection last used no later than `before`, or null. */
  private idleOf(peer: Peer, before: number): Socket | null {
    for (const [socket, c] of peer.connections) {
      if (c.inFlight > 0) continue;
      return c.usedAt <= before ? socket : null; // the least recently used idle one is the oldest
    }
    return null;
  }

  private close(peer: Peer, socket: Socket): void {
    peer.connections.delete(socket);
    this.users--;
    socket.destroy();
  }

  /** The peer holding the most connections that has an idle one, or null. */
  private largestWithIdle(): Peer | null {
    let best: Peer | null = null;
    for (const peer of this.peers.values()) {
      if (best !== null && peer.connections.size <= best.connections.size) continue;
      if (this.idleOf(peer, Number.POSITIVE_INFINITY) !== null) best = peer;
    }
    return best;
  }

  private tell(peer: Peer, limit: ConnectionLimit, action: "refused" | "evicted"): void {
    const { metrics, clock, log } = this.opts;
    if (action === "refused") metrics.connectionRefused(limit);
    else metrics.connectionEvicted(limit);
    const key = `${action}:${limit}:${peer.uid}`;
    const now = clock.mono();
    if (now - (this.logged.get(key) ?? Number.NEGATIVE_INFINITY) < LOG_EVERY_MS) return;
    this.logged.set(key, now);
    const what = {
      "evicted:uid":
        "a uid at its connection limit connected again: its least recently used idle connection was closed",
      "refused:uid":
        "a uid at its connection limit connected again, none of its connections idle for a second: the new one was closed",
      "evicted:total":
        "the socket's connections are all taken: the least recently used idle connection of the uid holding the most was closed",
      "refused:total":
        "the socket's connections are all taken and busy: a connection was closed at accept (heartbeat timeouts do not count this time)",
    }[`${action}:${limit}` as const];
    log.warn(
      {
        uid: peer.uid,
        held: peer.connections.size,
        limit: limit === "uid" ? this.opts.perUid : this.opts.total,
        users: this.users,
        admins: this.admins,
      },
      `${what} (logged at most once a minute per uid)`,
    );
  }
}
