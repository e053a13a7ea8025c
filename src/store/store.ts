import BetterSqlite3, { type Database, type Statement } from "better-sqlite3";
import { mkdirSync } from "node:fs";
import { dirname } from "node:path";
import { ReaperError } from "../errors.js";
import type {
  Leftover,
  Outcome,
  ProcessIdentity,
  Reason,
  Session,
  RegisteredBy,
  SessionState,
  StepName,
  StepResult,
} from "../sessions/types.js";
import { migrate } from "./migrate.js";

interface SessionRow {
  seq: number;
  id: string;
  profile: string;
  owner: string | null;
  engine_pid: number;
  engine_start_time: number;
  engine_boot_id: string;
  engine_uid: number;
  owner_pid: number | null;
  owner_start_time: number | null;
  owner_boot_id: string | null;
  owner_uid: number | null;
  ports: string;
  paths: string;
  labels: string;
  heartbeat_timeout_sec: number;
  idle_timeout_sec: number;
  max_lifetime_sec: number;
  created_at: number;
  last_heartbeat_at: number;
  last_activity_at: number;
  deadline: number | null;
  state: SessionState;
  reason: Reason | null;
  outcome: Outcome | null;
  leftovers: string | null;
  reap_started_at: number | null;
  reaped_at: number | null;
  reap_attempts: number;
  registered_by_uid: number | null;
  registered_as_admin: number;
  registered_via: "unix" | "tcp" | null;
}

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

export interface ListFilter {
  state?: SessionState | undefined;
  profile?: string | undefined;
  owner?: string | undefined;
  limit: number;
  /** Return sessions with seq greater than this. */
  afterSeq?: number | undefined;
}

/** What recovery needs of a live session: its identities, timestamps, timeouts, profile. */
export interface RecoveredSession {
  id: string;
  profile: string;
  engine: ProcessIdentity;
  ownerPid: ProcessIdentity | null;
  registeredBy: RegisteredBy;
  createdAt: number;
  lastHeartbeatAt: number;
  lastActivityAt: number;
  heartbeatTimeoutSec: number;
  idleTimeoutSec: number;
  maxLifetimeSec: number;
  deadline: number | null;
}

export interface HeartbeatWrite {
  id: string;
  lastHeartbeatAt: number;
  lastActivityAt: number;
  /** The new stored deadline, or null to leave the indexed column as it is (see writeHeartbeats). */
  deadline: number | null;
}

function toSession(r: SessionRow): Session {
  const owner: ProcessIdentity | null =
    r.owner_pid === null
      ? null
      : { pid: r.owner_pid, startTime: r.owner_start_time ?? 0, bootId: r.owner_boot_id ?? "", uid: r.owner_uid ?? -1 };
  return {
    id: r.id,
    profile: r.profile,
    owner: r.owner,
    engine: { pid: r.engine_pid, startTime: r.engine_start_time, bootId: r.engine_boot_id, uid: r.engine_uid },
    ownerPid: owner,
    ports: JSON.parse(r.ports) as number[],
    paths: JSON.parse(r.paths) as string[],
    labels: JSON.parse(r.labels) as Record<string, string>,
    heartbeatTimeoutSec: r.heartbeat_timeout_sec,
    idleTimeoutSec: r.idle_timeout_sec,
    maxLifetimeSec: r.max_lifetime_sec,
    createdAt: r.created_at,
    lastHeartbeatAt: r.last_heartbeat_at,
    lastActivityAt: r.last_activity_at,
    deadline: r.deadline,
    state: r.state,
    reason: r.reason,
    outcome: r.outcome,
    leftovers: r.leftovers === null ? [] : (JSON.parse(r.leftovers) as Leftover[]),
    reapStartedAt: r.reap_started_at,
    reapedAt: r.reaped_at,
    reapAttempts: r.reap_attempts,
    registeredBy: { uid: r.registered_by_uid, admin: r.registered_as_admin === 1, via: r.registered_via },
  };
}

/**
 * All SQL lives here. Every statement is prepared once; `now` is always a bound parameter
 * (never datetime('now')), so the store runs on the daemon's injected clock.
 */
export class Store {
  readonly db: Database;
  /** Sessions by state, once counted (see `counts`); null: count again when asked. */
  private stateCounts: Record<SessionState, number> | null = null;
  private readonly stmts: {
    insert: Statement;
    get: Statement;
    seqOf: Statement;
    fence: Statement;
    finish: Statement;
    attempt: Statement;
    heartbeat: Statement;
    heartbeatDeadline: Statement;
    insertStep: Statement;
    steps: Statement;
    insertEvent: Statement;
    events: Statement;
    byState: Statement;
    liveForRecovery: Statement;
    counts: Statement;
    unfinishedByProfile: Statement;
    reapedByProfile: Statement;
    liveByUid: Statement;
    liveDueBy: Statement;
  };

  constructor(path: string, now: number) {
    if (path !== ":memory:") mkdirSync(dirname(path), { recursive: true });
    this.db = new BetterSqlite3(path);
    this.db.pragma("journal_mode = WAL");
    // NORMAL in WAL mode: a commit survives a daemon crash; only an OS crash may lose the
    // last transactions, and the journal is replayed from whatever did reach the disk.
    this.db.pragma("synchronous = NORMAL");
    this.db.pragma("foreign_keys = ON");
    this.db.pragma("busy_timeout = 5000");
    try {
      migrate(this.db, now);
    } catch (err) {
      this.db.close();
      throw err;
    }
    const db = this.db;
    this.stmts = {
      insert: db.prepare(`INSERT INTO sessions (id, profile, owner, engine_pid, engine_start_time, engine_boot_id,
          engine_uid, owner_pid, owner_start_time, owner_boot_id, owner_uid, ports, paths, labels,
          heartbeat_timeout_sec, idle_timeout_sec, max_lifetime_sec, created_at, last_heartbeat_at,
          last_activity_at, deadline, state, registered_by_uid, registered_as_admin, registered_via)
        VALUES (@id, @profile, @owner, @engine_pid, @engine_start_time, @engine_boot_id, @engine_uid, @owner_pid,
          @owner_start_time, @owner_boot_id, @owner_uid, @ports, @paths, @labels, @heartbeat_timeout_sec,
          @idle_timeout_sec, @max_lifetime_sec, @created_at, @last_heartbeat_at, @last_activity_at, @deadline, 'live',
          @registered_by_uid, @registered_as_admin, @registered_via)`),
      get: db.prepare("SELECT * FROM sessions WHERE id = ?"),
      seqOf: db.prepare("SELECT seq FROM sessions WHERE id = ?"),
      fence:
        db.prepare(`UPDATE sessions SET state = 'reaping', reason = @reason, reap_started_at = @now, deadline = NULL
        WHERE id = @id AND state = 'live'`),
      finish:
        db.prepare(`UPDATE sessions SET state = 'reaped', outcome = @outcome, leftovers = @leftovers, reaped_at = @now
        WHERE id = @id AND state = 'reaping'`),
      attempt: db.prepare(
        "UPDATE sessions SET reap_attempts = reap_attempts + 1 WHERE id = ? AND state = 'reaping' RETURNING reap_attempts",
      ),
      heartbeat: db.prepare(
        `UPDATE sessions SET last_heartbeat_at = ?, last_activity_at = ? WHERE id = ? AND state = 'live'`,
      ),
      heartbeatDeadline: db.prepare(`UPDATE sessions SET last_heartbeat_at = ?, last_activity_at = ?, deadline = ?
          WHERE id = ? AND state = 'live'`),
      insertStep:
        db.prepare(`INSERT OR REPLACE INTO reap_steps (session_id, position, name, outcome, started_at, duration_ms, detail)
        VALUES (?, ?, ?, ?, ?, ?, ?)`),
      steps: db.prepare("SELECT * FROM reap_steps WHERE session_id = ? ORDER BY position"),
      insertEvent:
        db.prepare(`INSERT INTO audit_events (at, event, session_id, reason, step, outcome, duration_ms, detail)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?)`),
      events: db.prepare("SELECT * FROM audit_events WHERE session_id = ? ORDER BY seq"),
      byState: db.prepare("SELECT * FROM sessions WHERE state = ? ORDER BY seq"),
      liveForRecovery: db.prepare(`SELECT id, profile, engine_pid, engine_start_time, engine_boot_id, engine_uid,
          owner_pid, owner_start_time, owner_boot_id, owner_uid, created_at, last_heartbeat_at, last_activity_at,
          heartbeat_timeout_sec, idle_timeout_sec, max_lifetime_sec, deadline, registered_by_uid,
          registered_as_admin, registered_via
        FROM sessions WHERE state = 'live' ORDER BY seq`),
      counts: db.prepare("SELECT state, COUNT(*) AS n FROM sessions GROUP BY state"),
      // These three search the (state, deadline) index by state, so they visit only the rows
      // of the states they count: live and reaping rows are few, reaped ones most of the table.
      unfinishedByProfile: db.prepare(
        "SELECT state, profile, COUNT(*) AS n FROM sessions WHERE state IN ('live', 'reaping') GROUP BY state, profile",
      ),
      reapedByProfile: db.prepare(
        "SELECT profile, COUNT(*) AS n FROM sessions WHERE state = 'reaped' GROUP BY profile",
      ),
      liveByUid: db.prepare("SELECT COUNT(*) AS n FROM sessions WHERE registered_by_uid = ? AND state = 'live'"),
      liveDueBy: db.prepare(
        "SELECT id, profile, owner FROM sessions WHERE state = 'live' AND deadline <= ? ORDER BY deadline",
      ),
    };
  }

  close(): void {
    if (this.db.open) this.db.close();
  }

  /** Runs `fn` in one transaction (better-sqlite3 nests inner calls into it). */
  transaction<T>(fn: () => T): T {
    try {
      return this.db.transaction(fn)();
    } catch (err) {
      // Rolled back: the counts moved by its writes no longer hold. Counted again when next asked.
      this.stateCounts = null;
      throw err;
    }
  }

  insertSession(s: Session): void {
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
      });
      if (inserted.changes === 1 && this.stateCounts !== null) this.stateCounts.live++;
    } catch (err) {
      if ((err as { code?: string }).code === "SQLITE_CONSTRAINT_UNIQUE") {
        throw new ReaperError("SR_SESSION_EXISTS", `a session with id "${s.id}" already exists`);
      }
      throw err;
    }
  }

  getSession(id: string): Session | undefined {
    const row = this.stmts.get.get(id) as SessionRow | undefined;
    return row && toSession(row);
  }

  seqOf(id: string): number | undefined {
    return (this.stmts.seqOf.get(id) as { seq: number } | undefined)?.seq;
  }

  list(filter: ListFilter): { sessions: Session[]; lastSeq: number | null; more: boolean } {
    const where: string[] = [];
    const params: Record<string, unknown> = { limit: filter.limit + 1 };
    for (const key of ["state", "profile", "owner"] as const) {
      if (filter[key] !== undefined) {
        where.push(`${key} = @${key}`);
        params[key] = filter[key];
      }
    }
    if (filter.afterSeq !== undefined) {
      where.push("seq > @afterSeq");
      params.afterSeq = filter.afterSeq;
    }
    const sql = `SELECT * FROM sessions ${where.length ? "WHERE " + where.join(" AND ") : ""} ORDER BY seq LIMIT @limit`;
    const rows = this.db.prepare(sql).all(params) as SessionRow[];
    const more = rows.length > filter.limit;
    const page = rows.slice(0, filter.limit);
    return { sessions: page.map(toSession), lastSeq: page.at(-1)?.seq ?? null, more };
  }

  sessionsInState(state: SessionState): Session[] {
    return (this.stmts.byState.all(state) as SessionRow[]).map(toSession);
  }

  /**
   * Every live session, one at a time and only the columns recovery needs (no JSON parsed, no
   * row kept): at 100,000 sessions, loading whole rows first would leave a peak of garbage
   * that stays in the daemon's resident set. Identities equal to an earlier row's are the same
   * object, so a shared engine or owner (and the boot id string) is held once.
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
      yield {
        id: r.id,
        profile: r.profile,
        engine: identity(r.engine_pid, r.engine_start_time, r.engine_boot_id, r.engine_uid),
        ownerPid:
          r.owner_pid === null
            ? null
            : identity(r.owner_pid, r.owner_start_time ?? 0, r.owner_boot_id ?? "", r.owner_uid ?? -1),
        createdAt: r.created_at,
        lastHeartbeatAt: r.last_heartbeat_at,
        lastActivityAt: r.last_activity_at,
        heartbeatTimeoutSec: r.heartbeat_timeout_sec,
        idleTimeoutSec: r.idle_timeout_sec,
        maxLifetimeSec: r.max_lifetime_sec,
        deadline: r.deadline,
        registeredBy: registrant(r.registered_by_uid, r.registered_as_admin === 1, r.registered_via),
      };
    }
  }

  /** The fence: true if this call moved the session from live to reaping. */
  fence(id: string, reason: Reason, now: number): boolean {
    const fenced = this.stmts.fence.run({ id, reason, now }).changes === 1;
    if (fenced && this.stateCounts !== null) {
      this.stateCounts.live--;
      this.stateCounts.reaping++;
    }
    return fenced;
  }

  finish(id: string, outcome: Outcome, leftovers: readonly Leftover[], now: number): boolean {
    const finished = this.stmts.finish.run({ id, outcome, leftovers: JSON.stringify(leftovers), now }).changes === 1;
    if (finished && this.stateCounts !== null) {
      this.stateCounts.reaping--;
      this.stateCounts.reaped++;
    }
    return finished;
  }

  /** Counts one more start of the session's reap pipeline; returns the attempt number. */
  startAttempt(id: string): number | undefined {
    return (this.stmts.attempt.get(id) as { reap_attempts: number } | undefined)?.reap_attempts;
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

  steps(sessionId: string): StepResult[] {
    const rows = this.stmts.steps.all(sessionId) as {
      name: StepName;
      outcome: StepResult["outcome"];
      started_at: number;
      duration_ms: number;
      detail: string;
    }[];
    return rows.map((r) => ({
      name: r.name,
      outcome: r.outcome,
      startedAt: r.started_at,
      durationMs: r.duration_ms,
      detail: JSON.parse(r.detail) as StepResult["detail"],
    }));
  }

  insertEvent(e: NewEvent): void {
    this.stmts.insertEvent.run(
      e.at,
      e.event,
      e.sessionId ?? null,
      e.reason ?? null,
      e.step ?? null,
      e.outcome ?? null,
      e.durationMs === undefined ? null : Math.round(e.durationMs),
      e.detail === undefined ? null : JSON.stringify(e.detail),
    );
  }

  events(sessionId: string): StoredEvent[] {
    const rows = this.stmts.events.all(sessionId) as {
      seq: number;
      at: number;
      event: string;
      session_id: string | null;
      reason: string | null;
      step: string | null;
      outcome: string | null;
      duration_ms: number | null;
      detail: string | null;
    }[];
    return rows.map((r) => ({
      seq: r.seq,
      at: r.at,
      event: r.event,
      sessionId: r.session_id,
      reason: r.reason,
      step: r.step,
      outcome: r.outcome,
      durationMs: r.duration_ms,
      detail: r.detail === null ? null : (JSON.parse(r.detail) as Record<string, unknown>),
    }));
  }

  /** Live and reaping sessions counted by state and profile (an index range, cheap at scrape time). */
  unfinishedByProfile(): { state: "live" | "reaping"; profile: string; n: number }[] {
    return this.stmts.unfinishedByProfile.all() as { state: "live" | "reaping"; profile: string; n: number }[];
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
  counts(): Record<SessionState, number> {
    if (this.stateCounts === null) {
      const out: Record<SessionState, number> = { live: 0, reaping: 0, reaped: 0 };
      for (const r of this.stmts.counts.all() as { state: SessionState; n: number }[]) out[r.state] = r.n;
      this.stateCounts = out;
    }
    return { ...this.stateCounts };
  }
}
