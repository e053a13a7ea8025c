/**
 * JSON schemas for every body, query and path parameter the API accepts. The routes
 * validate with exactly these objects (additionalProperties: false everywhere), and the
 * OpenAPI document is generated from them: one source of truth.
 *
 * The response schemas below document what the routes answer (they sit in each route's
 * `schema.response`, which is where the OpenAPI document reads them); they do not drive
 * serialization (server.ts keeps JSON.stringify), and test/http/openapi.test.ts validates
 * real answers against them so they cannot drift from present.ts.
 */
import { AUDIT_EVENTS } from "../audit/audit.js";
import { MAX_ITEMS } from "../model/requests.js";
import { REASONS, SESSION_STATES, STEP_NAMES, TRACKINGS } from "../model/session.js";

export const SESSION_ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$";

const timeout = (minimum: number) => ({ type: "integer", minimum, maximum: 315360000 }) as const;

export const registerBody = {
  type: "object",
  additionalProperties: false,
  required: ["engine"],
  properties: {
    id: { type: "string", pattern: SESSION_ID_PATTERN },
    profile: { type: "string", minLength: 1, maxLength: 64 },
    owner: { type: "string", maxLength: 256 },
    engine: {
      type: "object",
      additionalProperties: false,
      required: ["pid"],
      // A number, not an integer: every pid problem answers SR_INVALID_PID.
      properties: { pid: { type: "number" } },
    },
    ownerPid: { type: "number" },
    ports: {
      type: "array",
      maxItems: MAX_ITEMS,
      uniqueItems: true,
      items: { type: "integer", minimum: 1, maximum: 65535 },
    },
    paths: {
      type: "array",
      maxItems: MAX_ITEMS,
      uniqueItems: true,
      items: { type: "string", minLength: 1, maxLength: 4096 },
    },
    heartbeatTimeoutSec: timeout(1),
    idleTimeoutSec: timeout(1),
    maxLifetimeSec: timeout(0),
    labels: {
      type: "object",
      maxProperties: MAX_ITEMS,
      propertyNames: { pattern: "^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$" },
      additionalProperties: { type: "string", maxLength: 256 },
    },
  },
} as const;

/** PATCH /v1/sessions/{id}: what a live session gains (ports, paths, labels), at least one. */
export const updateBody = {
  type: "object",
  additionalProperties: false,
  minProperties: 1,
  properties: {
    ports: registerBody.properties.ports,
    paths: registerBody.properties.paths,
    labels: registerBody.properties.labels,
  },
} as const;

export const heartbeatBody = {
  type: "object",
  additionalProperties: false,
  properties: { activity: { enum: ["busy", "idle"] } },
} as const;

export const extendBody = {
  type: "object",
  additionalProperties: false,
  required: ["sec"],
  properties: {
    sec: {
      type: "integer",
      minimum: 1,
      maximum: 10 * 365 * 86400,
      description: "keep the session at least this long from now (its idle deadline); capped by max_extend_sec",
    },
  },
} as const;

export const emptyBody = { type: "object", additionalProperties: false, properties: {} } as const;

export const sessionIdParams = {
  type: "object",
  additionalProperties: false,
  required: ["id"],
  properties: { id: { type: "string", pattern: SESSION_ID_PATTERN } },
} as const;

export const listQuery = {
  type: "object",
  additionalProperties: false,
  properties: {
    state: { enum: SESSION_STATES },
    profile: { type: "string", minLength: 1, maxLength: 64 },
    owner: { type: "string", maxLength: 256 },
    limit: { type: "integer", minimum: 1, maximum: 1000, default: 100 },
    cursor: { type: "string", maxLength: 64 },
  },
} as const;

export const noQuery = { type: "object", additionalProperties: false, properties: {} } as const;

export const expiringQuery = {
  type: "object",
  additionalProperties: false,
  properties: {
    // Up to a year ahead.
    withinSec: { type: "integer", minimum: 1, maximum: 31536000, default: 60 },
  },
} as const;

// --- responses (documentation, checked by the tests) ----------------------------------------

const time = { type: "string", format: "date-time" } as const;
const timeOrNull = { type: ["string", "null"], format: "date-time" } as const;
const TIME_REASONS = ["heartbeat_timeout", "idle_timeout", "max_lifetime"] as const;

const processIdentity = {
  type: "object",
  additionalProperties: false,
  required: ["pid", "startTime", "bootId", "uid"],
  properties: {
    pid: { type: "integer" },
    startTime: { type: "integer", description: "/proc/<pid>/stat field 22, clock ticks after boot" },
    bootId: { type: "string" },
    uid: { type: "integer" },
  },
} as const;

/** One reading of /proc/<pid>/ (src/model/evidence.ts); a field is null where its file could not be read. */
const processReading = {
  type: "object",
  additionalProperties: false,
  required: ["at", "state", "wchan", "syscall", "stack", "cgroups"],
  properties: {
    at: { type: "integer", description: "when it was read, ms since the epoch" },
    state: { type: ["string", "null"], description: "/proc/<pid>/stat's state: D is uninterruptible sleep" },
    wchan: { type: ["string", "null"], description: "/proc/<pid>/wchan: the kernel function it sleeps in" },
    syscall: { type: ["string", "null"], description: "/proc/<pid>/syscall" },
    stack: {
      type: ["array", "null"],
      items: { type: "string" },
      description: "/proc/<pid>/stack, its innermost frames (null: not readable)",
    },
    stackOmitted: { type: "integer", description: "frames left out" },
    cgroups: { type: "array", items: { type: "string" }, description: "/proc/<pid>/cgroup" },
  },
} as const;

/** Why an unkillable process does not die: readings before its SIGKILL and after the wait. */
const unkillableEvidence = {
  type: "object",
  additionalProperties: false,
  required: ["before", "after", "stateSince", "inStateSec", "sinceKillSec"],
  properties: {
    before: { oneOf: [{ type: "null" }, processReading] },
    after: processReading,
    stateSince: { type: "integer", description: "ms since the epoch: the first reading that saw it in after.state" },
    inStateSec: { type: "number", description: "seconds in that state, at least" },
    sinceKillSec: { type: "number", description: "seconds from its first SIGKILL to the after reading" },
  },
} as const;

const leftover = {
  type: "object",
  additionalProperties: false,
  required: ["step", "kind", "item", "detail"],
  properties: {
    step: { enum: STEP_NAMES },
    kind: {
      enum: ["process", "port", "socket", "path", "ipc", "hook", "unkillable"],
      description:
        "unkillable: a process still alive profiles.NAME.unkillable_timeout_sec after its SIGKILL; watched until it dies, then the reap is resolved (reap.resolved)",
    },
    item: { type: "string" },
    detail: { type: "string" },
    pid: { type: "integer" },
    comm: { type: "string" },
    uid: { type: "integer" },
    why: { type: "string" },
    startTime: { type: "integer", description: "an unkillable process's start time (/proc/<pid>/stat field 22)" },
    evidence: unkillableEvidence,
  },
} as const;

/** A stored value that could not be read (a damaged row): where it is and what is wrong. */
const damage = {
  type: "object",
  additionalProperties: false,
  required: ["table", "row", "column", "error"],
  properties: {
    table: { enum: ["sessions", "reap_steps", "audit_events"] },
    row: {
      type: "object",
      description: "the row's key: sessions { seq, id }, reap_steps { session_id, name }, audit_events { seq }",
      additionalProperties: { type: ["string", "integer"] },
    },
    column: { type: "string" },
    error: { type: "string" },
  },
} as const;

const stepResult = {
  type: "object",
  additionalProperties: false,
  required: ["name", "outcome", "startedAt", "durationMs", "detail"],
  properties: {
    name: { enum: STEP_NAMES },
    outcome: { enum: ["ok", "failed", "timeout"] },
    startedAt: time,
    durationMs: { type: "integer", minimum: 0 },
    detail: { type: "object" },
    damage: { ...damage, description: "the stored record's detail cannot be read (then detail is {})" },
  },
} as const;

/** A live session's standing warning (in the session and in each heartbeat's answer). */
const standingWarning = {
  description:
    "while live: the warning given (session.warning, profiles.NAME.warn_before_sec) and still standing; activity that moves the deadline voids it",
  oneOf: [
    { type: "null" },
    {
      type: "object",
      additionalProperties: false,
      required: ["reason", "deadline", "at"],
      properties: {
        reason: { enum: ["idle_timeout", "max_lifetime", "memory_pressure"] },
        deadline: { ...time, description: "when the session is reaped unless it is active first" },
        at: { ...time, description: "when the warning was given" },
      },
    },
  ],
} as const;

export const sessionResponse = {
  type: "object",
  additionalProperties: false,
  required: [
    "id",
    "profile",
    "owner",
    "engine",
    "ownerPid",
    "ports",
    "paths",
    "labels",
    "heartbeatTimeoutSec",
    "idleTimeoutSec",
    "maxLifetimeSec",
    "state",
    "reason",
    "outcome",
    "leftovers",
    "createdAt",
    "lastHeartbeatAt",
    "lastActivityAt",
    "deadline",
    "reapStartedAt",
    "reapedAt",
    "reapAttempts",
    "registeredBy",
    "damage",
  ],
  properties: {
    id: { type: "string", pattern: SESSION_ID_PATTERN },
    profile: { type: "string" },
    owner: { type: ["string", "null"] },
    engine: processIdentity,
    ownerPid: { oneOf: [{ type: "null" }, processIdentity] },
    ports: { type: "array", items: { type: "integer" } },
    paths: { type: "array", items: { type: "string" } },
    labels: { type: "object", additionalProperties: { type: "string" } },
    heartbeatTimeoutSec: { type: "integer" },
    idleTimeoutSec: { type: "integer" },
    maxLifetimeSec: { type: "integer", description: "0: no maximum lifetime" },
    state: {
      enum: SESSION_STATES,
      description:
        "damaged: live, but its engine cannot be identified (its stored identity is damaged): nothing watches it and nothing is signalled for it; it leaves the state by a close or a force-reap",
    },
    reason: { enum: [...REASONS, null] },
    outcome: { enum: ["clean", "partial", "failed", null] },
    leftovers: { type: "array", items: leftover },
    createdAt: time,
    lastHeartbeatAt: time,
    lastActivityAt: time,
    deadline: {
      ...timeOrNull,
      description: "the earliest time-based expiry while live; null once fenced, and while damaged",
    },
    reapStartedAt: timeOrNull,
    reapedAt: timeOrNull,
    extendedUntil: {
      ...timeOrNull,
      description: "an extension (POST /v1/sessions/{id}/extend): while live, its idle deadline is at least this",
    },
    warning: standingWarning,
    reapAttempts: { type: "integer", minimum: 0 },
    registeredBy: {
      type: "object",
      additionalProperties: false,
      required: ["uid", "admin", "via"],
      description: "who registered the session: the unix socket peer's uid (SO_PEERCRED)",
      properties: {
        uid: {
          type: ["integer", "null"],
          description: "null for a loopback TCP caller, or a session registered before caller identity existed",
        },
        admin: {
          type: "boolean",
          description: "the caller was an administrator (root, the daemon's uid, api.admin_group, TCP token)",
        },
        via: { enum: ["unix", "tcp", null] },
      },
    },
    containment: {
      description:
        "how the session's processes are contained: a cgroup of its own (made by the daemon, or the engine's own scope), or none and why; null for sessions registered before containment existed",
      oneOf: [
        { type: "null" },
        {
          type: "object",
          additionalProperties: false,
          required: ["kind", "path", "made"],
          properties: { kind: { const: "cgroup" }, path: { type: "string" }, made: { type: "boolean" } },
        },
        {
          type: "object",
          additionalProperties: false,
          required: ["kind", "why"],
          properties: { kind: { const: "none" }, why: { type: "string" } },
        },
      ],
    },
    damage: {
      type: "array",
      items: damage,
      description:
        "stored values of the session's row that cannot be read (a damaged row; empty when intact): each reads as nothing, and what depends on it is treated conservatively (a damaged session is never reaped clean)",
    },
    tracking: {
      enum: [...TRACKINGS, null],
      description:
        "how the session's processes were known, strongest first: lineage (every fork since the engine's birth, from the kernel's process events), cgroup-from-birth (the engine's own cgroup, nothing in it older than the engine), cgroup (the engine's tree moved into a cgroup at registration), snapshots (walks of /proc and the cookie); null for sessions registered before tracking was recorded",
    },
    warnings: {
      type: "array",
      description:
        "POST /v1/sessions only: what the registration could not give (tracking weaker than lineage, and why)",
      items: {
        type: "object",
        additionalProperties: false,
        required: ["code", "message"],
        properties: { code: { type: "string" }, message: { type: "string" } },
      },
    },
    steps: { type: "array", items: stepResult, description: "GET /v1/sessions/{id} only" },
    usage: {
      description:
        "GET /v1/sessions/{id} only: while live, the engine's usage now; once reaped, what the whole session used; else null",
      oneOf: [
        { type: "null" },
        {
          type: "object",
          additionalProperties: false,
          required: ["cpu", "memory", "elapsed"],
          properties: {
            cpu: { type: "number", description: "percent of one core since the previous read" },
            memory: { type: "number", description: "resident bytes" },
            elapsed: { type: "number", description: "ms since the engine process started" },
          },
        },
        {
          type: "object",
          additionalProperties: false,
          required: ["cpuSec", "peakMemoryBytes", "peakMemorySource", "peakProcesses", "lifetimeSec"],
          properties: {
            cpuSec: { type: "number", description: "CPU seconds (the cgroup's total when contained)" },
            peakMemoryBytes: { type: "number" },
            peakMemorySource: {
              enum: ["memory.peak", "rss-samples"],
              description: "the cgroup's memory.peak, or the largest resident sum sampled",
            },
            peakProcesses: { type: "integer" },
            lifetimeSec: { type: "number", description: "registration to fence" },
          },
        },
      ],
    },
  },
} as const;

export const sessionListResponse = {
  type: "object",
  additionalProperties: false,
  required: ["sessions", "next"],
  properties: {
    sessions: { type: "array", items: sessionResponse },
    next: { type: ["string", "null"], description: "cursor of the next page, or null" },
  },
} as const;

export const heartbeatResponse = {
  type: "object",
  additionalProperties: false,
  required: ["id", "state", "deadline", "expiresBy", "warning"],
  properties: {
    id: { type: "string" },
    state: { const: "live" },
    deadline: time,
    expiresBy: { enum: TIME_REASONS },
    warning: standingWarning,
  },
} as const;

export const extendResponse = {
  type: "object",
  additionalProperties: false,
  required: ["id", "state", "extendedUntil", "keptUntil", "cappedBy", "deadline", "expiresBy"],
  properties: {
    id: { type: "string" },
    state: { const: "live" },
    extendedUntil: { ...time, description: "the idle deadline is at least this while the session is live" },
    keptUntil: {
      ...time,
      description:
        "when the session is reaped if it stays idle and keeps heartbeating: its idle deadline, or its max lifetime",
    },
    cappedBy: {
      enum: ["max_lifetime", null],
      description: "max_lifetime: the session's max lifetime ends before the extension does",
    },
    deadline: { ...time, description: "the earliest deadline now (a missed heartbeat still reaps it)" },
    expiresBy: { enum: TIME_REASONS },
  },
} as const;

export const eventsResponse = {
  type: "object",
  additionalProperties: false,
  required: ["events"],
  properties: {
    events: {
      type: "array",
      items: {
        type: "object",
        additionalProperties: false,
        required: ["seq", "time", "event", "sessionId", "reason", "step", "outcome", "durationMs", "detail"],
        properties: {
          seq: { type: "integer" },
          time,
          event: { enum: AUDIT_EVENTS },
          sessionId: { type: ["string", "null"] },
          reason: { type: ["string", "null"] },
          step: { type: ["string", "null"] },
          outcome: { type: ["string", "null"] },
          durationMs: { type: ["integer", "null"] },
          detail: { type: ["object", "null"] },
          damage: { ...damage, description: "the stored detail cannot be read (then detail is null)" },
        },
      },
    },
  },
} as const;

/**
 * GET /v1/events (src/http/events-stream.ts): follow, one session, and the seq to resume after.
 * `follow` is 0 or 1 only (an integer, so "1" and never "true", "yes" or an empty value).
 */
export const eventStreamQuery = {
  type: "object",
  additionalProperties: false,
  properties: {
    follow: {
      type: "integer",
      enum: [0, 1],
      default: 0,
      description: "1: after the backlog, keep the response open and write each event as it is committed",
    },
    session: {
      type: "string",
      pattern: SESSION_ID_PATTERN,
      description: "only this session's events (a non-admin: a session it registered)",
    },
    since: {
      type: "integer",
      minimum: 0,
      maximum: 999999999999999,
      description:
        "only events with a seq above this one (the last seq a client saw: it resumes with no gap and no duplicate); without it, follow=1 starts at the newest event and follow=0 at the oldest kept",
    },
  },
} as const;

/** One line of GET /v1/events: an event of GET /v1/sessions/{id}/events, with seq null for one never stored. */
export const eventStreamLine = {
  ...eventsResponse.properties.events.items,
  description:
    "each line of the body is one such JSON object (NDJSON); an empty line is a keep-alive, sent to a follower after 15 to 20 s without a line",
  properties: {
    ...eventsResponse.properties.events.items.properties,
    seq: {
      type: ["integer", "null"],
      description:
        "audit_events' seq, in commit order; null for an event the daemon could not store (detail.stored false: followers only, never in a backlog)",
    },
  },
} as const;

export const expiringResponse = {
  type: "object",
  additionalProperties: false,
  required: ["sessions"],
  properties: {
    sessions: {
      type: "array",
      description: "soonest deadline first",
      items: {
        type: "object",
        additionalProperties: false,
        required: ["id", "profile", "owner", "deadline", "expiresBy", "inSec"],
        properties: {
          id: { type: "string" },
          profile: { type: "string" },
          owner: { type: ["string", "null"] },
          deadline: time,
          expiresBy: { enum: TIME_REASONS },
          inSec: { type: "number", description: "seconds until the deadline; negative when overdue" },
        },
      },
    },
  },
} as const;

export const orphansResponse = {
  type: "object",
  additionalProperties: false,
  required: ["enabled", "sweptAt", "findings"],
  properties: {
    enabled: { type: "boolean", description: "false when no profile declares an [orphans] matcher" },
    sweptAt: { ...timeOrNull, description: "when the last sweep ran (the findings are its); null before the first" },
    findings: {
      type: "array",
      description:
        "the last sweep's findings; `action` and `sessionId` show what reap mode does (or would do) with each: the listing is the dry run",
      items: {
        type: "object",
        additionalProperties: false,
        required: [
          "kind",
          "profile",
          "action",
          "sessionId",
          "adopted",
          "firstSeenAt",
          "ageSec",
          "uid",
          "pid",
          "startTime",
          "exe",
          "cmdline",
          "path",
          "processes",
          "ports",
          "detail",
        ],
        properties: {
          kind: { enum: ["process", "path", "identity_mismatch"] },
          profile: { type: "string" },
          action: { enum: ["report", "reap"], description: "identity_mismatch: always report" },
          sessionId: {
            type: "string",
            description:
              "process, path: the synthetic session (reason orphaned) it became in reap mode, or would become; identity_mismatch: the live session concerned",
          },
          adopted: { type: "boolean", description: "it became that session (reap mode)" },
          firstSeenAt: time,
          ageSec: { type: "integer", minimum: 0, description: "since the process started, or the path's mtime" },
          uid: { type: "integer", description: "the process's real uid, or the path's owner" },
          pid: { type: ["integer", "null"] },
          startTime: { type: ["integer", "null"], description: "/proc/<pid>/stat field 22" },
          exe: { type: ["string", "null"] },
          cmdline: { type: ["string", "null"] },
          path: { type: ["string", "null"] },
          processes: {
            type: "array",
            items: { type: "integer" },
            description: "process: the pids of its tree, which reap mode terminates",
          },
          ports: {
            type: "array",
            items: { type: "integer" },
            description: "process: the ports its tree holds, which reap mode verifies free",
          },
          detail: {
            type: ["string", "null"],
            description: "identity_mismatch: what differs; reap mode: why it was not made a session",
          },
        },
      },
    },
  },
} as const;

export const daemonResponse = {
  type: "object",
  additionalProperties: false,
  required: ["state", "version", "startedAt", "counts"],
  properties: {
    state: { enum: ["running", "shutting_down"] },
    version: { type: "string" },
    startedAt: time,
    database: { type: "string", description: "the SQLite database's path (store.path): what reaperctl backup copies" },
    lineage: {
      type: "object",
      additionalProperties: false,
      required: ["available", "events", "lost", "processes"],
      description:
        "the kernel's process events connector: whether the daemon reads it (and why not), events read, events lost (each loss falls the sessions of the moment back to walks), processes in the lineage table",
      properties: {
        available: { type: "boolean" },
        why: { type: "string" },
        events: { type: "integer" },
        lost: { type: "integer" },
        processes: { type: "integer" },
      },
    },
    counts: {
      type: "object",
      additionalProperties: false,
      required: ["live", "reaping", "reaped"],
      properties: {
        live: { type: "integer" },
        reaping: { type: "integer" },
        reaped: { type: "integer" },
        damaged: {
          type: "integer",
          description: "present when any session is damaged (live, its engine unidentified: an operator's)",
        },
      },
    },
  },
} as const;

export const healthResponse = {
  type: "object",
  additionalProperties: false,
  required: ["status"],
  properties: { status: { const: "ok" } },
} as const;

export const readyResponse = {
  type: "object",
  additionalProperties: false,
  required: ["ready", "state"],
  properties: { ready: { type: "boolean" }, state: { enum: ["running", "shutting_down"] } },
} as const;

/** A response in another media type than JSON (fastify's `content` form of a response schema). */
export const textResponse = (mediaType: string, description: string) =>
  ({ description, content: { [mediaType]: { schema: { type: "string" } } } }) as const;
