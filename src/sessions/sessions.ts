import { randomUUID } from "node:crypto";
import pidusage from "pidusage";
import type { AuditTrail } from "../audit/audit.js";
import type { Caller } from "../auth/caller.js";
import { checkActor, checkRegistration, registeredBy } from "../auth/policy.js";
import { isoTime, type Clock } from "../clock.js";
import type { Config, Profile } from "../config/load.js";
import { deadlineOf } from "../model/deadline.js";
import { journaled, type SessionUsage } from "../cleanup/journal.js";
import type { LiveSessions } from "./live.js";
import { ReaperError, errorMessage } from "../errors.js";
import type { SessionCgroups } from "../proc/containment.js";
import { MAX_ITEMS, type ListQuery, type RegisterBody, type UpdateBody } from "../model/requests.js";
import type { Metrics } from "../metrics/metrics.js";
import { identify, liveness } from "../proc/identity.js";
import { freshTables, heldOf, inetSockets } from "../proc/sockets.js";
import { cgroupPids } from "../proc/cgroup.js";
import type { ProcessTable } from "../proc/tree.js";
import { descendantTree, freshTable } from "../proc/tree.js";
import { trackingOf, type LineageStatus, type SessionLineage } from "../proc/lineage.js";
import { checkPath } from "../paths/validate.js";
import { damageOf, describeDamage, engineDamage, whereIs } from "../store/columns.js";
import { loopTurn } from "../pace/turns.js";
import type { Store } from "../store/store.js";
import {
  type Containment,
  NOT_YET_REAPED,
  type ProcessIdentity,
  processKey,
  type Reason,
  type Session,
  type StepResult,
  type TimeReason,
  type Tracking,
  type WarnReason,
} from "../model/session.js";

/** A registration's answer: the session, and what it could not be given. */
export type RegisteredSession = Session & { readonly warnings: readonly RegistrationWarning[] };

export interface RegistrationWarning {
  readonly code: "SR_TRACKING_WEAKER_THAN_LINEAGE";
  readonly message: string;
}

/** What a tracking weaker than lineage leaves unknown, and why the session has no lineage. */
/** A registration that passed every check: what the session will be made of. */
interface CheckedRegistration {
  id: string;
  profileName: string;
  profile: Profile;
  engine: ProcessIdentity;
  ownerPid: ProcessIdentity | null;
  timeouts: ReturnType<typeof clampTimeouts>;
  paths: string[];
  ports: number[];
}

const TRACKING_COVERS: Record<Exclude<Tracking, "lineage">, string> = {
  "cgroup-from-birth": "its own cgroup holds everything it started, unless a process was moved out of the cgroup",
  cgroup:
    "its cgroup holds what it starts from now on; a process that left its tree before this registration (a double fork, setsid) is found only by the cookie",
  snapshots:
    "walks of /proc and the cookie: a process that leaves its tree between two walks and carries no cookie is not known",
};

function trackingWarnings(tracking: Tracking, engine: ProcessIdentity, status: LineageStatus): RegistrationWarning[] {
  if (tracking === "lineage") return [];
  const why = !status.available
    ? `lineage is unavailable on this host (${status.why})`
    : `the engine (pid ${engine.pid}) started before the daemon saw every fork of it (before the daemon started, or while process events were lost)`;
  return [
    {
      code: "SR_TRACKING_WEAKER_THAN_LINEAGE",
      message: `tracked as "${tracking}": ${why}; ${TRACKING_COVERS[tracking]}`,
    },
  ];
}

export interface EngineUsage {
  /** Percent of one core, since the previous pidusage read of this pid. */
  cpu: number;
  /** Resident memory, bytes. */
  memory: number;
  /** Milliseconds since the engine process started. */
  elapsed: number;
}

/** A live session due within the asked window (GET /v1/expiring). */
export interface ExpiringSession {
  id: string;
  profile: string;
  owner: string | null;
  deadline: number;
  expiresBy: TimeReason;
  /** Seconds from now to the deadline; negative when overdue (e.g. while shutting down). */
  inSec: number;
}

const TIME_REASONS: ReadonlySet<Reason> = new Set<TimeReason>(["heartbeat_timeout", "idle_timeout", "max_lifetime"]);

/** What a heartbeat answers (times in ISO 8601 UTC). */
export interface HeartbeatAnswer {
  id: string;
  state: "live";
  /** The earliest deadline after this beat, and the timeout that sets it. */
  deadline: string;
  expiresBy: TimeReason;
  /** The warning standing for the session (session.warning), or null: a client learns of it here. */
  warning: { reason: WarnReason; deadline: string; at: string } | null;
}

/** What POST /v1/sessions/{id}/extend answers (times in ISO 8601 UTC). */
export interface ExtendedSession {
  id: string;
  state: "live";
  extendedUntil: string;
  /** When it is reaped if it stays idle and keeps heartbeating: its idle deadline, or its max lifetime. */
  keptUntil: string;
  cappedBy: "max_lifetime" | null;
  deadline: string;
  expiresBy: TimeReason;
}

export interface SessionView {
  session: Session;
  steps: StepResult[];
  /** While live: the engine's usage now; once reaped: what the whole session used (finish). */
  usage: EngineUsage | SessionUsage | null;
}

/**
 * What ending a session needs of the reaper (src/reaper/reaper.ts implements it): fence the
 * session in one transaction (no more heartbeats count) and start its cleanup. False when the
 * session was no longer live.
 */
export interface ReapStarter {
  begin(
    id: string,
    reason: Reason,
    detail?: Record<string, unknown>,
    known?: readonly ProcessIdentity[],
    last?: { lastHeartbeatAt: number; lastActivityAt: number; peaks?: { processes: number; rssBytes: number } },
  ): boolean;
}

export interface SessionsDeps {
  store: Store;
  audit: AuditTrail;
  registry: LiveSessions;
  /** Where session cgroups are made (containment). */
  cgroups: SessionCgroups;
  reaper: ReapStarter;
  clock: Clock;
  config: Config;
  metrics: Metrics;
  daemonPid: number;
  /** False while shutting down: registrations get 503. */
  accepting: () => boolean;
  /** Lineage from the kernel's process events (membership of every process the engine started). */
  lineage: SessionLineage;
}

/**
 * What the API does with sessions: register (with every policy check), heartbeat (in
 * memory, O(1)), close, force-reap, read. Expiry by the detector enters through `expire`.
 */
export class Sessions {
  constructor(private readonly deps: SessionsDeps) {}

  /**
   * The declared ports are checked against a reading of the network tables begun after the
   * request arrived, shared by the registrations of the same moment (`freshTables`): reading
   * /proc/net/tcp on a host with thousands of sockets takes milliseconds, and one reading per
   * registration held the loop for 70 % of a storm of registrations (heartbeats waited
   * seconds). Everything else is checked, and the session committed, in one synchronous run
   * after that wait.
   */
  async register(body: RegisterBody, caller: Caller): Promise<RegisteredSession> {
    this.refuseWhileShuttingDown();
    const since = (body.ports?.length ?? 0) > 0 ? await portReading(body.engine.pid, body.ports ?? []) : undefined;
    return this.registerNow(body, caller, since);
  }

  private refuseWhileShuttingDown(): void {
    if (!this.deps.accepting()) {
      throw new ReaperError("SR_SHUTTING_DOWN", "the daemon is shutting down and takes no new sessions");
    }
  }

  private registerNow(body: RegisterBody, caller: Caller, tablesSince: PortReading | undefined): RegisteredSession {
    const { registry } = this.deps;
    this.refuseWhileShuttingDown();
    const checked = this.checkRegistration(body, caller, tablesSince);
    const { id, profile, engine } = checked;
    // Before anything is moved into a cgroup: the commit would fail anyway.
    this.requireStore();
    const { tree, containment, tracking } = this.track(id, profile, engine, caller);
    // Committed first, then admitted: a failed commit (SR_STORE_UNAVAILABLE) leaves nothing
    // in memory, and nothing after the commit can fail (the audit line never throws).
    const at = registry.stamp();
    let session: Session;
    try {
      session = this.commitRegistration(body, caller, checked, { tree, containment, tracking }, at.wall);
    } catch (err) {
      this.deps.cgroups.undo(containment);
      this.deps.lineage.release(id);
      throw err;
    }
    const live = registry.admit({
      id,
      engine,
      ownerPid: checked.ownerPid,
      registeredBy: session.registeredBy,
      busyCpuPercent: profile.busyCpuPercent,
      warnBeforeSec: profile.warnBeforeSec,
      ...checked.timeouts,
      storedDeadline: session.deadline ?? undefined,
      at,
      tree,
      cgroup: containment.kind === "cgroup" ? containment.path : null,
    });
    return {
      ...session,
      deadline: registry.wallDeadline(live),
      warnings: trackingWarnings(tracking, engine, this.deps.lineage.status),
    };
  }

  /** Everything a registration is refused for, checked before anything is changed. */
  private checkRegistration(
    body: RegisterBody,
    caller: Caller,
    tablesSince: PortReading | undefined,
  ): CheckedRegistration {
    const { config, store, daemonPid } = this.deps;
    const profileName = body.profile ?? "default";
    // Own keys only: "__proto__", "constructor" or "toString" must not find Object.prototype's.
    const profile = Object.hasOwn(config.profiles, profileName) ? config.profiles[profileName] : undefined;
    if (profile === undefined) {
      throw new ReaperError("SR_UNKNOWN_PROFILE", `profile: no profile is named "${profileName}"`, {
        profiles: Object.keys(config.profiles),
      });
    }
    const engine = identify(body.engine.pid, "engine.pid", daemonPid);
    const ownerPid = body.ownerPid === undefined ? null : identify(body.ownerPid, "ownerPid", daemonPid);
    checkRegistration(caller, profile, engine, ownerPid);
    if (!caller.admin && caller.uid !== null) {
      const live = store.liveRegisteredBy(caller.uid);
      if (live >= config.api.maxSessionsPerUid) {
        throw new ReaperError(
          "SR_TOO_MANY_SESSIONS",
          `uid ${caller.uid} already has ${live} live sessions (api.max_sessions_per_uid = ${config.api.maxSessionsPerUid})`,
          { live, max: config.api.maxSessionsPerUid },
        );
      }
    }
    const timeouts = clampTimeouts(body, profile);
    const paths = (body.paths ?? []).map((p, i) => checkPath(p, profile.allowedRoots, engine.uid, `paths[${i}]`).path);
    const ports = body.ports ?? [];
    checkPortsHeld(
      ports.map((port, i) => [port, i]),
      engine,
      null,
      tablesSince,
    );
    const id = body.id ?? randomUUID();
    if (store.getSession(id) !== undefined) {
      throw new ReaperError("SR_SESSION_EXISTS", `a session with id "${id}" already exists`);
    }
    const tomb = store.tombstone(id);
    if (tomb !== undefined) {
      throw new ReaperError(
        "SR_SESSION_EXISTS",
        `a session with id "${id}" existed: it ended at ${isoTime(tomb.endedAt)} and its id may not be used again`,
        { endedAt: isoTime(tomb.endedAt), reason: tomb.reason, outcome: tomb.outcome },
      );
    }
    return { id, profileName, profile, engine, ownerPid, timeouts, paths, ports };
  }

  /**
   * Every live descendant of the engine by lineage (through setsid, double forks and
   * re-parenting, born before this registration) and the tree seen now by its children files
   * are the session's from the start, journaled with its row; containment moves all of it into
   * the session's cgroup. From now on a fork by a member makes a member (src/proc/lineage.ts).
   */
  private track(
    id: string,
    profile: Profile,
    engine: ProcessIdentity,
    caller: Caller,
  ): { tree: ProcessIdentity[]; containment: Containment; tracking: Tracking } {
    const membership = this.deps.lineage.adopt(id, engine);
    const tree = unionOf(membership.identities(), descendantTree(engine));
    let containment: Containment;
    try {
      containment = this.contain(id, profile, engine, tree, caller.admin ? undefined : engine.uid);
    } catch (err) {
      this.deps.lineage.release(id);
      throw err;
    }
    this.deps.lineage.include(id, tree);
    return { tree, containment, tracking: trackingOf(membership, containment) };
  }

  /** The session's row and its `session.registered` event, in one transaction. */
  private commitRegistration(
    body: RegisterBody,
    caller: Caller,
    c: CheckedRegistration,
    t: { tree: ProcessIdentity[]; containment: Containment; tracking: Tracking },
    now: number,
  ): Session {
    const { store, audit } = this.deps;
    const who = registeredBy(caller);
    const session: Session = {
      id: c.id,
      profile: c.profileName,
      owner: body.owner ?? null,
      engine: c.engine,
      ownerPid: c.ownerPid,
      ports: c.ports,
      paths: c.paths,
      labels: body.labels ?? {},
      ...c.timeouts,
      createdAt: now,
      lastHeartbeatAt: now,
      lastActivityAt: now,
      deadline: deadlineOf({ createdMono: now, heartbeatMono: now, activityMono: now, ...c.timeouts }).at,
      ...NOT_YET_REAPED,
      registeredBy: who,
      containment: t.containment,
      tracking: t.tracking,
    };
    audit.transaction(() => {
      store.insertSession(session, t.tree);
      audit.record({
        event: "session.registered",
        sessionId: c.id,
        detail: {
          profile: c.profileName,
          enginePid: c.engine.pid,
          ownerPid: c.ownerPid?.pid ?? null,
          registeredBy: who,
          callerPid: caller.pid,
          containment: t.containment,
          tracking: t.tracking,
          processes: t.tree.length,
        },
      });
    });
    return session;
  }

  /**
   * The profile's containment for a new session: a cgroup where the host gives one (the
   * engine's own, or one made and filled now), else none with the reason. A profile that
   * requires a cgroup refuses the registration without one (SR_CONTAINMENT_UNAVAILABLE).
   */
  private contain(
    id: string,
    profile: Profile,
    engine: ProcessIdentity,
    tree: readonly ProcessIdentity[],
    onlyUid: number | undefined,
  ): Containment {
    if (profile.containment === "none") {
      return { kind: "none", why: `profile "${profile.name}" sets containment = "none"` };
    }
    let c: Containment;
    try {
      c = this.deps.cgroups.contain(id, engine, tree, onlyUid);
    } catch (err) {
      c = { kind: "none", why: `the engine could not be contained: ${errorMessage(err)}` };
    }
    if (c.kind === "none" && profile.containment === "cgroup") {
      throw new ReaperError(
        "SR_CONTAINMENT_UNAVAILABLE",
        `profile "${profile.name}" requires a cgroup per session (containment = "cgroup"): ${c.why}`,
        { why: c.why },
      );
    }
    return c;
  }

  heartbeat(id: string, activity: "busy" | "idle", caller: Caller): HeartbeatAnswer {
    const { registry } = this.deps;
    const live = registry.get(id);
    if (live === undefined) throw this.notLive(id, "SR_SESSION_FENCED");
    checkActor(caller, live.registeredBy, id);
    registry.beat(live, activity === "busy");
    this.deps.metrics.heartbeat();
    const d = registry.deadline(live);
    // After the beat: a busy one that moved the deadline warned of has voided the warning.
    const w = registry.warningOf(live);
    return {
      id,
      state: "live",
      deadline: isoTime(registry.toWall(d.at)),
      expiresBy: d.reason,
      warning: w === null ? null : { reason: w.reason, deadline: isoTime(w.deadline), at: isoTime(w.at) },
    };
  }

  /**
   * POST /v1/sessions/{id}/extend: the session is kept at least `sec` from now, however idle
   * (its idle deadline is never earlier; an earlier extension is never shortened), up to the
   * profile's max_extend_sec (SR_EXTEND_ABOVE_MAX beyond, naming the cap) and never past its max
   * lifetime. A missed heartbeat still reaps it. Committed (the row's extended_until, so that a
   * restart keeps it, and a `session.extended` event) before it counts; a warning given for the
   * old deadline no longer stands.
   */
  extend(id: string, sec: number, caller: Caller): ExtendedSession {
    const { registry, store, audit, config } = this.deps;
    const live = registry.get(id);
    if (live === undefined) throw this.notLive(id, "SR_SESSION_FENCED");
    checkActor(caller, live.registeredBy, id);
    const s = store.getSession(id);
    if (s === undefined || s.state !== "live") throw this.notLive(id, "SR_SESSION_FENCED");
    const max = Object.hasOwn(config.profiles, s.profile) ? (config.profiles[s.profile]?.maxExtendSec ?? 0) : 0;
    if (sec > max) {
      throw new ReaperError(
        "SR_EXTEND_ABOVE_MAX",
        max === 0
          ? `sec: profile "${s.profile}" allows no extension (max_extend_sec = 0)`
          : `sec: ${sec} exceeds the profile "${s.profile}" maximum extension of ${max} s (max_extend_sec)`,
        { maxExtendSec: max },
      );
    }
    this.requireStore();
    const until = registry.extension(live, sec);
    const after = registry.deadlinesWith(live, until.mono);
    const cappedBy = after.kept.reason === "max_lifetime" && after.kept.at < until.mono ? "max_lifetime" : null;
    const out: ExtendedSession = {
      id,
      state: "live",
      extendedUntil: isoTime(until.wall),
      keptUntil: isoTime(registry.toWall(after.kept.at)),
      cappedBy,
      deadline: isoTime(registry.toWall(after.deadline.at)),
      expiresBy: after.deadline.reason,
    };
    audit.transaction(() => {
      if (!store.setExtendedUntil(id, until.wall)) throw this.notLive(id, "SR_SESSION_FENCED");
      audit.record({
        event: "session.extended",
        sessionId: id,
        detail: {
          sec,
          extendedUntil: out.extendedUntil,
          keptUntil: out.keptUntil,
          cappedBy,
          by: { uid: caller.uid, pid: caller.pid, via: caller.via, admin: caller.admin },
        },
      });
    });
    registry.extend(live, until);
    return out;
  }

  /**
   * PATCH: a live session gains ports (each held by its engine's tree now, as at
   * registration), paths (the profile's path policy) and labels (a new value replaces the old
   * one). All or nothing: the first refusal changes nothing. Ports and paths already
   * registered are accepted as they are (idempotent retries). The same caller policy as a
   * heartbeat; one `session.updated` event with what was added.
   */
  async update(id: string, body: UpdateBody, caller: Caller): Promise<Session> {
    // The same shared reading of the network tables as registration's, begun after the ask.
    const engine = (body.ports?.length ?? 0) > 0 ? this.deps.registry.get(id)?.engine : undefined;
    const since = engine === undefined ? undefined : await portReading(engine.pid, body.ports ?? []);
    return this.updateNow(id, body, caller, since);
  }

  private updateNow(id: string, body: UpdateBody, caller: Caller, tablesSince: PortReading | undefined): Session {
    const { registry, store, audit, config } = this.deps;
    const known = registry.get(id);
    if (known === undefined) throw this.notLive(id, "SR_SESSION_FENCED");
    checkActor(caller, known.registeredBy, id);
    const s = store.getSession(id);
    if (s === undefined || s.state !== "live") throw this.notLive(id, "SR_SESSION_FENCED");
    // The update rewrites these three whole: over a damaged one it would erase what the row
    // held (paths that must never be deleted unseen) and hide the damage.
    const damaged = (["ports", "paths", "labels"] as const).map((c) => damageOf(s, c)).find((d) => d !== undefined);
    if (damaged !== undefined) {
      throw new ReaperError(
        "SR_SESSION_DAMAGED",
        `session "${id}" cannot be changed: ${whereIs(damaged)} cannot be read (${damaged.error}); it is still watched, and is reaped with its damaged values treated conservatively`,
        { damage: s.damage },
      );
    }
    const profile = config.profiles[s.profile];
    if (profile === undefined) {
      throw new ReaperError(
        "SR_UNKNOWN_PROFILE",
        `profile: the session's profile "${s.profile}" is no longer configured`,
      );
    }
    const had = { ports: new Set(s.ports), paths: new Set(s.paths) };
    const newPorts = (body.ports ?? []).map((port, i) => [port, i] as const).filter(([port]) => !had.ports.has(port));
    const newPaths: string[] = [];
    (body.paths ?? []).forEach((p, i) => {
      const path = checkPath(p, profile.allowedRoots, s.engine.uid, `paths[${i}]`).path;
      if (!had.paths.has(path) && !newPaths.includes(path)) newPaths.push(path);
    });
    const labels = { ...s.labels, ...body.labels };
    for (const [field, n] of [
      ["ports", s.ports.length + newPorts.length],
      ["paths", s.paths.length + newPaths.length],
      ["labels", Object.keys(labels).length],
    ] as const) {
      if (n > MAX_ITEMS) {
        throw new ReaperError(
          "SR_LIMIT_EXCEEDED",
          `${field}: the session would have ${n} ${field}, more than ${MAX_ITEMS}`,
          { field, count: n, max: MAX_ITEMS },
        );
      }
    }
    checkPortsHeld(newPorts, s.engine, known.cgroup, tablesSince);
    const next = { ports: [...s.ports, ...newPorts.map(([p]) => p)], paths: [...s.paths, ...newPaths], labels };
    this.requireStore();
    const changedLabels = Object.fromEntries(Object.entries(body.labels ?? {}).filter(([k, v]) => s.labels[k] !== v));
    audit.transaction(() => {
      if (!store.setAdditions(id, next)) throw this.notLive(id, "SR_SESSION_FENCED");
      audit.record({
        event: "session.updated",
        sessionId: id,
        detail: {
          added: { ports: newPorts.map(([p]) => p), paths: newPaths, labels: changedLabels },
          by: { uid: caller.uid, pid: caller.pid, via: caller.via, admin: caller.admin },
        },
      });
    });
    return this.withLiveTiming({ ...s, ...next });
  }

  /**
   * Client close (reason `closed`) or operator force-reap (reason `forced`). The fence is
   * taken at a paced turn (`loopTurn`), like the reaps' own work: an operator's burst of a
   * thousand force-reaps is then fenced a few per turn, and the heartbeats that arrive
   * meanwhile are read between them, instead of waiting behind the whole burst.
   */
  async end(id: string, reason: "closed" | "forced", caller: Caller): Promise<Session> {
    await loopTurn();
    return this.endNow(id, reason, caller);
  }

  private endNow(id: string, reason: "closed" | "forced", caller: Caller): Session {
    const s = this.deps.store.getSession(id);
    if (s === undefined) throw this.missing(id);
    checkActor(caller, s.registeredBy, id);
    const by = { uid: caller.uid, pid: caller.pid, via: caller.via, admin: caller.admin };
    if (!this.expire(id, reason, { by })) throw this.notLive(id, "SR_SESSION_NOT_LIVE");
    return this.deps.store.getSession(id) as Session;
  }

  /**
   * Fences the session and queues its reap; false if it was not live. A time-based expiry
   * carries `lagMs` (fence time minus deadline: the detector fences synchronously, on the
   * same clock reading), observed as the detection lag; evidence-based ones have no deadline.
   * The fence writes the session's last heartbeat and activity from memory. If the store
   * cannot commit, this throws SR_STORE_UNAVAILABLE and the session stays live: the
   * detector judges it again once the store commits.
   */
  expire(id: string, reason: Reason, detail: Record<string, unknown>): boolean {
    const { registry } = this.deps;
    const live = registry.get(id);
    const fenced = this.deps.reaper.begin(id, reason, detail, live?.tree ?? [], live);
    registry.remove(id);
    if (fenced && TIME_REASONS.has(reason) && typeof detail.lagMs === "number") {
      this.deps.metrics.detectedLate(reason as TimeReason, detail.lagMs);
    }
    return fenced;
  }

  /**
   * Live sessions whose deadline falls within `withinSec` from now, soonest first. The
   * (state, deadline) index narrows the candidates (a stored deadline is never later than
   * the in-memory one); the in-memory deadline decides, since heartbeats reach SQLite late.
   */
  expiring(withinSec: number): ExpiringSession[] {
    const { clock, registry } = this.deps;
    const now = clock.now();
    const mono = clock.mono();
    const until = mono + withinSec * 1000;
    const out: ExpiringSession[] = [];
    // The stored deadlines are wall-clock times, rewritten after a wall-clock step (see
    // LiveSessions.takeDirty); the monotonic deadline in memory decides.
    for (const row of this.deps.store.liveDueBy(now + withinSec * 1000)) {
      const live = registry.get(row.id);
      if (live === undefined) continue; // fenced since
      const d = registry.deadline(live);
      if (d.at > until) continue;
      out.push({ ...row, deadline: registry.toWall(d.at), expiresBy: d.reason, inSec: (d.at - mono) / 1000 });
    }
    return out.sort((a, b) => a.deadline - b.deadline || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  }

  async view(id: string): Promise<SessionView> {
    const session = this.get(id);
    const steps = this.deps.store.steps(id);
    const finished = journaled(new Map(steps.map((s) => [s.name, s])), "finish")?.usage;
    const usage = session.state === "live" ? await engineUsage(session) : (finished ?? null);
    return { session, steps, usage };
  }

  get(id: string): Session {
    const session = this.deps.store.getSession(id);
    if (session === undefined) throw this.missing(id);
    return this.withLiveTiming(session);
  }

  list(q: ListQuery): { sessions: Session[]; next: string | null } {
    let afterSeq: number | undefined;
    if (q.cursor !== undefined) {
      const decoded = Buffer.from(q.cursor, "base64url").toString("latin1");
      if (!/^\d{1,15}$/.test(decoded)) throw new ReaperError("SR_INVALID_CURSOR", "cursor: not a cursor from this API");
      afterSeq = Number(decoded);
    }
    const page = this.deps.store.list({ state: q.state, profile: q.profile, owner: q.owner, limit: q.limit, afterSeq });
    return {
      sessions: page.sessions.map((s) => this.withLiveTiming(s)),
      next:
        page.more && page.lastSeq !== null ? Buffer.from(String(page.lastSeq), "latin1").toString("base64url") : null,
    };
  }

  /** SR_STORE_UNAVAILABLE before a change the store could not commit now. */
  private requireStore(): void {
    const { store } = this.deps;
    if (store.available) return;
    throw new ReaperError(
      "SR_STORE_UNAVAILABLE",
      `the database cannot commit now (${store.lastFault ?? "?"}); retry later`,
    );
  }

  /** Heartbeats reach SQLite only at the next flush; the in-memory view is the truth. */
  private withLiveTiming(s: Session): Session {
    const live = s.state === "live" ? this.deps.registry.get(s.id) : undefined;
    if (live === undefined) return s;
    const warning = this.deps.registry.warningOf(live);
    return {
      ...s,
      lastHeartbeatAt: live.lastHeartbeatAt,
      lastActivityAt: live.lastActivityAt,
      deadline: this.deps.registry.wallDeadline(live),
      extendedUntil: live.extendedUntil ?? s.extendedUntil ?? null,
      warning: warning === null ? null : { reason: warning.reason, deadline: warning.deadline, at: warning.at },
    };
  }

  /**
   * An id with no session: 410 SR_SESSION_GONE when its record was purged (its tombstone: when
   * and why it ended), else 404. A client must not read a purged session as one to register again.
   */
  private missing(id: string): ReaperError {
    const t = this.deps.store.tombstone(id);
    if (t === undefined) return new ReaperError("SR_SESSION_NOT_FOUND", `no session has id "${id}"`);
    const ended = isoTime(t.endedAt);
    return new ReaperError(
      "SR_SESSION_GONE",
      `session "${id}" ended at ${ended}${t.reason ? ` (${t.reason}` : ""}${t.outcome ? `, ${t.outcome})` : t.reason ? ")" : ""}; its record was purged`,
      { endedAt: ended, reason: t.reason, outcome: t.outcome },
    );
  }

  private notLive(id: string, code: "SR_SESSION_FENCED" | "SR_SESSION_NOT_LIVE"): ReaperError {
    const s = this.deps.store.getSession(id);
    if (s === undefined) return this.missing(id);
    if (s.state === "damaged") {
      return new ReaperError(
        "SR_SESSION_DAMAGED",
        `session "${id}" is damaged: its engine cannot be identified (${describeDamage(engineDamage(s))}), so the daemon no longer watches it nor signals anything for it; close or force-reap it once its processes are dealt with`,
        { state: s.state, damage: s.damage },
      );
    }
    return new ReaperError(code, `session "${id}" is ${s.state}${s.reason ? ` (${s.reason})` : ""}`, {
      state: s.state,
      reason: s.reason,
    });
  }
}

/**
 * Timeouts may only be shortened: a request above the profile's value is refused with
 * SR_TIMEOUT_ABOVE_MAX (not clamped), so a client never believes it has more time than it has.
 */
function clampTimeouts(
  body: RegisterBody,
  p: Profile,
): { heartbeatTimeoutSec: number; idleTimeoutSec: number; maxLifetimeSec: number } {
  const check = (field: string, asked: number | undefined, max: number): number => {
    if (asked === undefined) return max;
    if (asked > max) {
      throw new ReaperError(
        "SR_TIMEOUT_ABOVE_MAX",
        `${field}: ${asked} exceeds the profile "${p.name}" maximum of ${max}`,
      );
    }
    return asked;
  };
  let maxLifetimeSec = body.maxLifetimeSec ?? p.maxLifetimeSec;
  if (p.maxLifetimeSec > 0 && (maxLifetimeSec === 0 || maxLifetimeSec > p.maxLifetimeSec)) {
    throw new ReaperError(
      "SR_TIMEOUT_ABOVE_MAX",
      `maxLifetimeSec: ${maxLifetimeSec === 0 ? "0 (no limit)" : maxLifetimeSec} exceeds the profile "${p.name}" maximum of ${p.maxLifetimeSec}`,
    );
  }
  if (maxLifetimeSec < 0) maxLifetimeSec = 0;
  return {
    heartbeatTimeoutSec: check("heartbeatTimeoutSec", body.heartbeatTimeoutSec, p.heartbeatTimeoutSec),
    idleTimeoutSec: check("idleTimeoutSec", body.idleTimeoutSec, p.idleTimeoutSec),
    maxLifetimeSec,
  };
}

/**
 * What checking declared ports reads, begun after the ask and awaited before the synchronous
 * check: the network tables (one shared reading, `since`), and, when the engine alone does not
 * hold every port, a fresh snapshot of /proc for its tree (the shared paced walk: the check
 * never walks /proc on the loop in one go).
 */
interface PortReading {
  since: number;
  table?: ProcessTable;
}

async function portReading(pid: number, ports: readonly number[]): Promise<PortReading> {
  const since = await freshTables(pid);
  if (heldOf([pid], new Set(ports), since).size >= new Set(ports).size) return { since };
  return { since, table: await freshTable() };
}

/**
 * Every declared port must be held by the engine's process tree (a TCP LISTEN socket, or a
 * bound UDP socket) right now: the reaper later test-binds and reports these ports, so a
 * caller may not name a port that belongs to someone else. SR_PORT_NOT_OWNED otherwise.
 *
 * The engine is part of its tree, so when the engine itself holds every declared port (the
 * common case) the answer is that without a walk of /proc for the tree, as long as the
 * engine is still the process identified (checked after its fds were read: a pid is not
 * reused while its process lives). Otherwise the whole tree is taken, as always.
 */
function checkPortsHeld(
  declared: readonly (readonly [port: number, index: number])[],
  engine: ProcessIdentity,
  cgroup: string | null,
  reading: PortReading | undefined,
): void {
  if (declared.length === 0) return;
  const ports = declared.map(([port]) => port);
  const wanted = new Set(ports);
  const tablesSince = reading?.since;
  let held = heldOf([engine.pid], wanted, tablesSince);
  if (held.size < wanted.size || liveness(engine) !== "alive") {
    // The tree, and a contained session's cgroup: what a launcher started and left (a
    // daemonized server, re-parented away from the tree) is still in there.
    const tree = reading?.table !== undefined ? reading.table.tree(engine) : descendantTree(engine);
    const pids = new Set(tree.map((p) => p.pid));
    if (cgroup !== null) for (const pid of cgroupPids(cgroup)) pids.add(pid);
    held = heldOf([...pids], wanted, tablesSince);
  }
  const missing = declared.find(([port]) => !held.has(port));
  if (missing === undefined) return;
  const [port, i] = missing;
  // Whether anyone listens there is visible to every local user in /proc/net anyway.
  const inUse = inetSockets(engine.pid, new Set([port])).some(
    (s) => s.localPort === port && (s.state === "LISTEN" || (s.proto.startsWith("udp") && s.remotePort === 0)),
  );
  throw new ReaperError(
    "SR_PORT_NOT_OWNED",
    `ports[${i}]: port ${port} is not held by the engine (pid ${engine.pid}) or its descendants: ${
      inUse ? "another process holds it" : "no process listens on it"
    }`,
    { port },
  );
}

async function engineUsage(s: Session): Promise<EngineUsage | null> {
  if (liveness(s.engine) !== "alive") return null;
  try {
    const u = await pidusage(s.engine.pid);
    return { cpu: u.cpu, memory: u.memory, elapsed: u.elapsed };
  } catch {
    return null;
  }
}

/** Two lists of identities as one, each process once (the first list's entry kept). */
function unionOf(a: readonly ProcessIdentity[], b: readonly ProcessIdentity[]): ProcessIdentity[] {
  const out = new Map<string, ProcessIdentity>();
  for (const p of [...a, ...b]) {
    const key = processKey(p);
    if (!out.has(key)) out.set(key, p);
  }
  return [...out.values()];
}
