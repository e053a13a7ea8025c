import type { Socket } from "node:net";
import { addon } from "../native/addon.js";

/**
 * Who is asking. On the unix socket, the kernel's record of the peer (SO_PEERCRED and
 * SO_PEERGROUPS, taken at connect(2), so a caller can neither forge it nor change it later by
 * calling setuid). On loopback TCP, a holder of the bearer token, which is an administrator's
 * credential (see SECURITY.md).
 */
export interface Caller {
  readonly via: "unix" | "tcp";
  /** The peer's uid; null on TCP, or when the credentials could not be read. */
  readonly uid: number | null;
  /** The peer's pid at connect time (for the log only: pids are reused). */
  readonly pid: number | null;
  /** Root, the daemon's own uid, a member of api.admin_group, or a TCP token holder. */
  readonly admin: boolean;
  /** False when SO_PEERCRED failed (no addon): such a caller may read but change nothing. */
  readonly known: boolean;
}

export interface AdminRule {
  /** api.admin_group; null = none. */
  readonly adminGid: number | null;
  /** The daemon's effective uid: whoever runs as the daemon's user can do what it does. */
  readonly daemonUid: number;
}

export const TCP_CALLER: Caller = Object.freeze({ via: "tcp", uid: null, pid: null, admin: true, known: true });

const UNKNOWN_CALLER: Caller = Object.freeze({ via: "unix", uid: null, pid: null, admin: false, known: false });

/** The fd of a connected unix socket (libuv's Pipe handle), or null for anything else. */
export function unixFd(socket: Socket): number | null {
  // A unix socket has no remote address; a TCP one always has.
  if (socket.remoteAddress !== undefined) return null;
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  return typeof fd === "number" && fd >= 0 ? fd : null;
}

/** Reads the peer's credentials off a unix socket connection; UNKNOWN when that fails. */
export function unixCaller(socket: Socket, rule: AdminRule): Caller {
  return fdCaller(unixFd(socket), rule);
}

/** Reads the peer's credentials off a connected unix socket's fd; UNKNOWN when that fails. */
export function fdCaller(fd: number | null, rule: AdminRule): Caller {
  if (fd === null || addon === null) return UNKNOWN_CALLER;
  let cred;
  try {
    cred = addon.peerCred(fd);
  } catch {
    return UNKNOWN_CALLER;
  }
  const admin =
    cred.uid === 0 ||
    cred.uid === rule.daemonUid ||
    (rule.adminGid !== null && (cred.gid === rule.adminGid || cred.groups.includes(rule.adminGid)));
  return Object.freeze({ via: "unix", uid: cred.uid, pid: cred.pid, admin, known: true });
}

/**
 * One lookup per connection, not per request: a keep-alive connection's peer cannot change.
 * TCP connections are entered as they are accepted (before any byte is parsed).
 */
export class Callers {
  private readonly bySocket = new WeakMap<Socket, Caller>();

  constructor(private readonly rule: AdminRule) {}

  of(socket: Socket): Caller {
    let caller = this.bySocket.get(socket);
    if (caller === undefined) {
      caller = unixCaller(socket, this.rule);
      this.bySocket.set(socket, caller);
    }
    return caller;
  }

  markTcp(socket: Socket): void {
    this.bySocket.set(socket, TCP_CALLER);
  }

  /** The caller of a connection accepted on the unix socket, read off its fd before Node made it a socket. */
  ofFd(fd: number): Caller {
    return fdCaller(fd, this.rule);
  }

  /** Enters a caller read by `ofFd` for the socket Node made of that fd. */
  enter(socket: Socket, caller: Caller): void {
    this.bySocket.set(socket, caller);
  }
}
