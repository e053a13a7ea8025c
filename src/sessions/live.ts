import type { Clock } from "../clock.js";
import { deadlineOf, warnableDeadline, type Deadline } from "../model/deadline.js";
import type {
  Admission,
  CpuSample,
  HeartbeatWrite,
  LiveSession,
  SessionWarning,
  Stamp,
  StoredLive,
} from "../model/live-session.js";
import type { ProcessIdentity, WarnReason } from "../model/session.js";

type Fields = { -readonly [K in keyof LiveSession]: LiveSession[K] } & {
  peaks: { processes: number; rssBytes: number };
  extendedUntilMono: number;
};

/**
 * A live session as its owner holds it: the one place its fields are written. A class, so
 * that every live session has one hidden class in V8 whichever way it was made (admitted,
 * recovered), with every field present from the start: built from object literals and
 * spreads, each session ended up with a map of its own, and the heartbeat's loads and
 * stores (and the deadline's) went megamorphic, a third of a heartbeat's CPU.
 */
class Owned implements Fields {
  id: string;
  engine: LiveSession["engine"];
  ownerPid: LiveSession["ownerPid"];
  registeredBy: LiveSession["registeredBy"];
  busyCpuPercent: number | null;
  heartbeatTimeoutSec: number;
  idleTimeoutSec: number;
  maxLifetimeSec: number;
  warnBeforeSec: number;
  extendedUntil: number | null;
  extendedUntilMono: number;
  warning: SessionWarning | null;
  cgroup: string | null;
  createdAt: number;
  lastHeartbeatAt: number;
  lastActivityAt: number;
  createdMono: number;
  heartbeatMono: number;
  activityMono: number;
  tree: readonly ProcessIdentity[];
  peaks: { processes: number; rssBytes: number };
  lastRssBytes: number;
  cpuSample: CpuSample | undefined;
  storedDeadline: number | undefined;

  constructor(f: Fields) {
    this.id = f.id;
    this.engine = f.engine;
    this.ownerPid = f.ownerPid;
    this.registeredBy = f.registeredBy;
    this.busyCpuPercent = f.busyCpuPercent;
    this.heartbeatTimeoutSec = f.heartbeatTimeoutSec;
    this.idleTimeoutSec = f.idleTimeoutSec;
    this.maxLifetimeSec = f.maxLifetimeSec;
    this.warnBeforeSec = f.warnBeforeSec;
    this.extendedUntil = f.extendedUntil;
    this.extendedUntilMono = f.extendedUntilMono;
    this.warning = f.warning;
    this.cgroup = f.cgroup;
    this.createdAt = f.createdAt;
    this.lastHeartbeatAt = f.lastHeartbeatAt;
    this.lastActivityAt = f.lastActivityAt;
    this.createdMono = f.createdMono;
    this.heartbeatMono = f.heartbeatMono;
    this.activityMono = f.activityMono;
    this.tree = f.tree;
    this.peaks = f.peaks;
    this.lastRssBytes = f.lastRssBytes;
    this.cpuSample = f.cpuSample;
    this.storedDeadline = f.storedDeadline;
  }
}

/** Told of every session that enters or leaves the registry (the detector). */
export interface LiveWatcher {
  admitted(s: LiveSession): void;
  removed(s: LiveSession): void;
}

/**
 * Whether the stored (indexed) deadline must be rewritten: unknown, or nearer than half the
 * real deadline's distance from now (see takeDirty).
 */
function deadlineStale(stored: number | undefined, at: number, now: number): boolean {
  return stored === undefined || stored - now < (at - now) / 2;
}

/**
 * A session's warn_before_sec, at most half its idle timeout: a warning given at activity +
 * idle - warn must come after the activity that set the deadline, or every busy heartbeat of a
 * session whose idle timeout was shortened at registration would warn again.
 */
function warnBefore(a: { warnBeforeSec?: number | undefined; idleTimeoutSec: number }): number {
  return Math.min(a.warnBeforeSec ?? 0, a.idleTimeoutSec / 2);
}

/** See LiveSessions.displayOffset. */
const DISPLAY_SLACK_MS = 50;

/** A wall-clock step larger than this (between two flushes) rewrites every stored deadline. */
const WALL_STEP_MS = 1000;

/**
 * The one owner of live sessions in memory, and of the rules of time that apply to them:
 * deadlines on the monotonic clock, the restart rule (`resume`), heartbeats, and which
 * records must reach SQLite (`takeDirty`, drained by the write-behind).
 */
export class LiveSessions {
  private readonly byId = new Map<string, Owned>();
  private readonly dirty = new Set<Owned>();
  /** Sessions whose tree changed since it was last written. */
  private readonly treeDirty = new Set<Owned>();
  private readonly watchers: LiveWatcher[] = [];
  /**
   * The restart rule's floor (monotonic): the last moment the daemon came back from
   * downtime. No time-based timeout counts time before it.
   */
  private floor = Number.NEGATIVE_INFINITY;
  /** The last moment connections were turned away: no heartbeat timeout counts time before it. */
  private heartbeatFloor = Number.NEGATIVE_INFINITY;
  /** wall - mono at the last flush: a change means the wall clock was stepped. */
  private wallOffset: number;
  /**
   * wall - mono for display: Date.now() is whole ms and the monotonic clock is not, so the
   * offset read afresh jitters by a millisecond; it is kept until it moves by more than
   * DISPLAY_SLACK_MS (a step, or NTP's slew adding up), so that every answer gives one
   * session one deadline.
   */
  private displayOffset: number;

  constructor(private readonly clock: Clock) {
    this.wallOffset = clock.now() - clock.mono();
    this.displayOffset = this.wallOffset;
  }

  watch(w: LiveWatcher): void {
    this.watchers.push(w);
  }

  get size(): number {
    return this.byId.size;
  }

  get(id: string): LiveSession | undefined {
    return this.byId.get(id);
  }

  values(): IterableIterator<LiveSession> {
    return this.byId.values();
  }

  /**
   * Now on both clocks: the wall time is the monotonic one seen through the display offset,
   * so a record's times and its deadline agree to the millisecond.
   */
  stamp(): Stamp {
    const mono = this.clock.mono();
    return { mono, wall: this.toWall(mono) };
  }

  /** A new session, live from `a.at` (default now). */
  admit(a: Admission): LiveSession {
    const { at, tree } = a;
    const { wall: now, mono } = at ?? this.stamp();
    return this.add(
      new Owned({
        id: a.id,
        engine: a.engine,
        ownerPid: a.ownerPid,
        registeredBy: a.registeredBy,
        busyCpuPercent: a.busyCpuPercent,
        heartbeatTimeoutSec: a.heartbeatTimeoutSec,
        idleTimeoutSec: a.idleTimeoutSec,
        maxLifetimeSec: a.maxLifetimeSec,
        warnBeforeSec: warnBefore(a),
        extendedUntil: null,
        extendedUntilMono: Number.NEGATIVE_INFINITY,
        warning: null,
        storedDeadline: a.storedDeadline,
        cpuSample: undefined,
        cgroup: a.cgroup ?? null,
        createdAt: now,
        lastHeartbeatAt: now,
        lastActivityAt: now,
        createdMono: mono,
        heartbeatMono: mono,
        activityMono: mono,
        tree: tree === undefined ? [] : [...tree],
        peaks: { processes: tree?.length ?? 1, rssBytes: 0 },
        lastRssBytes: 0,
      }),
    );
  }

  /**
   * A session found live in SQLite at start. The restart rule: every timeout runs again
   * from now, so all its monotonic times are now; the record keeps the stored times. Only a
   * stored deadline that recovery moved far is written again.
   */
  recover(r: StoredLive): LiveSession {
    const mono = this.clock.mono();
    const s = new Owned({
      id: r.id,
      engine: r.engine,
      ownerPid: r.ownerPid,
      registeredBy: r.registeredBy,
      busyCpuPercent: r.busyCpuPercent,
      heartbeatTimeoutSec: r.heartbeatTimeoutSec,
      idleTimeoutSec: r.idleTimeoutSec,
      maxLifetimeSec: r.maxLifetimeSec,
      warnBeforeSec: warnBefore(r),
      // An extension is a promise on the wall clock ("kept until 18:00"): what is left of it
      // runs from now (never less than the restart rule's full idle timeout, see deadlineOf).
      extendedUntil: r.extendedUntil ?? null,
      extendedUntilMono:
        r.extendedUntil === null || r.extendedUntil === undefined
          ? Number.NEGATIVE_INFINITY
          : mono + Math.max(0, r.extendedUntil - this.clock.now()),
      warning: null,
      cgroup: r.cgroup ?? null,
      createdAt: r.createdAt,
      lastHeartbeatAt: r.lastHeartbeatAt,
      lastActivityAt: r.lastActivityAt,
      createdMono: mono,
      heartbeatMono: mono,
      activityMono: mono,
      tree: [...r.tree], // replaced, never mutated, by the liveness pass
      peaks: { ...(r.peaks ?? { processes: r.tree.length, rssBytes: 0 }) },
      lastRssBytes: 0,
      storedDeadline: r.deadline ?? undefined,
      cpuSample: undefined,
    });
    this.add(s);
    if (deadlineStale(s.storedDeadline, this.wallDeadline(s), this.clock.now())) this.dirty.add(s);
    return s;
  }

  private add(s: Owned): LiveSession {
    if (this.byId.has(s.id)) throw new Error(`live session ${s.id} admitted twice`);
    this.byId.set(s.id, s);
    for (const w of this.watchers) w.admitted(s);
    return s;
  }

  /** Drops a fenced session; returns it as it was last seen (its final record). */
  remove(id: string): LiveSession | undefined {
    const s = this.byId.get(id);
    if (s === undefined) return undefined;
    this.byId.delete(id);
    this.dirty.delete(s);
    this.treeDirty.delete(s);
    for (const w of this.watchers) w.removed(s);
    return s;
  }

  /** A heartbeat: O(1), in memory. `busy` moves activity too. */
  heartbeat(id: string, busy: boolean): LiveSession | undefined {
    const s = this.byId.get(id);
    if (s === undefined) return undefined;
    this.beat(s, busy);
    return s;
  }

  /** A heartbeat for a session just read with `get` (the API's: one lookup per heartbeat). */
  beat(live: LiveSession, busy: boolean): void {
    const s = live as Owned;
    const mono = this.clock.mono();
    const now = this.toWall(mono);
    s.lastHeartbeatAt = now;
    s.heartbeatMono = mono;
    if (busy) {
      s.lastActivityAt = now;
      s.activityMono = mono;
    }
    this.dirty.add(s);
  }

  /** Activity seen by the daemon itself (busy CPU). */
  active(live: LiveSession): void {
    const s = this.byId.get(live.id);
    if (s !== live || s === undefined) return;
    const { wall, mono } = this.stamp();
    s.lastActivityAt = wall;
    s.activityMono = mono;
    this.dirty.add(s);
  }

  /**
   * The engine's tree as a liveness pass (or the engine's exit) saw it: kept in memory for the
   * fence, and made durable at the next flush, so that a restart starts from it.
   */
  setTree(live: LiveSession, tree: readonly ProcessIdentity[]): void {
    // Also for a session fenced meanwhile: the reap reads the tree it was last seen with.
    const s = live as Owned;
    s.tree = tree; // replaced, never mutated: sessions of one engine may share it
    if (tree.length > s.peaks.processes) s.peaks.processes = tree.length;
    if (this.byId.get(s.id) !== s) return;
    this.dirty.add(s);
    this.treeDirty.add(s);
  }

  /**
   * The tree another live session of the same engine keeps (the detector watches an engine
   * once, for all its sessions): taken in memory only; its record was written at admission.
   */
  shareTree(live: LiveSession, tree: readonly ProcessIdentity[]): void {
    (live as Owned).tree = tree;
  }

  /** The resident memory the session's tree was just seen with: the last, and the peak if the most yet. */
  notePeakRss(live: LiveSession, rssBytes: number): void {
    const s = live as Owned;
    s.lastRssBytes = rssBytes;
    if (rssBytes > s.peaks.rssBytes) s.peaks.rssBytes = rssBytes;
  }

  /** The session's CPU at the latest sample (busy_cpu_percent): the next one measures from here. */
  setCpuSample(live: LiveSession, sample: CpuSample): void {
    const s = this.byId.get(live.id);
    if (s === live && s !== undefined) s.cpuSample = sample;
  }

  /**
   * The daemon comes back from downtime it did not see pass (a stall of its loop, a store
   * that could not commit): the restart rule applies from now, as after a restart.
   */
  resume(): void {
    this.floor = Math.max(this.floor, this.clock.mono());
  }

  /**
   * The restart rule for heartbeat timeouts alone: the daemon turned connections away (a
   * heartbeat sent now may have been refused), so no heartbeat timeout counts time before now.
   * Idle and lifetime deadlines do not move: what crowding may defer is capped
   * (src/detect/crowd.ts), and it is spent on the heartbeats that could not be delivered.
   */
  resumeHeartbeats(): void {
    this.heartbeatFloor = Math.max(this.heartbeatFloor, this.clock.mono());
  }

  /** The session's deadline on the monotonic clock. */
  deadline(s: LiveSession): Deadline {
    return deadlineOf(s, this.floor, this.heartbeatFloor);
  }

  /**
   * When the detector must look at the session next (its heap key): the deadline, or, for a
   * session that warns and has no standing warning for its idle or lifetime deadline, that
   * deadline minus warn_before_sec if it comes first.
   */
  nextMoment(s: LiveSession): number {
    const d = this.deadline(s).at;
    if (s.warnBeforeSec <= 0) return d;
    const w = warnableDeadline(s, this.floor);
    if (this.warningOf(s)?.deadlineMono === w.at) return d;
    return Math.min(d, w.at - s.warnBeforeSec * 1000);
  }

  /** The deadline to warn of now (its moment has come, none stands for it), or null. */
  dueWarning(s: LiveSession, now: number): Deadline | null {
    if (s.warnBeforeSec <= 0) return null;
    const w = warnableDeadline(s, this.floor);
    if (w.at <= now || w.at - s.warnBeforeSec * 1000 > now) return null;
    return this.warningOf(s)?.deadlineMono === w.at ? null : w;
  }

  /**
   * The warning standing for the session, or null: a deadline's warning stands while that is
   * still the deadline (activity, an extension, the restart rule move it, and void it); a
   * memory-pressure warning stands until the session is active again.
   */
  warningOf(s: LiveSession): SessionWarning | null {
    const w = s.warning;
    if (w === null) return null;
    const stands =
      w.reason === "memory_pressure"
        ? s.activityMono <= w.atMono
        : warnableDeadline(s, this.floor).at === w.deadlineMono && s.warnBeforeSec > 0;
    if (!stands) (s as Owned).warning = null;
    return stands ? w : null;
  }

  /** A warning was given (and recorded) for the session. */
  warned(live: LiveSession, reason: WarnReason, deadlineMono: number): SessionWarning | null {
    const s = this.byId.get(live.id);
    if (s !== live || s === undefined) return null;
    const { wall, mono } = this.stamp();
    s.warning = { reason, deadlineMono, deadline: this.toWall(deadlineMono), at: wall, atMono: mono };
    return s.warning;
  }

  /**
   * An extension of `sec` from now: its end on both clocks, never earlier than one in force
   * (an extension never shortens another). Nothing changes until `extend`.
   */
  extension(s: LiveSession, sec: number): Stamp {
    const mono = Math.max(s.extendedUntilMono ?? Number.NEGATIVE_INFINITY, this.clock.mono() + sec * 1000);
    return { mono, wall: this.toWall(mono) };
  }

  /** The session's deadlines were it extended until `untilMono`: the earliest, and the one it is kept until (idle or lifetime). */
  deadlinesWith(s: LiveSession, untilMono: number): { deadline: Deadline; kept: Deadline } {
    const t = {
      createdMono: s.createdMono,
      heartbeatMono: s.heartbeatMono,
      activityMono: s.activityMono,
      heartbeatTimeoutSec: s.heartbeatTimeoutSec,
      idleTimeoutSec: s.idleTimeoutSec,
      maxLifetimeSec: s.maxLifetimeSec,
      extendedUntilMono: untilMono,
    };
    return { deadline: deadlineOf(t, this.floor, this.heartbeatFloor), kept: warnableDeadline(t, this.floor) };
  }

  /** The extension (from `extension`), committed: the idle deadline is at least its end. */
  extend(live: LiveSession, until: Stamp): void {
    const s = live as Owned;
    if (this.byId.get(s.id) !== s) return;
    s.extendedUntilMono = until.mono;
    s.extendedUntil = until.wall;
    this.dirty.add(s); // the stored (indexed) deadline moves later
  }

  /** The session's deadline on the wall clock, in whole ms (for display and the stored index). */
  wallDeadline(s: LiveSession): number {
    return Math.round(this.deadline(s).at + this.wallNow());
  }

  /** Monotonic ms as wall-clock ms, as the wall clock reads now. */
  toWall(mono: number): number {
    return Math.round(mono + this.wallNow());
  }

  private wallNow(): number {
    const offset = this.clock.now() - this.clock.mono();
    if (Math.abs(offset - this.displayOffset) > DISPLAY_SLACK_MS) this.displayOffset = offset;
    return this.displayOffset;
  }

  /**
   * The sessions whose record changed since the last call, as writes for SQLite. The stored
   * deadline only narrows the /v1/expiring probe (a stored deadline never later than the
   * real one keeps the probe a superset), so it is rewritten only once the real deadline
   * has moved past twice the stored one's distance from now: the indexed column then moves
   * about once per half timeout per session instead of at every flush. A wall-clock step
   * makes every stored deadline wrong at once: all are written again.
   */
  takeDirty(): HeartbeatWrite[] {
    const now = this.clock.now();
    const offset = now - this.clock.mono();
    if (Math.abs(offset - this.wallOffset) > WALL_STEP_MS) {
      for (const s of this.byId.values()) {
        s.storedDeadline = undefined;
        this.dirty.add(s);
      }
    }
    this.wallOffset = offset;
    const out: HeartbeatWrite[] = [];
    for (const s of this.dirty) {
      const at = this.wallDeadline(s);
      const stale = deadlineStale(s.storedDeadline, at, now);
      if (stale) s.storedDeadline = at;
      out.push({
        id: s.id,
        lastHeartbeatAt: s.lastHeartbeatAt,
        lastActivityAt: s.lastActivityAt,
        deadline: stale ? at : null,
        ...(this.treeDirty.has(s) ? { tree: s.tree } : {}),
      });
    }
    this.dirty.clear();
    this.treeDirty.clear();
    return out;
  }

  /** Writes that did not reach SQLite (the store failed): taken again at the next flush. */
  untake(writes: readonly HeartbeatWrite[]): void {
    for (const w of writes) {
      const s = this.byId.get(w.id);
      if (s === undefined) continue;
      if (w.deadline !== null) s.storedDeadline = undefined;
      if (w.tree !== undefined) this.treeDirty.add(s);
      this.dirty.add(s);
    }
  }

  /** How many sessions have a record not yet written. */
  get dirtyCount(): number {
    return this.dirty.size;
  }
}
