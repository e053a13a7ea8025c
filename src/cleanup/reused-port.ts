import { readFileSync } from "node:fs";
import { SESSION_COOKIE, processKey } from "../model/session.js";
import type { InetSocket } from "../proc/sockets.js";
import { journaled, type Journal } from "./journal.js";
import type { SessionMembers } from "./step.js";

/**
 * A port number is not an identity. On a busy host an ephemeral port the engine released is
 * soon handed by the kernel to the next program that binds port 0 (or connects out); a
 * registered port held at verification by such a newcomer is not something of the session
 * left behind, and calling the session `partial` for it (or, worse, signalling the newcomer)
 * would be wrong. The newcomer is told apart by identity, and only when every one of these
 * holds:
 *
 * - the port is in the kernel's ephemeral range (ip_local_port_range): a number the kernel
 *   hands out again by itself, not a fixed port a service of the engine's might take up
 *   again;
 * - lineage saw every fork of the engine (`complete`, read after its queue was drained), and
 *   the holder is none of the session's processes it or the journal knows, nor carries the
 *   session's cookie;
 * - every socket it holds on the port is new: none was on the port when close-environment
 *   took its snapshot (whoever held it then), so none is the engine's own or one that shared
 *   the port with it all along;
 * - and each is bound where the engine's own socket on that port was (the same address, or a
 *   wildcard on either side): a place no other process could bind while the engine held it,
 *   so it was taken after the engine let go. A listener on another address of the same port
 *   number (127.0.0.2 beside the engine's 127.0.0.1) is an outsider that may have been there
 *   all along: a leftover, never touched, as before.
 *
 * Anything less (no lineage, no snapshot or a capped one, a fixed port, an older journal)
 * keeps the holder a leftover.
 */
export interface ReuseEvidence {
  readonly lineageComplete: boolean;
  /** The session's processes known by lineage and the journal, by processKey. */
  readonly members: ReadonlySet<string>;
  readonly cookie: string;
  /** Registered port -> the local addresses the engine's own sockets held on it at the snapshot; null: no usable snapshot. */
  readonly engineAt: ReadonlyMap<number, readonly string[]> | null;
  /** Every socket on a registered port at the snapshot, whoever held it. */
  readonly onPortsThen: ReadonlySet<number>;
  /** The kernel's ephemeral port range, or null when it cannot be read. */
  readonly ephemeral: readonly [number, number] | null;
}

export function reuseEvidence(sessionId: string, journal: Journal, lineage: SessionMembers): ReuseEvidence {
  // members() drains the kernel's queue first: complete() then speaks of every fork until now.
  const byLineage = lineage.members();
  const complete = lineage.complete();
  const close = journaled(journal, "close-environment");
  const snap = close?.sockets;
  const usable =
    typeof snap === "object" &&
    snap !== null &&
    Array.isArray(snap.listening) &&
    Array.isArray(snap.established) &&
    Array.isArray(close?.portInodes) &&
    (snap.omitted === undefined || snap.omitted.listening + snap.omitted.established === 0);
  let engineAt: Map<number, string[]> | null = null;
  if (usable) {
    engineAt = new Map();
    const at = (port: number, address: string): void => {
      const list = engineAt?.get(port);
      if (list === undefined) engineAt?.set(port, [address]);
      else list.push(address);
    };
    for (const s of snap.listening) at(s.port, s.address);
    for (const s of snap.established) at(s.localPort, addressOf(s.local));
  }
  const journaledTrees = [
    ...(journaled(journal, "fence")?.processes ?? []),
    ...(close?.processes ?? []),
    ...(journaled(journal, "terminate")?.processes ?? []),
  ];
  return {
    lineageComplete: complete,
    members: new Set([...byLineage, ...journaledTrees].map(processKey)),
    cookie: sessionId,
    engineAt,
    onPortsThen: new Set(usable ? close?.portInodes : []),
    ephemeral: ephemeralRange(),
  };
}

/**
 * Whether a process outside the session, holding `sockets` on registered port `port`, took
 * the port after the session let it go (see above): then it is reported as a reuse, not a
 * leftover.
 */
export function reusesPort(
  holder: { readonly pid: number; readonly startTime: number },
  port: number,
  sockets: readonly Pick<InetSocket, "inode" | "localAddress">[],
  e: ReuseEvidence,
): boolean {
  if (!e.lineageComplete || e.engineAt === null) return false;
  if (e.ephemeral === null || port < e.ephemeral[0] || port > e.ephemeral[1]) return false;
  if (e.members.has(processKey(holder)) || sockets.length === 0) return false;
  const engine = e.engineAt.get(port) ?? [];
  const taken = sockets.every(
    (s) => !e.onPortsThen.has(s.inode) && engine.some((address) => overlaps(address, s.localAddress)),
  );
  return taken && !carriesCookie(holder.pid, e.cookie);
}

/** The address of an endpoint as sockets.ts writes it ("127.0.0.1:5432", "[::1]:5432"). */
function addressOf(endpoint: string): string {
  const m = /^\[(.*)\]:\d+$/.exec(endpoint) ?? /^(.*):\d+$/.exec(endpoint);
  return m?.[1] ?? endpoint;
}

const WILDCARDS = new Set(["0.0.0.0", "::"]);

/** Two local addresses that cannot both be bound on one port at once (barring SO_REUSEPORT). */
function overlaps(a: string, b: string): boolean {
  return a === b || WILDCARDS.has(a) || WILDCARDS.has(b) || a === `::ffff:${b}` || b === `::ffff:${a}`;
}

/** Whether the process's environment has REAPER_SESSION_ID=<cookie> (unreadable: assume it does). */
function carriesCookie(pid: number, cookie: string): boolean {
  let env: Buffer;
  try {
    env = readFileSync(`/proc/${pid}/environ`);
  } catch {
    return true;
  }
  const needle = Buffer.from(`${SESSION_COOKIE}=${cookie}\0`);
  for (let i = env.indexOf(needle); i >= 0; i = env.indexOf(needle, i + 1))
    if (i === 0 || env[i - 1] === 0) return true;
  return false;
}

/** /proc/sys/net/ipv4/ip_local_port_range (it covers IPv6 too), or null. */
function ephemeralRange(): readonly [number, number] | null {
  try {
    const [lo, hi] = readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "latin1").trim().split(/\s+/).map(Number);
    return Number.isInteger(lo) && Number.isInteger(hi) ? [lo as number, hi as number] : null;
  } catch {
    return null;
  }
}
