import type { Profile } from "../config/load.js";
import { ReaperError } from "../errors.js";
import type { ProcessIdentity, RegisteredBy } from "../model/session.js";
import type { Caller } from "./caller.js";

/**
 * The daemon's authorisation rules, in one place. The daemon runs with the power to signal
 * any process and delete any directory; these rules make sure a caller gets no more of that
 * power than it already has on its own account.
 *
 * - Reading is open to whoever can connect (the socket's mode and group decide who can).
 * - Changing anything needs known credentials (SO_PEERCRED worked).
 * - A non-admin may register only processes (engine, owner) running under its own uid; the
 *   paths must belong to the engine's uid (checkPath), the ports must be held by the engine.
 * - A profile's allowed_uids limits the engine uid for everyone, admins included.
 * - Only the registering uid or an admin may heartbeat, close or force-reap a session.
 * - A session a non-admin registered is reaped with that user's power: tree members and
 *   cgroup members of another uid are not signalled (see `maySignal`).
 */
export function requireKnown(caller: Caller): void {
  if (!caller.known) {
    throw new ReaperError(
      "SR_CALLER_UNKNOWN",
      "the daemon could not read this connection's peer credentials (SO_PEERCRED); nothing may be changed",
    );
  }
}

export function checkRegistration(
  caller: Caller,
  profile: Profile,
  engine: ProcessIdentity,
  ownerPid: ProcessIdentity | null,
): void {
  requireKnown(caller);
  if (!caller.admin) {
    for (const [field, p] of [
      ["engine.pid", engine],
      ["ownerPid", ownerPid],
    ] as const) {
      if (p !== null && p.uid !== caller.uid) {
        throw new ReaperError(
          "SR_PROCESS_NOT_OWNED",
          `${field}: process ${p.pid} runs as uid ${p.uid}, not as the caller's uid ${caller.uid}; only an admin may register another user's process`,
          { pid: p.pid },
        );
      }
    }
  }
  if (profile.allowedUids !== null && !profile.allowedUids.includes(engine.uid)) {
    throw new ReaperError(
      "SR_UID_NOT_ALLOWED",
      `engine.pid: the engine runs as uid ${engine.uid}, which profile "${profile.name}" does not allow (allowed_uids)`,
      { uid: engine.uid },
    );
  }
}

/** Heartbeat, close, force-reap: the registering uid or an admin. */
export function checkActor(caller: Caller, registeredBy: RegisteredBy, sessionId: string): void {
  requireKnown(caller);
  if (caller.admin) return;
  if (caller.uid !== null && caller.uid === registeredBy.uid) return;
  throw new ReaperError(
    "SR_NOT_SESSION_OWNER",
    `session "${sessionId}" was registered by ${registeredBy.uid === null ? "an admin" : `uid ${registeredBy.uid}`}; uid ${caller.uid} may not act on it`,
  );
}

export function registeredBy(caller: Caller): RegisteredBy {
  return { uid: caller.uid, admin: caller.admin, via: caller.via };
}

/**
 * At reap time: may a process of `uid` be signalled on behalf of this session? Always for a
 * session an admin registered; otherwise only the engine's own uid (the registering user's),
 * as kill(2) would allow that user.
 */
export function maySignal(session: { engine: ProcessIdentity; registeredBy: RegisteredBy }, uid: number): boolean {
  return session.registeredBy.admin || uid === session.engine.uid;
}
