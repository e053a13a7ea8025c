import { addon } from "../native/addon.js";
import type { ProcessIdentity, Tracking } from "../model/session.js";
import { bootId } from "./identity.js";
import { CLOCK_TICKS, isExited, isKernelThread, listStats, readStat, readUid, ticksSinceBoot } from "./stat.js";

/**
 * Lineage: who started whom, from the kernel's process events connector (netlink CN_IDX_PROC,
 * read by the native addon on a thread of its own). A walk of /proc sees a process only if it
 * lives across a walk, and its parent only until it is re-parented (a `setsid` double fork, a
 * daemonizing server, an engine that died); the kernel reports every fork as it happens.
 *
 * The host's table: one node per live process, keyed by pid. A node is born from a fork event
 * (its parent is the forking process) or found by a walk of /proc (at open, and after events
 * were lost: its parent is then its parent *now*). A fork event for a pid replaces the node
 * that pid had (the old process exited: a recycled pid never inherits anything); an exit
 * removes the node, and its children are spliced to its parent, so the ancestry of every live
 * process stays whole through exits and re-parenting. Memory: one node (~200 bytes) per live
 * process on the host; nothing is kept for a process that exited.
 *
 * Sessions: a `Membership` per session. At registration every live descendant of the engine
 * joins it (`adopt`); from then on a fork by a member makes a member as the event is applied,
 * whatever happens to the tree afterwards (setsid, re-parenting, a move to another cgroup).
 * A member's exit is accounted (its CPU as read at the exit, unless a member reaps it: that CPU
 * reaches the reaper's cutime) and it leaves the table.
 *
 * Lost events are never silent: an overrun of the kernel's socket buffer (ENOBUFS) or of the
 * addon's is counted, every membership of the moment is marked incomplete, and the table is
 * mended from a walk of /proc (a process born and re-parented within the lost window can only
 * be found by other means: the cgroup, the cookie).
 */

/** Whether lineage events are read on this host, and why not. */
export type LineageStatus =
  { readonly available: true; readonly since: number } | { readonly available: false; readonly why: string };

interface LineageNode {
  readonly pid: number;
  /** /proc start time (clock ticks after boot); -1 if it could not be read. */
  startTime: number;
  parent: LineageNode | null;
  children: Set<LineageNode> | null;
  /** Born from a fork event the table applied (false: found by a walk of /proc). */
  forked: boolean;
  /** The table's loss epoch at its birth: a loss since means its descendants may be unknown. */
  epoch: number;
  /** The memberships it belongs to (copy on write; shared by the children it forks). */
  groups: readonly Membership[];
  /**
   * `groups` is this node's alone (no child shares it): a join appends in place. Without it a
   * join copied the array, and an engine shared by K sessions cost O(K) a join: O(K²) to
   * recover them (100,000 sessions on a few engines took 30 s to READY and 500 MB).
   */
  ownGroups?: boolean;
  /** Its uid, read the first time it is asked for as an identity. */
  uid?: number;
}

const NO_GROUPS: readonly Membership[] = Object.freeze([]);

/** What the kernel reports: see src/native/reaper_native.c, "process events". */
const FIELDS = 5;
const FORK = 1;
const EXIT = 2;

/** The members of one session, by lineage. */
export class Membership {
  /**
   * Live members, by node: most sessions' engines fork nothing the daemon ever sees, so one
   * member is held in a field and a set made only for a second (100,000 sessions: 21 MB less).
   */
  private one: LineageNode | null = null;
  private many: Set<LineageNode> | null = null;
  /**
   * Every fork of the engine's lineage since its birth was seen (the connector was open before
   * the engine started, and nothing was lost since). False: lineage is a help, not the proof.
   */
  complete: boolean;
  /** CPU (clock ticks) of members that exited and were reaped by a non-member (see `exited`). */
  exitedCpuTicks = 0;
  /** Members that exited whose CPU could not be read (reaped before the read). */
  exitsUnread = 0;
  /** Members that joined over the session's life. */
  joined = 0;
  /** It was complete until events were lost (the daemon is told once: `SessionLineage`). */
  fellBack = false;
  released = false;

  constructor(
    readonly sessionId: string,
    complete: boolean,
  ) {
    this.complete = complete;
  }

  /** The live members as identities (uid read now; a member gone meanwhile is left out). */
  identities(): ProcessIdentity[] {
    const boot = bootId();
    const out: ProcessIdentity[] = [];
    for (const n of this.nodes()) {
      if (n.startTime < 0) continue;
      n.uid ??= readUid(n.pid) ?? undefined;
      if (n.uid !== undefined) out.push({ pid: n.pid, startTime: n.startTime, bootId: boot, uid: n.uid });
    }
    return out;
  }

  has(n: LineageNode): boolean {
    return this.one === n || (this.many !== null && this.many.has(n));
  }

  add(n: LineageNode): void {
    if (this.one === null && this.many === null) this.one = n;
    else if (this.one !== n) {
      this.many ??= new Set(this.one === null ? [] : [this.one]);
      this.one = null;
      this.many.add(n);
    }
  }

  delete(n: LineageNode): void {
    if (this.one === n) this.one = null;
    else this.many?.delete(n);
  }

  /** The live members' nodes, a copy (the caller may change the membership while it reads). */
  nodes(): LineageNode[] {
    return this.one !== null ? [this.one] : this.many === null ? [] : [...this.many];
  }

  clear(): void {
    this.one = null;
    this.many = null;
  }

  /** CPU seconds of the members that exited (reaped outside the session). */
  get exitedCpuSec(): number {
    return this.exitedCpuTicks / CLOCK_TICKS;
  }
}

/** Counters for the metrics, the daemon's status and the benchmark. */
export interface LineageCounters {
  readonly events: number;
  readonly forks: number;
  readonly exits: number;
  /** Events the kernel or the addon could not deliver (ENOBUFS, a full buffer). */
  readonly lost: number;
  /** Times the table was mended from a walk after a loss. */
  readonly resyncs: number;
  readonly processes: number;
}

/**
 * The host's lineage table: one per daemon process, shared by every daemon in it (tests run
 * several), opened by the first and closed by the last.
 */
class HostLineage {
  private readonly byPid = new Map<number, LineageNode>();
  private users = 0;
  private epoch = 0;
  private statusValue: LineageStatus = { available: false, why: "not opened" };
  private lostSeen = 0;
  private counts = { forks: 0, exits: 0, resyncs: 0, events: 0 };
  private readonly lossListeners = new Set<(lost: number) => void>();
  /** Every membership not yet released (marked incomplete on a loss). */
  private readonly memberships = new Set<Membership>();

  get status(): LineageStatus {
    return this.statusValue;
  }

  counters(): LineageCounters {
    return { ...this.counts, lost: this.lostSeen, processes: this.byPid.size };
  }

  /** Opens the connector on first use; every caller closes once. */
  open(): LineageStatus {
    this.users++;
    if (this.users > 1) return this.statusValue;
    if (addon === null) {
      this.statusValue = { available: false, why: "the native addon is not built" };
      return this.statusValue;
    }
    const since = ticksSinceBoot() ?? 0;
    try {
      addon.procEventsOpen(() => this.sync(false));
    } catch (err) {
      this.statusValue = { available: false, why: connectorError(err) };
      return this.statusValue;
    }
    // Events buffer in the addon meanwhile: the walk first, then the events, in order.
    this.seed();
    this.statusValue = { available: true, since };
    this.sync(false);
    return this.statusValue;
  }

  close(): void {
    if (this.users === 0) return;
    this.users--;
    if (this.users > 0) return;
    if (this.statusValue.available) addon?.procEventsClose();
    this.statusValue = { available: false, why: "closed" };
    this.byPid.clear();
    this.memberships.clear();
  }

  onLoss(listener: (lost: number) => void): () => void {
    this.lossListeners.add(listener);
    return () => this.lossListeners.delete(listener);
  }

  /**
   * Applies what the addon read. With `flush`, first whatever the kernel queued up to now (a
   * barrier: every fork before this call is then in the table).
   */
  sync(flush = true): void {
    if (!this.statusValue.available || addon === null) return;
    const batch = addon.procEventsDrain(flush);
    const r = batch.records;
    for (let i = 0; i + FIELDS <= r.length; i += FIELDS) {
      const kind = r[i] as number;
      const pid = r[i + 1] as number;
      const parent = r[i + 2] as number;
      const start = r[i + 3] as number;
      if (kind === FORK) this.forked(pid, parent, start);
      else if (kind === EXIT) this.exited(pid, parent, start, r[i + 4] as number);
    }
    this.counts.events = batch.events;
    const lost = batch.overruns + batch.dropped;
    if (lost > this.lostSeen) {
      const n = lost - this.lostSeen;
      this.lostSeen = lost;
      this.lossSeen(n);
    }
  }

  private forked(pid: number, parentPid: number, start: number): void {
    this.counts.forks++;
    const old = this.byPid.get(pid);
    const parent = this.byPid.get(parentPid) ?? this.lazy(parentPid);
    if (old !== undefined) {
      // A node newer than the event (found by a walk after the process was born): keep it.
      if (old.startTime >= 0 && (start < 0 || start < old.startTime)) return;
      if (old.startTime === start) {
        // The same process, met by the walk before its fork event was applied: now its real parent.
        if (!old.forked && parent !== null && parent !== old) {
          old.parent?.children?.delete(old);
          old.parent = parent;
          (parent.children ??= new Set()).add(old);
          old.forked = true;
          old.epoch = this.epoch;
        }
        return;
      }
      this.drop(old);
    }
    const node: LineageNode = {
      pid,
      startTime: start,
      parent,
      children: null,
      forked: true,
      epoch: this.epoch,
      groups: parent?.groups ?? NO_GROUPS,
    };
    if (parent !== null) {
      (parent.children ??= new Set()).add(node);
      parent.ownGroups = false; // shared with the child from now on
    }
    for (const g of node.groups) {
      g.add(node);
      g.joined++;
    }
    this.byPid.set(pid, node);
  }

  private exited(pid: number, parentAtExit: number, start: number, cpuTicks: number): void {
    this.counts.exits++;
    const node = this.byPid.get(pid);
    if (node === undefined) return;
    if (start >= 0 && node.startTime >= 0 && start !== node.startTime) return; // another process's exit
    if (start < 0 && node.startTime >= 0) {
      // Not read at the exit: trusted unless the process named by the node is plainly alive.
      const st = readStat(pid);
      if (st !== null && !isExited(st) && st.startTime === node.startTime) return;
    }
    for (const g of node.groups) {
      // A member's reaper that is a live member gets its CPU in cutime: counted there.
      const reaper = parentAtExit > 0 ? this.byPid.get(parentAtExit) : undefined;
      if (reaper !== undefined && g.has(reaper)) continue;
      if (cpuTicks >= 0) g.exitedCpuTicks += cpuTicks;
      else g.exitsUnread++;
    }
    this.drop(node);
  }

  /** Removes a node: out of its memberships and the index, its children spliced to its parent. */
  private drop(node: LineageNode): void {
    for (const g of node.groups) g.delete(node);
    if (this.byPid.get(node.pid) === node) this.byPid.delete(node.pid);
    const parent = node.parent;
    parent?.children?.delete(node);
    if (node.children !== null) {
      for (const c of node.children) {
        c.parent = parent;
        if (parent !== null) (parent.children ??= new Set()).add(c);
      }
      node.children = null;
    }
    node.parent = null;
  }

  /** A node for a process the table has not met (older than the table, or born in a loss). */
  private lazy(pid: number): LineageNode | null {
    if (pid <= 0) return null;
    const st = readStat(pid);
    if (st === null || isExited(st)) return null;
    const node: LineageNode = {
      pid,
      startTime: st.startTime,
      parent: st.ppid > 0 ? (this.byPid.get(st.ppid) ?? null) : null,
      children: null,
      forked: false,
      epoch: this.epoch,
      groups: NO_GROUPS,
    };
    if (node.parent !== null) (node.parent.children ??= new Set()).add(node);
    this.byPid.set(pid, node);
    return node;
  }

  /** The table from a walk of /proc: every live process not in it yet, under its parent now. */
  private seed(): void {
    const stats = listStats().filter((s) => !isExited(s) && !isKernelThread(s));
    const fresh: { node: LineageNode; ppid: number }[] = [];
    for (const s of stats) {
      const known = this.byPid.get(s.pid);
      if (known !== undefined && known.startTime === s.startTime) continue;
      if (known !== undefined) this.drop(known);
      const node: LineageNode = {
        pid: s.pid,
        startTime: s.startTime,
        parent: null,
        children: null,
        forked: false,
        epoch: this.epoch,
        groups: NO_GROUPS,
      };
      this.byPid.set(s.pid, node);
      fresh.push({ node, ppid: s.ppid });
    }
    for (const { node, ppid } of fresh) {
      const parent = this.byPid.get(ppid) ?? null;
      if (parent === null || parent === node) continue;
      node.parent = parent;
      (parent.children ??= new Set()).add(node);
      // A newcomer under a member is a member (it was forked while events were lost).
      if (parent.groups.length > 0) {
        node.groups = parent.groups;
        parent.ownGroups = false; // shared with the child from now on
        for (const g of node.groups) {
          g.add(node);
          g.joined++;
        }
      }
    }
    // Nodes whose process is gone (its exit was lost) leave.
    const alive = new Set(stats.map((s) => s.pid));
    for (const node of [...this.byPid.values()]) if (!alive.has(node.pid)) this.drop(node);
  }

  private lossSeen(n: number): void {
    this.epoch++;
    this.counts.resyncs++;
    for (const m of this.memberships) {
      if (m.complete) m.fellBack = true;
      m.complete = false;
    }
    this.seed();
    for (const l of this.lossListeners) l(n);
  }

  /**
   * A session's membership: the engine and every live descendant by lineage. `complete` when
   * the engine was born from a fork event the table applied and nothing was lost since.
   */
  adopt(sessionId: string, engine: ProcessIdentity): Membership {
    this.sync(true);
    let node = this.byPid.get(engine.pid);
    if (node !== undefined && node.startTime < 0) {
      const st = readStat(engine.pid);
      if (st !== null && st.startTime === engine.startTime) node.startTime = st.startTime;
    }
    if (node === undefined || node.startTime !== engine.startTime) {
      node = this.lazy(engine.pid) ?? undefined;
      if (node !== undefined && node.startTime !== engine.startTime) node = undefined;
    }
    const m = new Membership(
      sessionId,
      this.statusValue.available && node !== undefined && node.forked && node.epoch === this.epoch,
    );
    this.memberships.add(m);
    if (node !== undefined) this.join(m, [node]);
    return m;
  }

  /** Adds processes found otherwise (a walk, the cookie, the cgroup), and their descendants, to a membership. */
  include(m: Membership, ids: readonly ProcessIdentity[]): void {
    if (m.released) return;
    const queue: LineageNode[] = [];
    for (const id of ids) {
      const node = this.byPid.get(id.pid);
      if (node !== undefined && node.startTime === id.startTime) queue.push(node);
    }
    this.join(m, queue);
  }

  /** These nodes and all their descendants join the membership. */
  private join(m: Membership, queue: LineageNode[]): void {
    while (queue.length > 0) {
      const n = queue.pop() as LineageNode;
      if (m.has(n)) continue;
      if (n.ownGroups === true) (n.groups as Membership[]).push(m);
      else {
        n.groups = [...n.groups, m];
        n.ownGroups = true;
      }
      m.add(n);
      m.joined++;
      if (n.children !== null) for (const c of n.children) queue.push(c);
    }
  }

  /** The session ended: its members are no longer tied to it. */
  release(m: Membership): void {
    if (m.released) return;
    m.released = true;
    this.memberships.delete(m);
    for (const n of m.nodes()) {
      n.groups = n.groups.filter((g) => g !== m);
      n.ownGroups = true;
    }
    m.clear();
  }
}

function connectorError(err: unknown): string {
  const e = err as NodeJS.ErrnoException;
  switch (e.code) {
    case "EPERM":
    case "EACCES":
      return "the process events connector needs CAP_NET_ADMIN (bind to CN_IDX_PROC was refused)";
    case "EPROTONOSUPPORT":
      return "the process events connector exists only in the initial network namespace (socket refused)";
    case "ETIMEDOUT":
      return "the kernel did not acknowledge the subscription (not the initial pid or user namespace?)";
    case "EAFNOSUPPORT":
      return "AF_NETLINK is not allowed (RestrictAddressFamilies=?)";
    default:
      return `the process events connector could not be opened: ${e.message}`;
  }
}

/** The one table of this process. */
export const hostLineage = new HostLineage();

/**
 * A daemon's view of lineage: the memberships of its sessions by id. Registration adopts,
 * terminate and the verification read, the end of the reap releases.
 */
export class SessionLineage {
  private readonly byId = new Map<string, Membership>();
  private statusValue: LineageStatus = { available: false, why: "not opened" };
  private unsubscribe: (() => void) | null = null;

  /**
   * Opens the host's table (the connector, on first use in this process). `onLoss`: events
   * were lost; `fellBack` names this daemon's sessions whose lineage was complete until then.
   */
  open(onLoss: (lost: number, fellBack: string[]) => void): LineageStatus {
    if (this.unsubscribe !== null) return this.statusValue;
    this.statusValue = hostLineage.open();
    this.unsubscribe = hostLineage.onLoss((lost) => {
      const fellBack: string[] = [];
      for (const [id, m] of this.byId) {
        if (!m.fellBack) continue;
        m.fellBack = false;
        fellBack.push(id);
      }
      onLoss(lost, fellBack);
    });
    return this.statusValue;
  }

  get status(): LineageStatus {
    return this.statusValue;
  }

  counters(): LineageCounters {
    return hostLineage.counters();
  }

  /** A new session's membership (replacing one of the same id: a registration retried). */
  adopt(sessionId: string, engine: ProcessIdentity): Membership {
    const old = this.byId.get(sessionId);
    if (old !== undefined) hostLineage.release(old);
    const m = hostLineage.adopt(sessionId, engine);
    this.byId.set(sessionId, m);
    return m;
  }

  get(sessionId: string): Membership | undefined {
    return this.byId.get(sessionId);
  }

  /**
   * The session's live members now, after every event the kernel queued before this call.
   * A session recovered after a restart has none until it is adopted again.
   */
  members(sessionId: string): ProcessIdentity[] {
    const m = this.byId.get(sessionId);
    if (m === undefined) return [];
    hostLineage.sync(true);
    return m.identities();
  }

  include(sessionId: string, ids: readonly ProcessIdentity[]): void {
    const m = this.byId.get(sessionId);
    if (m !== undefined) hostLineage.include(m, ids);
  }

  release(sessionId: string): void {
    const m = this.byId.get(sessionId);
    if (m === undefined) return;
    hostLineage.release(m);
    this.byId.delete(sessionId);
  }

  close(): void {
    if (this.unsubscribe === null) return;
    for (const m of this.byId.values()) hostLineage.release(m);
    this.byId.clear();
    this.unsubscribe();
    this.unsubscribe = null;
    this.statusValue = { available: false, why: "closed" };
    hostLineage.close();
  }
}

/**
 * How a session is tracked: lineage when its membership is complete; else what its cgroup
 * gives (one made for the engine, in which no process is older: everything it started is in
 * it; one the engine was moved into at registration: only what was in its tree then); else
 * snapshots (walks of /proc, the cookie).
 */
export function trackingOf(
  m: Membership | undefined,
  containment: { kind: "cgroup"; made: boolean } | { kind: "none" } | null,
): Tracking {
  if (m?.complete === true) return "lineage";
  if (containment?.kind === "cgroup") return containment.made ? "cgroup" : "cgroup-from-birth";
  return "snapshots";
}
