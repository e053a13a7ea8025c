/**
 * Reap mode: a finding becomes a synthetic session with reason `orphaned`, inserted through
 * the store and fenced by the reaper in one transaction, then cleaned up by the one pipeline
 * (close-environment, terminate, release-connections-and-ports, remove-paths) with its audit
 * trail. Nothing here signals or deletes: the sweep has no code path of its own for that.
 */
import { createHash } from "node:crypto";
import type { AuditTrail } from "../audit/audit.js";
import type { Clock } from "../clock.js";
import type { Profile } from "../config/load.js";
import { ReaperError, errorMessage } from "../errors.js";
import { checkPath } from "../paths/validate.js";
import { identify } from "../proc/identity.js";
import type { Reaper } from "../reaper/reaper.js";
import { NOT_YET_REAPED, type ProcessIdentity, type Session } from "../model/session.js";
import type { Store } from "../store/store.js";

export interface AdoptDeps {
  store: Store;
  audit: AuditTrail;
  reaper: Reaper;
  clock: Clock;
  daemonPid: number;
}

export type Adoption = { ok: true; sessionId: string } | { ok: false; refused: string };

/**
 * The engine of a session made for a leftover path: no process. Pid 0 of no boot is never
 * alive (identity.liveness), has no process tree (ProcessTable.tree) and is never signalled
 * (signal.ts refuses pid <= 1), so close-environment and terminate find "engine already
 * gone"; the uid is the path's owner, the uid remove-paths deletes as.
 */
export function noEngine(uid: number): ProcessIdentity {
  return { pid: 0, startTime: 0, bootId: "", uid };
}

/** The id reap mode gives a process finding: stable for one process identity. */
export function processSessionId(p: ProcessIdentity): string {
  return `orphan-${p.bootId.replace(/-/g, "").slice(0, 8)}-${p.pid}-${p.startTime}`;
}

/** The id reap mode gives a path finding: stable for one file (device, inode, birth) at that path. */
export function pathSessionId(path: string, st: { dev: number; ino: number; birthtimeMs: number }): string {
  const digest = createHash("sha256").update(`${st.dev}:${st.ino}:${st.birthtimeMs}:${path}`).digest("hex");
  return `orphan-path-${digest.slice(0, 16)}`;
}

/**
 * A process nobody registered. The same checks as a registration: a live, manageable process
 * (identify: not pid <= 1, the daemon or a kernel thread) still wearing the found identity,
 * of a uid the profile's matcher allows. `tree` is journaled with the fence (terminate starts
 * from it); `ports` are the ones it holds, verified free by release-connections-and-ports.
 */
export function adoptProcess(
  deps: AdoptDeps,
  profile: Profile,
  found: { identity: ProcessIdentity; tree: readonly ProcessIdentity[]; ports: readonly number[] },
  event: Record<string, unknown>,
): Adoption {
  let engine: ProcessIdentity;
  try {
    engine = identify(found.identity.pid, "orphan", deps.daemonPid);
  } catch (err) {
    return refusal(err);
  }
  if (engine.startTime !== found.identity.startTime) return { ok: false, refused: "the process is gone" };
  if (!(profile.orphans?.uids ?? []).includes(engine.uid)) {
    return { ok: false, refused: `the process now runs as uid ${engine.uid}, not one of the matcher's uids` };
  }
  const session = synthetic(deps, processSessionId(engine), profile, engine, found.ports, [], "process");
  return insertAndFence(deps, session, event, { pid: engine.pid }, found.tree);
}

/** A leftover path: the path policy (below an allowed root, no symlink, same file system, owner). */
export function adoptPath(
  deps: AdoptDeps,
  profile: Profile,
  found: { path: string; id: string; uid: number },
  event: Record<string, unknown>,
): Adoption {
  try {
    checkPath(found.path, profile.allowedRoots, found.uid, "orphan");
  } catch (err) {
    return refusal(err);
  }
  const session = synthetic(deps, found.id, profile, noEngine(found.uid), [], [found.path], "path");
  return insertAndFence(deps, session, event, { path: found.path }, []);
}

function synthetic(
  deps: AdoptDeps,
  id: string,
  profile: Profile,
  engine: ProcessIdentity,
  ports: readonly number[],
  paths: readonly string[],
  kind: "process" | "path",
): Session {
  const now = deps.clock.now();
  return {
    id,
    profile: profile.name,
    owner: null,
    engine,
    ownerPid: null,
    ports,
    paths,
    labels: { orphan: kind },
    heartbeatTimeoutSec: profile.heartbeatTimeoutSec,
    idleTimeoutSec: profile.idleTimeoutSec,
    maxLifetimeSec: profile.maxLifetimeSec,
    createdAt: now,
    lastHeartbeatAt: now,
    lastActivityAt: now,
    deadline: now,
    ...NOT_YET_REAPED,
    // The daemon itself, on the admin's configuration (the profile's matcher).
    registeredBy: { uid: null, admin: true, via: null },
    // Found, not launched: what it left escaped no cgroup of ours, and nothing is moved now.
    containment: { kind: "none", why: "found by the orphan sweep" },
    // Found by a walk of /proc, after the fact.
    tracking: "snapshots",
  };
}

/**
 * One transaction: the row, its orphan.found and the fence. The session is never seen live
 * (not even after a crash), and the reaper queues it once all of it has committed.
 */
function insertAndFence(
  deps: AdoptDeps,
  session: Session,
  event: Record<string, unknown>,
  what: Record<string, unknown>,
  known: readonly ProcessIdentity[],
): Adoption {
  const { store, audit, reaper } = deps;
  try {
    return audit.transaction(() => {
      store.insertSession(session);
      audit.record({ event: "orphan.found", sessionId: session.id, detail: event });
      if (!reaper.begin(session.id, "orphaned", { orphan: event.kind, ...what }, known)) {
        throw new Error(`session ${session.id} could not be fenced`); // rolls the insert back
      }
      return { ok: true as const, sessionId: session.id };
    });
  } catch (err) {
    return refusal(err);
  }
}

function refusal(err: unknown): Adoption {
  return { ok: false, refused: err instanceof ReaperError ? `${err.code}: ${err.message}` : errorMessage(err) };
}
