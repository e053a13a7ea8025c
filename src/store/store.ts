import type { Database } from "better-sqlite3";
import { ReaperError, errorMessage } from "../errors.js";
import type { HeartbeatWrite, StoredLive } from "../model/live-session.js";
import type {
  Damage,
  Leftover,
  Outcome,
  ProcessIdentity,
  Reason,
  Session,
  RegisteredBy,
  SessionState,
  StepName,
  StepResult,
  Tracking,
} from "../model/session.js";
import { SESSION_STATES } from "../model/session.js";
import { ENGINE_READABLE, RowReading, engineReadable } from "./columns.js";
import { BUSY_TIMEOUT_MS, PROBE_BUSY_TIMEOUT_MS, isStoreFault, openDatabase, openError } from "./open.js";
import { sessionRow, toSession, type SessionRow } from "./rows.js";
import { prepareStatements, type Statements } from "./statements.js";
import type { DiskSpace } from "./space.js";
import { bytes } from "./space.js";

export interface StoredEvent {
  seq: number;
  at: number;
  event: string;
  sessionId: string | null;
  reason: string | null;
  step: string | null;
  outcome: string | null;
  durationMs: number | null;
  detail: Record<string, unknown> | null;
  /** The stored detail could not be read (then `detail` is null). */
  damage?: Damage;
}

export interface NewEvent {
  at: number;
  event: string;
  sessionId?: string | undefined;
  reason?: string | undefined;
  step?: string | undefined;
  outcome?: string | undefined;
  durationMs?: number | undefined;
  detail?: Record<string, unknown> | undefined;
}

/** Sessions by state; `damaged` only when any session is (see Store.counts). */
export type SessionCounts = Record<Exclude<SessionState, "damaged">, number> & { damaged?: number };

export interface ListFilter {
  state?: SessionState | undefined;
  profile?: string | undefined;
  owner?: string | undefined;
  limit: number;
  /** Return sessions with seq greater than this. */
  afterSeq?: number | undefined;
}

/**
 * What recovery needs of a live session: its identities, timestamps, timeouts, profile, and
 * the stored values of its row that could not be read (`damage`: its engine may be unidentified).
 */
export type RecoveredSession = Omit<StoredLive, "busyCpuPercent"> & {
  readonly profile: string;
  readonly damage: readonly Damage[];
};

/** What a purge batch removed: sessions (with their steps and events), and the range of their reaps' ends. */
export interface PurgedSessions {
  sessions: number;
  steps: number;
  events: number;
  from: number | null;
  to: number | null;
  /** The highest seq of the events removed, or null if none was. */
  throughSeq: number | null;
}

/** A page of the event stream (`eventsAfter`). */
export interface EventPage {
  /** The page's events the filter lets through. */
  events: StoredEvent[];
  /** The last seq the page read, its events let through or not; null for an empty page. */
  lastSeq: number | null;
  /** The page read as many rows as asked: there may be more. */
  full: boolean;
}

/** Which events a page of the event stream keeps: one session's, or those of the sessions one uid registered. */
export type EventFilter = { sessionId: string } | { registeredBy: number };

/** An audit_events row as SQLite returns it (with the registering uid where a page joins it). */
interface EventRow {
  seq: number;
  at: number;
  event: string;
  session_id: string | null;
  reason: string | null;
  step: string | null;
  outcome: string | null;
  duration_ms: number | null;
  detail: string | null;
  registered_by_uid?: number | null;
}

/** A stored event from its row; a detail that cannot be read is null, with `damage`. */
function storedEvent(r: EventRow): StoredEvent {
  const read = new RowReading("audit_events", { seq: r.seq });
  const detail = read.nullableJson("detail", "detail", r.detail, null);
  const found = read.damage[0];
  return {
    seq: r.seq,
    at: r.at,
    event: r.event,
    sessionId: r.session_id,
    reason: r.reason,
    step: r.step,
    outcome: r.outcome,
    durationMs: r.duration_ms,
    detail,
    ...(found === undefined ? {} : { damage: found }),
  };
}

/** A purged session's tombstone: its id may not be used again, and it is answered 410. */
export interface Tombstone {
  readonly id: string;
  readonly endedAt: number;
  readonly reason: string | null;
  readonly outcome: string | null;
}

/** Told of every damaged stored value met while reading (`sessionId`: the session it belongs to). */
export type DamageListener = (sessionId: string, damage: readonly Damage[]) => void;

export type { HeartbeatWrite };
export { isStoreFault };

/**
 * All SQL lives here. Every statement is prepared once; `now` is always a bound parameter
 * (never datetime('now')), so the store runs on the daemon's injected clock.
 */
export class Store {
  readonly db: Database;
  /** Sessions by state, once counted (see `counts`); null: count again when asked. */
  private stateCounts: Record<SessionState, number> | null = null;
  private readonly stmts: Statements;
  /** False from a failed write until a probe commits again (see `probe`). */
  private availableValue = true;
  private fault: string | null = null;
  private readonly health: { unavailable: (fault: string) => void; available: () => void }[] = [];
  private readonly damageListeners: DamageListener[] = [];
  /** The disk under the database (WAL bound, reserve, headroom); null for `:memory:`. */
  readonly space: DiskSpace | null;
  /** The WAL size at which the next commit checkpoints (the bound, or more while a reader holds the WAL). */
  private walCheckpointAt = Number.POSITIVE_INFINITY;

  /**
   * Opens (and migrates) the database. Throws SR_STORE_CORRUPT when the integrity check
   * fails, SR_STORE_UNUSABLE when the file cannot be opened or written: both stop the
   * daemon (exit 78) rather than let it run on a store it cannot trust.
   */
  constructor(path: string, now: number) {
    const { db, space } = openDatabase(path, now);
    this.db = db;
    this.space = space;
    this.walCheckpointAt = space?.walLimit ?? Number.POSITIVE_INFINITY;
    this.stmts = prepareStatements(db);
    // One real write before anything is served: a database the daemon may never write (a
    // read-only file or directory, another owner) stops the start (SR_STORE_UNUSABLE) instead
    // of a daemon that answers 503 forever; a lock held or a full disk is an outage that may
    // pass: the daemon starts with the store unavailable and probes it.
    try {
      this.db.transaction(() => this.stmts.probe.run(now)).immediate();
    } catch (err) {
      const raw = (err as { code?: unknown }).code;
      if (typeof raw === "string" && /^SQLITE_(READONLY|CANTOPEN|PERM|AUTH)/.test(raw)) {
        db.close();
        throw openError(err, path);
      }
      if (!isStoreFault(err)) throw err;
      this.availableValue = false;
      this.fault = `${raw as string}: ${errorMessage(err)}`;
    }
    // The reserve is made (a new database's migrations leave the WAL first): a store without
    // room for its reserve and headroom starts unavailable, as after running out (see `probe`).
    if (this.availableValue && space !== null) {
      try {
        if (!this.makeRoom()) this.availableValue = false;
      } catch (err) {
        if (isStoreFault(err)) {
          this.availableValue = false;
          this.fault = `${String((err as { code?: unknown }).code)}: ${errorMessage(err)}`;
          return;
        }
        db.close();
        throw new ReaperError(
          "SR_STORE_UNUSABLE",
          `cannot make the reserve ${space.reservePath} beside the database: ${errorMessage(err)}`,
        );
      }
    }
  }

  /** Whether writes are expected to commit (false from a failed write until a probe succeeds). */
  get available(): boolean {
    return this.availableValue;
  }

  /** What made the store unavailable, or null. */
  get lastFault(): string | null {
    return this.fault;
  }

  /**
   * Told of the damaged values every read meets (src/store/columns.ts): the daemon names each in
   * its log and audit trail. Called synchronously, possibly while a statement is being iterated:
   * a listener must not use the database before the current turn of the event loop ends.
   */
  onDamage(listener: DamageListener): void {
    this.damageListeners.push(listener);
  }

  private noticed<T extends { readonly id: string; readonly damage: readonly Damage[] }>(s: T): T {
    if (s.damage.length > 0) this.damageFound(s.id, s.damage);
    return s;
  }

  private damageFound(sessionId: string, damage: readonly Damage[]): void {
    for (const l of this.damageListeners) {
      try {
        l(sessionId, damage);
      } catch {
        // a listener's failure is its own: the read goes on
      }
    }
  }

  /** Told when the store stops committing and when it commits again. */
  onHealth(listener: { unavailable: (fault: string) => void; available: () => void }): void {
    this.health.push(listener);
  }

  /**
   * A failed write: the store is unavailable from now until `probe` commits. Returns the
   * error the caller should see (SR_STORE_UNAVAILABLE), or the original if it is no store
   * fault (a bug, a constraint).
   */
  private failed(err: unknown): unknown {
    if (!isStoreFault(err)) return err;
    const fault = `${String((err as { code?: unknown }).code)}: ${errorMessage(err)}`;
    if (this.availableValue) {
      this.availableValue = false;
      this.fault = fault;
      for (const l of this.health) l.unavailable(fault);
    }
    return this.unavailableError(fault);
  }

  private unavailableError(fault: string): ReaperError {
    return new ReaperError("SR_STORE_UNAVAILABLE", `the database cannot commit now (${fault}); retry later`, {
      fault,
    });
  }

  /**
   * One small real write (a row of its own): true if it committed, and then the store is
   * available again. Called on a timer while unavailable; cheap when the fault persists (one
   * busy wait of PROBE_BUSY_TIMEOUT_MS at most).
   */
  probe(now: number): boolean {
    // A short wait for the lock: the probe runs every second while the store is out, on the
    // event loop that serves heartbeats; a lock free for a moment is found by a later probe.
    this.db.pragma(`busy_timeout = ${PROBE_BUSY_TIMEOUT_MS}`);
    try {
      if (!this.makeRoom()) return false;
      this.db.transaction(() => this.stmts.probe.run(now)).immediate();
    } catch (err) {
      if (!isStoreFault(err)) throw err;
      this.fault = `${String((err as { code?: unknown }).code)}: ${errorMessage(err)}`;
      return false;
    } finally {
      this.db.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
    }
    if (!this.availableValue) {
      this.availableValue = true;
      this.fault = null;
      this.stateCounts = null; // writes that failed may have moved the kept counts
      for (const l of this.health) l.available();
    }
    return true;
  }

  /**
   * Moves the WAL's content into the database and truncates it (bounded disk use), and grows
   * the reserve back if it is short (someone removed it); a disk without room for it is left
   * to the next outage's `probe`.
   */
  checkpoint(): void {
    try {
      this.db.pragma("wal_checkpoint(TRUNCATE)");
    } catch (err) {
      throw this.failed(err);
    }
    try {
      this.space?.fillReserve();
    } catch {
      // an unwritable directory: the next outage's probe says so
    }
  }

  /**
   * The store's room on its disk, made where the store itself holds it: true when the reserve
   * is whole and `headroom` is free. When what the store holds (the reserve, the WAL) could
   * not buy the room that is missing, nothing is touched: the disk is full of someone else's
   * data (or the database outgrew it), and freeing the WAL or the reserve would only hand
   * their blocks to whoever writes next. Otherwise the WAL is checkpointed and truncated (the
   * reserve released first if the database has no room to grow), and the reserve remade.
   * Runs before every probe write; the fault then says what is missing.
   */
  private makeRoom(): boolean {
    const space = this.space;
    if (space === null) return true;
    const before = space.read();
    if (before.reserve >= space.reserveSize && before.free >= space.headroom) return true;
    const missing = space.shortfall(before);
    if (missing > 0) {
      this.fault = this.spaceFault(before, missing);
      return false;
    }
    if (before.wal > 0) {
      try {
        this.db.pragma("wal_checkpoint(TRUNCATE)");
      } catch (err) {
        if (!/^SQLITE_FULL/.test(String((err as { code?: unknown }).code))) throw err;
        // No room to grow the database: the reserve is there for this.
        space.releaseReserve();
        this.db.pragma("wal_checkpoint(TRUNCATE)");
      }
      this.walCheckpointAt = space.walLimit;
    }
    space.fillReserve();
    const after = space.read();
    if (after.reserve >= space.reserveSize && after.free >= space.headroom) return true;
    this.fault = this.spaceFault(after, space.shortfall(after));
    return false;
  }

  /** The fault while the disk lacks room: what the store needs, what it has, what is missing. */
  private spaceFault(r: { free: number; reserve: number; wal: number }, missing: number): string {
    const space = this.space as DiskSpace;
    const cause = this.fault?.split(";")[0] ?? "no room";
    const short = missing > 0 ? `${bytes(missing)} short` : "its WAL not emptied yet: another connection reads it";
    return `${cause}; the store commits again with its reserve whole (${bytes(space.reserveSize)}) and ${bytes(space.headroom)} free for its WAL on the file system of the database, which has ${bytes(r.free)} free besides the store's ${bytes(r.reserve)} of reserve and ${bytes(r.wal)} of WAL: ${short}`;
  }

  /**
   * After an outermost commit: a WAL at its bound is checkpointed and truncated. A reader of
   * another connection holding the WAL (busy) defers the next try until the WAL grew by a
   * quarter of the bound. No room for the checkpoint makes the store unavailable (its `probe`
   * then makes room); the commit itself stands, so nothing is thrown.
   */
  private boundWal(): void {
    if (this.space === null || !this.availableValue) return;
    let wal: number;
    try {
      wal = this.space.walBytes();
    } catch {
      return;
    }
    if (wal < this.walCheckpointAt) return;
    this.db.pragma("busy_timeout = 0");
    try {
      const [r] = this.db.pragma("wal_checkpoint(TRUNCATE)") as { busy: number }[];
      this.walCheckpointAt = r?.busy === 1 ? wal + this.space.walLimit / 4 : this.space.walLimit;
    } catch (err) {
      this.failed(err);
    } finally {
      this.db.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
    }
  }

  close(): void {
    if (this.db.open) this.db.close();
  }

  /**
   * Runs `fn` in one transaction (better-sqlite3 nests inner calls into it). While the store
   * is unavailable, an outermost transaction fails at once with SR_STORE_UNAVAILABLE rather
   * than wait on a lock or a disk that failed a moment ago; a store fault inside one makes
   * the store unavailable and becomes SR_STORE_UNAVAILABLE too.
   */
  transaction<T>(fn: () => T): T {
    const outermost = !this.db.inTransaction;
    if (outermost && !this.availableValue) throw this.unavailableError(this.fault ?? "unavailable");
    let result: T;
    try {
      result = this.db.transaction(fn)();
    } catch (err) {
      // Rolled back: the counts moved by its writes no longer hold. Counted again when next asked.
      this.stateCounts = null;
      throw this.failed(err);
    }
    if (outermost) this.boundWal();
    return result;
  }

  /** `tree`: the engine's process tree seen at registration, kept durable (see `writeTree`). */
  insertSession(s: Session, tree: readonly ProcessIdentity[] = []): void {
    try {
      const inserted = this.stmts.insert.run({
        id: s.id,
        profile: s.profile,
        owner: s.owner,
        engine_pid: s.engine.pid,
        engine_start_time: s.engine.startTime,
        engine_boot_id: s.engine.bootId,
        engine_uid: s.engine.uid,
        owner_pid: s.ownerPid?.pid ?? null,
        owner_start_time: s.ownerPid?.startTime ?? null,
        owner_boot_id: s.ownerPid?.bootId ?? null,
        owner_uid: s.ownerPid?.uid ?? null,
        ports: JSON.stringify(s.ports),
        paths: JSON.stringify(s.paths),
        labels: JSON.stringify(s.labels),
        heartbeat_timeout_sec: s.heartbeatTimeoutSec,
        idle_timeout_sec: s.idleTimeoutSec,
        max_lifetime_sec: s.maxLifetimeSec,
        created_at: s.createdAt,
        last_heartbeat_at: s.lastHeartbeatAt,
        last_activity_at: s.lastActivityAt,
        deadline: s.deadline,
        registered_by_uid: s.registeredBy.uid,
        registered_as_admin: s.registeredBy.admin ? 1 : 0,
        registered_via: s.registeredBy.via,
        containment: s.containment === null ? null : JSON.stringify(s.containment),
        tree: JSON.stringify(tree),
        tracking: s.tracking,
      });
      if (inserted.changes === 1 && this.stateCounts !== null) this.stateCounts.live++;
    } catch (err) {
      if ((err as { code?: string }).code === "SQLITE_CONSTRAINT_UNIQUE") {
        throw new ReaperError("SR_SESSION_EXISTS", `a session with id "${s.id}" already exists`);
      }
      throw err;
    }
  }

  /**
   * A live session's ports, paths and labels, replaced whole (PATCH /v1/sessions/{id}); false
   * if the session is no longer live (the fence won).
   */
  setAdditions(id: string, a: Pick<Session, "ports" | "paths" | "labels">): boolean {
    const r = this.stmts.additions.run(JSON.stringify(a.ports), JSON.stringify(a.paths), JSON.stringify(a.labels), id);
    return r.changes === 1;
  }

  /** A live session's extension (POST …/extend); false if it is no longer live. */
  setExtendedUntil(id: string, until: number): boolean {
    return this.stmts.extend.run(until, id).changes === 1;
  }

  getSession(id: string): Session | undefined {
    const row = this.stmts.get.get(id) as SessionRow | undefined;
    return row && this.noticed(toSession(row));
  }

  seqOf(id: string): number | undefined {
    return (this.stmts.seqOf.get(id) as { seq: number } | undefined)?.seq;
  }

  list(filter: ListFilter): { sessions: Session[]; lastSeq: number | null; more: boolean } {
    const where: string[] = [];
    const params: Record<string, unknown> = { limit: filter.limit + 1 };
    for (const key of ["profile", "owner"] as const) {
      if (filter[key] !== undefined) {
        where.push(`${key} = @${key}`);
        params[key] = filter[key];
      }
    }
    // `live` and `damaged` are both live rows: the engine's identity, readable or not, tells them apart.
    if (filter.state === "live") where.push(`state = 'live' AND ${ENGINE_READABLE}`);
    else if (filter.state === "damaged") where.push(`state = 'live' AND NOT ${ENGINE_READABLE}`);
    else if (filter.state !== undefined) {
      where.push("state = @state");
      params.state = filter.state;
    }
    if (filter.afterSeq !== undefined) {
      where.push("seq > @afterSeq");
      params.afterSeq = filter.afterSeq;
    }
    const sql = `SELECT * FROM sessions ${where.length ? "WHERE " + where.join(" AND ") : ""} ORDER BY seq LIMIT @limit`;
    const rows = this.db.prepare(sql).all(params) as SessionRow[];
    const more = rows.length > filter.limit;
    const page = rows.slice(0, filter.limit);
    return { sessions: page.map((r) => this.noticed(toSession(r))), lastSeq: page.at(-1)?.seq ?? null, more };
  }

  /** Sessions whose row is in `state` (`live` rows include the `damaged` ones: their state says which). */
  sessionsInState(state: "live" | "reaping" | "reaped"): Session[] {
    return (this.stmts.byState.all(state) as SessionRow[]).map((r) => this.noticed(toSession(r)));
  }

  /**
   * Every live session, one at a time and only the columns recovery needs (no JSON parsed, no
   * row kept): at 100,000 sessions, loading whole rows first would leave a peak of garbage
   * that stays in the daemon's resident set. Identities equal to an earlier row's are the same
   * object, so a shared engine or owner (and the boot id string) is held once. A value that
   * cannot be read is in `damage` (src/store/columns.ts), never a throw: one damaged row must
   * not stop a start.
   */
  *liveForRecovery(): Generator<RecoveredSession> {
    const identities = new Map<string, ProcessIdentity>();
    const identity = (pid: number, startTime: number, bootId: string, uid: number): ProcessIdentity => {
      const key = `${pid}:${startTime}:${bootId}:${uid}`;
      let id = identities.get(key);
      if (id === undefined) identities.set(key, (id = { pid, startTime, bootId, uid }));
      return id;
    };
    const registrants = new Map<string, RegisteredBy>();
    const registrant = (uid: number | null, admin: boolean, via: RegisteredBy["via"]): RegisteredBy => {
      const key = `${uid}:${admin}:${via}`;
      let r = registrants.get(key);
      if (r === undefined) registrants.set(key, (r = { uid, admin, via }));
      return r;
    };
    for (const r of this.stmts.liveForRecovery.iterate() as IterableIterator<SessionRow>) {
      const read = sessionRow(r);
      const engine = read.engine(r);
      const owner = read.owner(r);
      const tree = read.nullableJson("tree", "tree", r.tree, []) ?? [];
      const containment = read.nullableJson("containment", "containment", r.containment, null);
      const damage = read.damage;
      yield this.noticed({
        id: r.id,
        profile: r.profile,
        engine:
          damage.length === 0 || engineReadable({ damage })
            ? identity(engine.pid, engine.startTime, engine.bootId, engine.uid)
            : engine,
        ownerPid: owner === null ? null : identity(owner.pid, owner.startTime, owner.bootId, owner.uid),
        createdAt: r.created_at,
        lastHeartbeatAt: r.last_heartbeat_at,
        lastActivityAt: r.last_activity_at,
        heartbeatTimeoutSec: r.heartbeat_timeout_sec,
        idleTimeoutSec: r.idle_timeout_sec,
        maxLifetimeSec: r.max_lifetime_sec,
        deadline: r.deadline,
        registeredBy: registrant(r.registered_by_uid, r.registered_as_admin === 1, r.registered_via),
        tree,
        cgroup: containment?.kind === "cgroup" ? containment.path : null,
        damage,
        extendedUntil: typeof r.extended_until === "number" ? r.extended_until : null,
      });
    }
  }

  /** A session's tracking changed (it fell back after lost events): true if the row changed. */
  setTracking(id: string, tracking: Tracking): boolean {
    return this.stmts.setTracking.run(tracking, id, tracking).changes === 1;
  }

  /**
   * At start: every unfinished session tracked by lineage falls back to what its containment
   * gives (forks made while no daemon listened are unknown). Returns how many did.
   */
  downgradeTracking(): number {
    return this.stmts.downgradeTracking.run().changes;
  }

  /**
   * The fence: true if this call moved the session from live to reaping. `last` is the
   * session's final record (its last heartbeat and activity, from memory).
   */
  fence(id: string, reason: Reason, now: number, last?: { lastHeartbeatAt: number; lastActivityAt: number }): boolean {
    const fenced = this.stmts.fence.get({
      id,
      reason,
      now,
      hb: last?.lastHeartbeatAt ?? null,
      activity: last?.lastActivityAt ?? null,
    }) as { readable: number } | undefined;
    if (fenced !== undefined && this.stateCounts !== null) {
      this.stateCounts[fenced.readable === 1 ? "live" : "damaged"]--;
      this.stateCounts.reaping++;
    }
    return fenced !== undefined;
  }

  /** The reap's end; its unkillable leftovers are counted in the row: the reaps to watch (unresolvedReaps). */
  finish(id: string, outcome: Outcome, leftovers: readonly Leftover[], now: number): boolean {
    const unkillable = leftovers.filter((l) => l.kind === "unkillable").length;
    const finished =
      this.stmts.finish.run({ id, outcome, leftovers: JSON.stringify(leftovers), now, unkillable }).changes === 1;
    if (finished && this.stateCounts !== null) {
      this.stateCounts.reaping--;
      this.stateCounts.reaped++;
    }
    return finished;
  }

  /**
   * Reaped sessions whose reap left unkillable processes not yet gone (src/reaper/resolver.ts
   * watches them), by the partial index: no scan of the reaped rows.
   */
  unresolvedReaps(): Session[] {
    return (this.stmts.unresolvedReaps.all() as SessionRow[]).map((r) => this.noticed(toSession(r)));
  }

  /**
   * A reap resolved once its unkillable processes were all gone: the row's outcome and
   * leftovers become the resolution's (reaped_at stays: the reap ended then), and it is no
   * longer watched. True if this call resolved it.
   */
  resolveReap(id: string, outcome: Outcome, leftovers: readonly Leftover[]): boolean {
    return this.stmts.resolveReap.run({ id, outcome, leftovers: JSON.stringify(leftovers) }).changes === 1;
  }

  /**
   * Purges up to `limit` reaped sessions whose reap ended before `before` (oldest first): their
   * reap steps, their audit events and their rows, each leaving a tombstone (`tombstone`).
   * Never a live or reaping session: only rows in state `reaped` are selected and deleted; nor
   * one whose unkillable processes are still watched (its reap is not over until resolved). The
   * caller runs it inside a transaction (with the `store.purged` event that says so).
   */
  purgeReaped(before: number, limit: number, now: number): PurgedSessions {
    const rows = this.stmts.purgeable.all(before, limit) as {
      id: string;
      reaped_at: number;
      reason: string | null;
      outcome: string | null;
    }[];
    const out: PurgedSessions = { sessions: 0, steps: 0, events: 0, from: null, to: null, throughSeq: null };
    for (const r of rows) {
      this.stmts.bury.run(r.id, r.reaped_at, r.reason, r.outcome, now);
      out.steps += this.stmts.purgeSteps.run(r.id).changes;
      const top = (this.stmts.topEventSeq.get(r.id) as { seq: number | null }).seq;
      if (top !== null) out.throughSeq = Math.max(out.throughSeq ?? 0, top);
      out.events += this.stmts.purgeEvents.run(r.id).changes;
      if (this.stmts.purgeSession.run(r.id).changes !== 1) continue;
      out.sessions++;
      out.from = Math.min(out.from ?? r.reaped_at, r.reaped_at);
      out.to = Math.max(out.to ?? r.reaped_at, r.reaped_at);
    }
    if (out.sessions > 0 && this.stateCounts !== null) this.stateCounts.reaped -= out.sessions;
    return out;
  }

  /** Tombstones of sessions that ended before `before`, at most `limit`: how many went. */
  purgeTombstones(before: number, limit: number): number {
    return this.stmts.purgeTombstones.run(before, limit).changes;
  }

  /**
   * Audit events of no session (daemon.*, store.purged, orphans) older than `before`, at most
   * `limit`: how many went, and the highest seq among them (null if none).
   */
  purgeUnsessionedEvents(before: number, limit: number): { events: number; throughSeq: number | null } {
    const seqs = (this.stmts.purgeUnsessioned.all(before, limit) as { seq: number }[]).map((r) => r.seq);
    return { events: seqs.length, throughSeq: seqs.length === 0 ? null : Math.max(...seqs) };
  }

  /** What is left of a purged session: when and how it ended. */
  tombstone(id: string): Tombstone | undefined {
    const r = this.stmts.tombstone.get(id) as
      { id: string; ended_at: number; reason: string | null; outcome: string | null } | undefined;
    return r && { id: r.id, endedAt: r.ended_at, reason: r.reason, outcome: r.outcome };
  }

  /**
   * Gives up to `pages` free pages back to the file system (incremental vacuum), when the
   * database was made with auto_vacuum = INCREMENTAL; returns the free pages left.
   */
  vacuumStep(pages: number): number {
    try {
      if (this.db.pragma("auto_vacuum", { simple: true }) !== 2) return 0;
      this.db.pragma(`incremental_vacuum(${Math.max(1, Math.floor(pages))})`);
      return this.db.pragma("freelist_count", { simple: true }) as number;
    } catch (err) {
      if (isStoreFault(err)) return 0; // the next pass tries again; the pages are reused meanwhile
      throw err;
    }
  }

  /** Counts one more start of the session's reap pipeline; returns the attempt number. */
  startAttempt(id: string): number | undefined {
    return this.transaction(() => (this.stmts.attempt.get(id) as { reap_attempts: number } | undefined)?.reap_attempts);
  }

  /**
   * Coalesced heartbeats, one transaction. The indexed `deadline` is written only when the
   * caller says so (`deadline` not null): moving an indexed column costs 2-3 times a plain
   * UPDATE (the index entry is deleted and re-inserted), and heartbeats move every deadline.
   */
  writeHeartbeats(batch: readonly HeartbeatWrite[]): void {
    const { heartbeat, heartbeatDeadline } = this.stmts;
    this.transaction(() => {
      for (const hb of batch) {
        if (hb.deadline === null) heartbeat.run(hb.lastHeartbeatAt, hb.lastActivityAt, hb.id);
        else heartbeatDeadline.run(hb.lastHeartbeatAt, hb.lastActivityAt, hb.deadline, hb.id);
        if (hb.tree !== undefined) this.stmts.tree.run(JSON.stringify(hb.tree), hb.id);
      }
    });
  }

  recordStep(sessionId: string, position: number, r: StepResult): void {
    this.stmts.insertStep.run(
      sessionId,
      position,
      r.name,
      r.outcome,
      r.startedAt,
      Math.round(r.durationMs),
      JSON.stringify(r.detail),
    );
  }

  /**
   * Rewrites the journal records of unfinished reaps that `upgrade` changes (records of an
   * older journal version: src/cleanup/journal.ts upgradeRecord), in one transaction, before
   * those reaps resume. `upgrade` returns null for a record that is current. A record whose
   * detail cannot be read is left as it is (steps() reports it as damage). Returns how many
   * records were rewritten.
   */
  upgradeJournal(upgrade: (detail: Readonly<Record<string, unknown>>) => Record<string, unknown> | null): number {
    let rewritten = 0;
    this.transaction(() => {
      const rows = this.db
        .prepare(
          `SELECT s.session_id AS id, s.name AS name, s.detail AS detail FROM reap_steps s
           JOIN sessions ON sessions.id = s.session_id WHERE sessions.state = 'reaping'`,
        )
        .all() as { id: string; name: string; detail: string }[];
      const write = this.db.prepare("UPDATE reap_steps SET detail = ? WHERE session_id = ? AND name = ?");
      for (const r of rows) {
        let detail: unknown;
        try {
          detail = JSON.parse(r.detail);
        } catch {
          continue;
        }
        if (detail === null || typeof detail !== "object" || Array.isArray(detail)) continue;
        const upgraded = upgrade(detail as Record<string, unknown>);
        if (upgraded === null) continue;
        write.run(JSON.stringify(upgraded), r.id, r.name);
        rewritten++;
      }
    });
    return rewritten;
  }

  /**
   * The session's journal. A record whose detail cannot be read comes with `damage` and an
   * empty detail: a resumed reap runs that step again (steps are idempotent).
   */
  steps(sessionId: string): StepResult[] {
    const rows = this.stmts.steps.all(sessionId) as {
      session_id: string;
      name: StepName;
      outcome: StepResult["outcome"];
      started_at: number;
      duration_ms: number;
      detail: string;
    }[];
    const damage: Damage[] = [];
    const steps = rows.map((r): StepResult => {
      const read = new RowReading("reap_steps", { session_id: r.session_id, name: r.name });
      const detail = read.json("detail", "detail", r.detail, {});
      const found = read.damage[0];
      if (found !== undefined) damage.push(found);
      return {
        name: r.name,
        outcome: r.outcome,
        startedAt: r.started_at,
        durationMs: r.duration_ms,
        detail,
        ...(found === undefined ? {} : { damage: found }),
      };
    });
    if (damage.length > 0) this.damageFound(sessionId, damage);
    return steps;
  }

  /** Inserts one audit event; returns its seq (the row id AUTOINCREMENT gave it). */
  insertEvent(e: NewEvent): number {
    const inserted = this.stmts.insertEvent.run(
      e.at,
      e.event,
      e.sessionId ?? null,
      e.reason ?? null,
      e.step ?? null,
      e.outcome ?? null,
      e.durationMs === undefined ? null : Math.round(e.durationMs),
      e.detail === undefined ? null : JSON.stringify(e.detail),
    );
    return Number(inserted.lastInsertRowid);
  }

  events(sessionId: string): StoredEvent[] {
    const events = (this.stmts.events.all(sessionId) as EventRow[]).map(storedEvent);
    const damage = events.flatMap((e) => (e.damage === undefined ? [] : [e.damage]));
    if (damage.length > 0) this.damageFound(sessionId, damage);
    return events;
  }

  /**
   * The event stream's next page: the events among the next `limit` rows with a seq above
   * `afterSeq`, oldest first; all of them, one session's, or those of the sessions a uid
   * registered (no daemon event: it has no session). A page reads `limit` rows at most,
   * however few it keeps, and parses only the details it keeps.
   */
  eventsAfter(afterSeq: number, limit: number, filter?: EventFilter): EventPage {
    const rows = (
      filter !== undefined && "sessionId" in filter
        ? this.stmts.sessionEventsAfter.all(filter.sessionId, afterSeq, limit)
        : this.stmts.eventsAfter.all(afterSeq, limit)
    ) as EventRow[];
    const uid = filter !== undefined && "registeredBy" in filter ? filter.registeredBy : null;
    const kept = uid === null ? rows : rows.filter((r) => r.session_id !== null && r.registered_by_uid === uid);
    const events = kept.map(storedEvent);
    for (const e of events) {
      if (e.damage !== undefined && e.sessionId !== null) this.damageFound(e.sessionId, [e.damage]);
    }
    return { events, lastSeq: rows.at(-1)?.seq ?? null, full: rows.length === limit };
  }

  /** The highest seq any audit event was ever given (0 before the first): its row may be purged since. */
  lastEventSeq(): number {
    return (this.stmts.lastEventSeq.get() as { seq: number } | undefined)?.seq ?? 0;
  }

  /**
   * The highest seq retention has removed (0 if none): the newest `store.purged` event's
   * `throughSeq`, which carries the highest of every batch before it. A `store.purged` of a
   * build before throughSeq answers its own seq (everything it removed was older).
   */
  purgedThroughSeq(): number {
    const r = this.stmts.lastPurge.get() as { seq: number; detail: string | null } | undefined;
    if (r === undefined) return 0;
    let through: unknown;
    try {
      through = (JSON.parse(r.detail ?? "null") as { throughSeq?: unknown } | null)?.throughSeq;
    } catch {
      // a damaged detail: its own seq bounds what it removed
    }
    return typeof through === "number" ? through : r.seq;
  }

  /** The uid that registered the session (null: a TCP caller, or none recorded); undefined: no such session. */
  registeredByUid(id: string): number | null | undefined {
    return (this.stmts.registeredByUid.get(id) as { uid: number | null } | undefined)?.uid;
  }

  /** Live, damaged and reaping sessions counted by state and profile (an index range, cheap at scrape time). */
  unfinishedByProfile(): { state: "live" | "reaping" | "damaged"; profile: string; n: number }[] {
    return this.stmts.unfinishedByProfile.all() as {
      state: "live" | "reaping" | "damaged";
      profile: string;
      n: number;
    }[];
  }

  /** Reaped sessions counted by profile: visits every reaped row, so run once (daemon start). */
  reapedByProfile(): { profile: string; n: number }[] {
    return this.stmts.reapedByProfile.all() as { profile: string; n: number }[];
  }

  /**
   * Live sessions whose stored deadline is at or before `at`, soonest first. A stored
   * deadline is never later than the in-memory one (heartbeats, busy CPU and recovery only
   * move a deadline later, and reach SQLite at the next flush), so this is a superset of
   * the sessions truly due by `at`: the caller filters on the in-memory deadline.
   */
  /** Live sessions a uid registered (the per-uid cap): an index probe on (registered_by_uid, state). */
  liveRegisteredBy(uid: number): number {
    return (this.stmts.liveByUid.get(uid) as { n: number }).n;
  }

  liveDueBy(at: number): { id: string; profile: string; owner: string | null }[] {
    return this.stmts.liveDueBy.all(at) as { id: string; profile: string; owner: string | null }[];
  }

  /**
   * Sessions by state. Counted once (a scan of the table: ~7 ms at 100,000 rows), then kept
   * by the store's own writes (insertSession, fence and finish are the only state changes),
   * so the 10 s STATUS= line and GET /v1/daemon cost nothing per session. A rolled-back
   * transaction drops the kept counts: the next call counts again.
   */
  counts(): SessionCounts {
    if (this.stateCounts === null) {
      const out = Object.fromEntries(SESSION_STATES.map((st) => [st, 0])) as Record<SessionState, number>;
      for (const r of this.stmts.counts.all() as { state: SessionState; n: number }[]) out[r.state] = r.n;
      this.stateCounts = out;
    }
    // `damaged` only when there is one: it is an exception an operator must see, not a state of routine.
    const { damaged, ...counts } = this.stateCounts;
    return damaged > 0 ? { ...counts, damaged } : counts;
  }
}
