/**
 * The sessions table's rows, and how a row is read as a session (never throwing on a damaged
 * value: src/store/columns.ts).
 */
import type { Outcome, Reason, Session, SessionState, Tracking } from "../model/session.js";
import { TRACKINGS } from "../model/session.js";
import { ENGINE_READABLE, RowReading, engineReadable } from "./columns.js";

export interface SessionRow {
  seq: number;
  id: string;
  profile: string;
  owner: string | null;
  // What the row should hold; src/store/columns.ts reads what it does hold (issue 22).
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
  containment: string | null;
  tree: string | null;
  tracking: string | null;
  extended_until?: number | null;
}

export /** A sessions row's reading: its key names the row in every finding. */
const sessionRow = (r: Pick<SessionRow, "seq" | "id">): RowReading =>
  new RowReading("sessions", { seq: r.seq, id: r.id });

/**
 * A row as a session. Never throws on a damaged value (src/store/columns.ts): the session says
 * what could not be read in `damage`, and a live one whose engine cannot be identified is
 * `damaged`.
 */
export function toSession(r: SessionRow): Session {
  const read = sessionRow(r);
  const engine = read.engine(r);
  const ownerPid = read.owner(r);
  const session: Session = {
    id: r.id,
    profile: r.profile,
    owner: r.owner,
    engine,
    ownerPid,
    ports: read.json("ports", "ports", r.ports, []),
    paths: read.json("paths", "paths", r.paths, []),
    labels: read.json("labels", "labels", r.labels, {}),
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
    leftovers: read.nullableJson("leftovers", "leftovers", r.leftovers, []) ?? [],
    reapStartedAt: r.reap_started_at,
    reapedAt: r.reaped_at,
    reapAttempts: r.reap_attempts,
    registeredBy: { uid: r.registered_by_uid, admin: r.registered_as_admin === 1, via: r.registered_via },
    containment: read.nullableJson("containment", "containment", r.containment, null),
    tracking: (TRACKINGS as readonly string[]).includes(r.tracking ?? "") ? (r.tracking as Tracking) : null,
    damage: read.damage,
    // Only when extended: a session never extended reads as it was written.
    ...(typeof r.extended_until === "number" ? { extendedUntil: r.extended_until } : {}),
  };
  // Nothing watches a session whose engine cannot be identified: no deadline applies to it.
  return r.state === "live" && !engineReadable(session) ? { ...session, state: "damaged", deadline: null } : session;
}

/** A live row whose engine cannot be identified counts as `damaged` (see ENGINE_READABLE). */
export const STATE_OF_ROW = `CASE WHEN state = 'live' AND NOT ${ENGINE_READABLE} THEN 'damaged' ELSE state END`;
