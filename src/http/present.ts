import type { OrphanFinding } from "../orphans/sweep.js";
import type { SessionUsage } from "../cleanup/usage.js";
import type { EngineUsage, ExpiringSession } from "../sessions/sessions.js";
import type { Session, StepResult } from "../model/session.js";
import type { StoredEvent } from "../store/store.js";

const iso = (ms: number | null): string | null => (ms === null ? null : new Date(ms).toISOString());

/** The session as the API shows it: the API's names (docs/api.md), times in ISO 8601 UTC. */
export function sessionJson(s: Session, steps?: readonly StepResult[], usage?: EngineUsage | SessionUsage | null) {
  return {
    id: s.id,
    profile: s.profile,
    owner: s.owner,
    engine: s.engine,
    ownerPid: s.ownerPid,
    ports: s.ports,
    paths: s.paths,
    labels: s.labels,
    heartbeatTimeoutSec: s.heartbeatTimeoutSec,
    idleTimeoutSec: s.idleTimeoutSec,
    maxLifetimeSec: s.maxLifetimeSec,
    state: s.state,
    reason: s.reason,
    outcome: s.outcome,
    leftovers: s.leftovers,
    createdAt: iso(s.createdAt),
    lastHeartbeatAt: iso(s.lastHeartbeatAt),
    lastActivityAt: iso(s.lastActivityAt),
    deadline: iso(s.deadline),
    reapStartedAt: iso(s.reapStartedAt),
    reapedAt: iso(s.reapedAt),
    extendedUntil: iso(s.extendedUntil ?? null),
    warning:
      s.warning === null || s.warning === undefined
        ? null
        : {
            reason: s.warning.reason,
            deadline: new Date(s.warning.deadline).toISOString(),
            at: new Date(s.warning.at).toISOString(),
          },
    reapAttempts: s.reapAttempts,
    registeredBy: s.registeredBy,
    containment: s.containment,
    tracking: s.tracking,
    damage: s.damage,
    ...(steps === undefined ? {} : { steps: steps.map(stepJson) }),
    ...(usage === undefined ? {} : { usage }),
  };
}

export function stepJson(r: StepResult) {
  return {
    name: r.name,
    outcome: r.outcome,
    startedAt: iso(r.startedAt),
    durationMs: Math.round(r.durationMs),
    detail: r.detail,
    ...(r.damage === undefined ? {} : { damage: r.damage }),
  };
}

export function eventJson(e: StoredEvent) {
  return {
    seq: e.seq,
    time: iso(e.at),
    event: e.event,
    sessionId: e.sessionId,
    reason: e.reason,
    step: e.step,
    outcome: e.outcome,
    durationMs: e.durationMs,
    detail: e.detail,
    ...(e.damage === undefined ? {} : { damage: e.damage }),
  };
}

export function expiringJson(e: ExpiringSession) {
  return {
    id: e.id,
    profile: e.profile,
    owner: e.owner,
    deadline: new Date(e.deadline).toISOString(),
    expiresBy: e.expiresBy,
    inSec: e.inSec,
  };
}

export function orphanJson(f: OrphanFinding) {
  return {
    kind: f.kind,
    profile: f.profile,
    action: f.action,
    sessionId: f.sessionId,
    adopted: f.adopted,
    firstSeenAt: new Date(f.firstSeenAt).toISOString(),
    ageSec: f.ageSec,
    uid: f.uid,
    pid: f.pid,
    startTime: f.startTime,
    exe: f.exe,
    cmdline: f.cmdline,
    path: f.path,
    processes: f.processes,
    ports: f.ports,
    detail: f.detail,
  };
}

/** One finding of GET /v1/orphans, as clients receive it. */
export type OrphanJson = ReturnType<typeof orphanJson>;

/** One entry of GET /v1/expiring, as clients receive it. */
export type ExpiringJson = ReturnType<typeof expiringJson>;
