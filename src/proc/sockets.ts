import { readFileSync, readdirSync, readlinkSync } from "node:fs";
import { endianness } from "node:os";
import { performance } from "node:perf_hooks";
import { askShared, SharedReading } from "../pace/shared-reading.js";
import { readStat } from "./stat.js";
import { BUDGETS } from "../pace/budgets.js";

export interface TcpSocket {
  readonly family: 4 | 6;
  readonly localPort: number;
  /** LISTEN, ESTABLISHED, TIME_WAIT, … */
  readonly state: string;
  readonly inode: number;
}

/** The /proc/net table a socket was read from. */
export type InetProto = "tcp" | "tcp6" | "udp" | "udp6";
const INET_PROTOS: readonly InetProto[] = ["tcp", "tcp6", "udp", "udp6"];

/** One line of /proc/net/{tcp,tcp6,udp,udp6}. */
export interface InetSocket {
  readonly proto: InetProto;
  readonly localAddress: string;
  readonly localPort: number;
  readonly remoteAddress: string;
  readonly remotePort: number;
  /** TCP: LISTEN, ESTABLISHED, TIME_WAIT, …; UDP: CLOSE (bound) or ESTABLISHED (connected). */
  readonly state: string;
  /** 0 once no file refers to the socket any more (TIME_WAIT, FIN_WAIT2 orphans). */
  readonly inode: number;
}

/** One line of /proc/net/unix. */
export interface UnixSocket {
  readonly type: string;
  /** A filesystem path, `@name` for the abstract namespace, null when unnamed. */
  readonly path: string | null;
  readonly listening: boolean;
  readonly inode: number;
}

// include/net/tcp_states.h
const TCP_STATES: Record<string, string> = {
  "01": "ESTABLISHED",
  "02": "SYN_SENT",
  "03": "SYN_RECV",
  "04": "FIN_WAIT1",
  "05": "FIN_WAIT2",
  "06": "TIME_WAIT",
  "07": "CLOSE",
  "08": "CLOSE_WAIT",
  "09": "LAST_ACK",
  "0A": "LISTEN",
  "0B": "CLOSING",
};

// include/linux/net.h (enum sock_type)
const UNIX_TYPES: Record<string, string> = { "0001": "stream", "0002": "dgram", "0005": "seqpacket" };
/** __SO_ACCEPTCON in /proc/net/unix's Flags column: a listening socket. */
const SO_ACCEPTCON = 0x10000;

function readLines(file: string): string[] {
  try {
    return readFileSync(file, "latin1").split("\n").slice(1);
  } catch {
    return [];
  }
}

/**
 * The last reading of each network namespace's tables ("net:[4026531840] tcp"), with the
 * time its read began. Reading /proc/net/tcp makes the kernel walk its whole socket hash
 * (milliseconds on a host with thousands of sockets), and every reap step asks: a reading
 * that began after a caller's `notBefore` shows the state after whatever the caller did
 * before that moment, so it serves every caller in flight instead of one read each.
 */
interface Reading {
  /** performance.now() when the read began. */
  at: number;
  lines: string[];
  /** The inet tables' lines parsed, once, by the first caller that wanted them all. */
  parsed?: InetSocket[];
  /** The unix table's lines parsed, once, by its first caller. */
  unix?: UnixSocket[];
}
const readings = new Map<string, Reading>();

const TABLES: readonly (InetProto | "unix")[] = ["tcp", "tcp6", "udp", "udp6", "unix"];

/**
 * At most one reading of the tables per READ_EVERY_MS: the kernel's walk of a large socket
 * table takes the loop for milliseconds, and in a storm every turn has someone asking. A
 * caller waits for the next reading (never an older one), at most that long.
 */
const READ_EVERY_MS = BUDGETS.readEveryMs;

interface Asked {
  readonly pid: number | "self";
  readonly at: number;
  readonly resolve: (since: number) => void;
}

/** The shared readings of the tables (src/pace/shared-reading.ts): each namespace asked about, once. */
const tables = new SharedReading<Asked>(
  READ_EVERY_MS,
  (batch, begunAt) => {
    // Readings of namespaces nobody asked about for a while (a container gone) are dropped.
    for (const [key, r] of readings) if (begunAt - r.at > 10_000) readings.delete(key);
    const namespacesRead = new Set<string>();
    for (const a of batch) {
      const ns = netnsOf(a.pid);
      if (ns !== null && !namespacesRead.has(ns)) {
        namespacesRead.add(ns);
        const at = performance.now();
        for (const t of TABLES) readings.set(`${ns} ${t}`, { at, lines: readLines(`/proc/${a.pid}/net/${t}`) });
      }
      a.resolve(a.at);
    }
  },
  // Nothing above throws (an unreadable table reads as empty); an ask is answered anyway.
  (a) => a.resolve(a.at),
);

/**
 * Reads the network namespace's tables (tcp, tcp6, udp, udp6, unix) soon (see READ_EVERY_MS),
 * once for everyone who asked before the read began: resolves with the moment of asking, to
 * pass as `notBefore` to inetSockets, unixSockets and socketSnapshot, which then use that
 * shared reading. A storm of reaps reads each table a few times a second, not once per check.
 */
export function freshTables(pid: number | "self" = "self"): Promise<number> {
  const at = performance.now();
  return askShared<Asked, number>(tables, (resolve) => ({ pid, at, resolve }));
}

/**
 * /proc/<pid>/net/<table>: a reading begun at or after `notBefore` (performance.now() ms),
 * shared, or a fresh one (kept for others to share). Without `notBefore`, a fresh read of
 * its own.
 */
function tableReading(pid: number | "self", table: InetProto | "unix", notBefore?: number): Reading {
  const now = performance.now();
  const fresh = (): Reading => ({ at: now, lines: readLines(`/proc/${pid}/net/${table}`) });
  const ns = notBefore === undefined || notBefore > now ? null : netnsOf(pid);
  if (ns === null) return fresh();
  const key = `${ns} ${table}`;
  const last = readings.get(key);
  if (last !== undefined && last.at >= (notBefore as number)) return last;
  const reading = fresh();
  readings.set(key, reading);
  return reading;
}

function readTable(file: string, family: 4 | 6): TcpSocket[] {
  const out: TcpSocket[] = [];
  for (const line of readLines(file)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 10) continue;
    const local = f[1] ?? "";
    const port = parseInt(local.slice(local.lastIndexOf(":") + 1), 16);
    out.push({ family, localPort: port, state: TCP_STATES[f[3] ?? ""] ?? f[3] ?? "?", inode: Number(f[9]) });
  }
  return out;
}

/** The TCP sockets of the daemon's network namespace (IPv4 and IPv6). */
export function tcpSockets(): TcpSocket[] {
  return [...readTable("/proc/net/tcp", 4), ...readTable("/proc/net/tcp6", 6)];
}

// The kernel prints each 32-bit word of an address in host byte order.
const LITTLE_ENDIAN = endianness() === "LE";

function wordBytes(hex: string): number[] {
  const bytes = [0, 2, 4, 6].map((i) => parseInt(hex.slice(i, i + 2), 16));
  return LITTLE_ENDIAN ? bytes.reverse() : bytes;
}

/** "0100007F" -> "127.0.0.1"; 32 hex digits -> a compressed IPv6 address ("::1"). */
export function decodeAddress(hex: string): string {
  if (hex.length === 8) return wordBytes(hex).join(".");
  const bytes: number[] = [];
  for (let i = 0; i < 32; i += 8) bytes.push(...wordBytes(hex.slice(i, i + 8)));
  if (bytes.slice(0, 10).every((b) => b === 0) && bytes[10] === 0xff && bytes[11] === 0xff) {
    return `::ffff:${bytes.slice(12).join(".")}`;
  }
  const groups: number[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(((bytes[i] ?? 0) << 8) | (bytes[i + 1] ?? 0));
  // RFC 5952: the longest run (of two or more) of zero groups becomes "::".
  let best = { at: -1, len: 1 };
  for (let i = 0; i < 8;) {
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > best.len) best = { at: i, len: j - i };
    i = j === i ? i + 1 : j;
  }
  const hexes = groups.map((g) => g.toString(16));
  if (best.at < 0) return hexes.join(":");
  return `${hexes.slice(0, best.at).join(":")}::${hexes.slice(best.at + best.len).join(":")}`;
}

function splitEndpoint(field: string): [string, number] {
  const colon = field.lastIndexOf(":");
  return [decodeAddress(field.slice(0, colon)), parseInt(field.slice(colon + 1), 16)];
}

/**
 * The local port of a /proc/net/{tcp,tcp6,udp,udp6} line, read without splitting the line:
 * "  sl: LOCAL:PORT REMOTE:PORT st …", the first ':' ends `sl`, the second ends the local
 * address, and the port is 4 hex digits. NaN for anything else.
 */
function localPortOf(line: string): number {
  const first = line.indexOf(":");
  const second = first < 0 ? -1 : line.indexOf(":", first + 1);
  if (second < 0 || line.charCodeAt(second + 5) !== 0x20) return Number.NaN;
  return parseInt(line.slice(second + 1, second + 5), 16);
}

function parseInetLine(proto: InetProto, line: string): InetSocket | null {
  const f = line.trim().split(/\s+/);
  if (f.length < 10) return null;
  const [localAddress, localPort] = splitEndpoint(f[1] ?? "");
  const [remoteAddress, remotePort] = splitEndpoint(f[2] ?? "");
  const state = TCP_STATES[f[3] ?? ""] ?? f[3] ?? "?";
  return { proto, localAddress, localPort, remoteAddress, remotePort, state, inode: Number(f[9]) };
}

/** One table's sockets; with `ports`, only those on these local ports (other lines are not parsed). */
function inetTable(
  pid: number | "self",
  proto: InetProto,
  ports?: ReadonlySet<number>,
  notBefore?: number,
): InetSocket[] {
  const reading = tableReading(pid, proto, notBefore);
  if (ports === undefined) {
    // A whole reading is parsed once, for every reap that shares it.
    reading.parsed ??= reading.lines.map((l) => parseInetLine(proto, l)).filter((x): x is InetSocket => x !== null);
    return reading.parsed;
  }
  const out: InetSocket[] = [];
  for (const line of reading.lines) {
    if (ports !== undefined) {
      const port = localPortOf(line);
      // A line whose port cannot be read this way is parsed in full, as without a filter.
      if (!Number.isNaN(port) && !ports.has(port)) continue;
    }
    const s = parseInetLine(proto, line);
    if (s !== null && (ports === undefined || ports.has(s.localPort))) out.push(s);
  }
  return out;
}

/**
 * The TCP and UDP sockets of a network namespace: the one `pid` lives in, or the daemon's
 * (`"self"`). Reading through a pid matters for engines in a container's namespace. With
 * `ports`, only the sockets on these local ports: a host with thousands of sockets is then
 * read, not parsed. With `notBefore`, a reading begun at or after that moment may be shared
 * (see `tableLines`); without, the tables are read now.
 */
export function inetSockets(
  pid: number | "self" = "self",
  ports?: ReadonlySet<number>,
  notBefore?: number,
): InetSocket[] {
  const out: InetSocket[] = [];
  for (const proto of INET_PROTOS) out.push(...inetTable(pid, proto, ports, notBefore));
  return out;
}

/** The unix sockets of a network namespace (see `inetSockets`). */
export function unixSockets(pid: number | "self" = "self", notBefore?: number): readonly UnixSocket[] {
  const reading = tableReading(pid, "unix", notBefore);
  // Parsed once per reading, for every reap that shares it.
  reading.unix ??= reading.lines.flatMap((line) => {
    const f = line.trim().split(/\s+/);
    if (f.length < 7) return [];
    const path = f.length > 7 ? f.slice(7).join(" ") : null;
    return [
      {
        type: UNIX_TYPES[f[4] ?? ""] ?? f[4] ?? "?",
        path,
        listening: (parseInt(f[3] ?? "0", 16) & SO_ACCEPTCON) !== 0,
        inode: Number(f[6]),
      },
    ];
  });
  return reading.unix;
}

/** The network namespace a process lives in (`net:[4026531840]`), null if it is gone. */
export function netnsOf(pid: number | "self"): string | null {
  try {
    return readlinkSync(`/proc/${pid}/ns/net`);
  } catch {
    return null;
  }
}

/** Socket inodes held open by a process (empty if it is gone or unreadable). */
export function socketInodes(pid: number): Set<number> {
  const out = new Set<number>();
  let fds: string[];
  try {
    fds = readdirSync(`/proc/${pid}/fd`);
  } catch {
    return out;
  }
  for (const fd of fds) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (m) out.add(Number(m[1]));
    } catch {
      // the fd closed while we looked
    }
  }
  return out;
}

/** Socket inode -> the given pids that hold it. */
function inodeHolders(pids: readonly number[]): Map<number, number[]> {
  const out = new Map<number, number[]>();
  for (const pid of pids) {
    for (const inode of socketInodes(pid)) {
      const list = out.get(inode);
      if (list) list.push(pid);
      else out.set(inode, [pid]);
    }
  }
  return out;
}

/** One pid per network namespace among `pids`, to read that namespace's tables through. */
function namespaces(pids: readonly number[]): Map<string, number> {
  const out = new Map<string, number>();
  for (const pid of pids) {
    const ns = netnsOf(pid);
    if (ns !== null && !out.has(ns)) out.set(ns, pid);
  }
  return out;
}

/**
 * Ports on which `pids` hold a TCP LISTEN socket or a bound UDP socket, with the protocols
 * (tcp, tcp6, udp, udp6) of each. One read of each process's fd table and of each network
 * namespace's tables: what registration checks the declared ports against.
 */
export function portsHeldBy(pids: readonly number[]): Map<number, Set<InetProto>> {
  const holders = inodeHolders(pids);
  const out = new Map<number, Set<InetProto>>();
  if (holders.size === 0) return out;
  for (const pid of namespaces(pids).values()) {
    for (const s of inetSockets(pid)) {
      const bound = s.proto.startsWith("udp") || s.state === "LISTEN";
      if (!bound || !holders.has(s.inode)) continue;
      const set = out.get(s.localPort);
      if (set) set.add(s.proto);
      else out.set(s.localPort, new Set([s.proto]));
    }
  }
  return out;
}

/**
 * Which of `ports` the processes `pids` hold as a TCP LISTEN or a bound UDP socket (what
 * `portsHeldBy` would list, for these ports only): each process's fd table, then each network
 * namespace's tables, filtered by port before parsing, and no further table once every port
 * is found. What registration checks the declared ports against. With `notBefore`, a table
 * reading begun at or after that moment may be shared (see `freshTables`).
 */
export function heldOf(pids: readonly number[], ports: ReadonlySet<number>, notBefore?: number): Set<number> {
  const found = new Set<number>();
  if (ports.size === 0) return found;
  const holders = inodeHolders(pids);
  if (holders.size === 0) return found;
  for (const pid of namespaces(pids).values()) {
    for (const proto of INET_PROTOS) {
      for (const s of inetTable(pid, proto, ports, notBefore)) {
        const bound = s.proto.startsWith("udp") || s.state === "LISTEN";
        if (bound && holders.has(s.inode)) found.add(s.localPort);
      }
      if (found.size === ports.size) return found;
    }
  }
  return found;
}

/** "127.0.0.1:80", "[::1]:80". */
export const endpoint = (address: string, port: number): string =>
  address.includes(":") ? `[${address}]:${port}` : `${address}:${port}`;

export interface ListeningSocket {
  readonly proto: InetProto;
  readonly address: string;
  readonly port: number;
  readonly inode: number;
  /** The snapshotted processes that held it. */
  readonly pids: number[];
}

export interface ConnectedSocket {
  readonly proto: InetProto;
  readonly state: string;
  readonly local: string;
  readonly localPort: number;
  readonly remote: string;
  readonly inode: number;
  readonly pids: number[];
}

export interface UnixSocketHeld extends UnixSocket {
  readonly pids: number[];
}

/** What an engine's process tree held just before it was asked to go (journaled). */
export interface SocketSnapshot {
  /** Network namespaces the tables were read in; verification can only read the daemon's. */
  readonly netns: string[];
  /** Sockets that hold a local port without a peer: TCP LISTEN, bound UDP (and bound TCP not yet listening). */
  readonly listening: ListeningSocket[];
  /** Sockets with a peer: TCP connections in any state, connected UDP sockets. */
  readonly established: ConnectedSocket[];
  readonly unix: UnixSocketHeld[];
  /** See `ancestorsOf`: a socket still open in one of these after the reap was shared, not leaked. */
  readonly ancestors: { pid: number; startTime: number }[];
  /** Sockets left out of a list above its cap, per list (absent when nothing was left out). */
  readonly omitted?: { listening: number; established: number; unix: number };
}

/** Keeps a snapshot, journaled in SQLite and written in an audit line, bounded. */
export const SNAPSHOT_LIMIT = 1000;

/**
 * The sockets held by `pids` (an engine's process tree): each process's /proc/<pid>/fd
 * gives socket inodes, each network namespace's /proc/<pid>/net/{tcp,tcp6,udp,udp6,unix}
 * says what they are. Taken before termination, so that afterwards each can be verified gone.
 */
export function socketSnapshot(pids: readonly number[], notBefore?: number): SocketSnapshot {
  const holders = inodeHolders(pids);
  const ns = namespaces(pids);
  const listening: ListeningSocket[] = [];
  const established: ConnectedSocket[] = [];
  const unix: UnixSocketHeld[] = [];
  if (holders.size > 0) {
    for (const pid of ns.values()) {
      for (const s of inetSockets(pid, undefined, notBefore)) {
        const held = holders.get(s.inode);
        if (held === undefined) continue;
        if (s.remotePort === 0) {
          listening.push({ proto: s.proto, address: s.localAddress, port: s.localPort, inode: s.inode, pids: held });
        } else {
          established.push({
            proto: s.proto,
            state: s.state,
            local: endpoint(s.localAddress, s.localPort),
            localPort: s.localPort,
            remote: endpoint(s.remoteAddress, s.remotePort),
            inode: s.inode,
            pids: held,
          });
        }
      }
      for (const s of unixSockets(pid, notBefore)) {
        const held = holders.get(s.inode);
        if (held !== undefined) unix.push({ ...s, pids: held });
      }
    }
  }
  const over = (list: unknown[]): number => Math.max(0, list.length - SNAPSHOT_LIMIT);
  const omitted = { listening: over(listening), established: over(established), unix: over(unix) };
  return {
    netns: [...ns.keys()],
    listening: listening.slice(0, SNAPSHOT_LIMIT),
    established: established.slice(0, SNAPSHOT_LIMIT),
    unix: unix.slice(0, SNAPSHOT_LIMIT),
    ancestors: ancestorsOf(pids),
    ...(omitted.listening + omitted.established + omitted.unix > 0 ? { omitted } : {}),
  };
}

/**
 * The ancestors of `pids` outside them (parent chains up to pid 1), with their start times:
 * the processes a socket may have been inherited from (a launcher's stdout, a listening
 * socket passed by systemd socket activation), which then stays open after the session ends.
 */
export function ancestorsOf(pids: readonly number[]): { pid: number; startTime: number }[] {
  const inside = new Set(pids);
  const out = new Map<number, number>();
  for (const pid of pids) {
    let ppid = readStat(pid)?.ppid ?? 0;
    while (ppid > 0 && !inside.has(ppid) && !out.has(ppid)) {
      const st = readStat(ppid);
      if (st === null) break;
      out.set(ppid, st.startTime);
      ppid = st.ppid;
    }
  }
  return [...out].map(([pid, startTime]) => ({ pid, startTime }));
}
