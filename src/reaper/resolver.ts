import type { Logger } from "pino";
import type { AuditTrail } from "../audit/audit.js";
import { releaseConnectionsAndPorts } from "../cleanup/release-ports.js";
import { removePaths } from "../cleanup/remove-paths.js";
import type { CleanupStep, SessionMembers } from "../cleanup/step.js";
import { cgroupRemoval } from "../cleanup/terminate.js";
import type { Clock } from "../clock.js";
import type { Config, Profile } from "../config/load.js";
import { type Leftover, type ProcessIdentity, processKey, type Session, type StepResult } from "../model/session.js";
import { loopTurn } from "../pace/turns.js";
import { liveness } from "../proc/identity.js";
import { ProcessHandle } from "../proc/pidfd.js";
import { engineReadable } from "../store/columns.js";
import type { Store } from "../store/store.js";
import { CLEANUP_STEPS, mergeLeftovers, outcomeOf, verify, type Reaper } from "./reaper.js";

/**
 * The steps a reap's unkillable processes may have kept from completing, run again once they
 * are gone: a port they held, a path they used. close-environment and terminate are never run
 * again: the engine is gone, and nothing is signalled after a reap.
 */
const RERUN: readonly CleanupStep[] = [releaseConnectionsAndPorts, removePaths];

/**
 * Every watched process's liveness is read this often besides the kernel's exit notification:
 * the only watch where pidfd is missing (Linux < 5.3) or could not be opened (EMFILE), a
 * backstop elsewhere. A stat read per watched process: unkillable processes are few.
 */
const BACKSTOP_MS = 5000;
/** A resolution that failed (the store could not commit) is tried again after this. */
const RETRY_MS = 10_000;

/** A resolution has no lineage to go by: the session's was released at its finish (and an unkillable process cannot fork). */
const NO_MEMBERS: SessionMembers = { members: () => [], exitedCpuSec: () => 0, complete: () => false };

export interface ResolverDeps {
  store: Store;
  audit: AuditTrail;
  clock: Clock;
  log: Logger;
  config: Config;
  daemonPid: number;
  /** The step runner (own timeout, own try/catch), the session as a reap sees it, and the step journal. */
  reaper: Pick<Reaper, "runStep" | "sessionToReap" | "journalStep">;
  /** A pidfd could not be opened (EMFILE, ENFILE): that process is watched by the backstop only. */
  onPidfdError?: ((code: string) => void) | undefined;
}

/** One unkillable process, watched: its identity, and the pidfd whose exit notification wakes us. */
interface Watch {
  readonly p: ProcessIdentity;
  readonly comm: string;
  readonly handle: ProcessHandle | null;
}

/**
 * When a kill does not finish (docs/how-a-session-ends.md): a reap that left `unkillable`
 * processes (alive unkillable_timeout_sec after SIGKILL: uninterruptible sleep in a hung file
 * system, a cgroup v1 freezer, a driver) ends `partial`, and its processes are watched here, by
 * identity (a pidfd opened on the pid, the start time and boot checked while it is held; never a
 * pid alone), until all are gone. Then the reap is resolved: the cgroup the daemon made for the
 * session is removed, the steps that did not complete (release-connections-and-ports,
 * remove-paths) run again, the verification looks at the host afresh, and `reap.resolved`
 * records the new outcome and what is still left, with the session's row. Watching survives a
 * restart: the row counts its unkillable processes (migration 008), and `start` watches them
 * again; one gone meanwhile resolves at once.
 */
export class Resolver {
  /** Watched reaps: each one's processes still alive, by processKey. */
  private readonly watched = new Map<string, Map<string, Watch>>();
  /** The processes each watched reap left unkillable, as named in its leftovers (for reap.resolved). */
  private readonly named = new Map<string, { pid: number; startTime: number; comm: string }[]>();
  /** Resolutions in flight, by session id. */
  private readonly resolving = new Map<string, Promise<void>>();
  private backstop: NodeJS.Timeout | null = null;
  private stopping = false;

  constructor(private readonly deps: ResolverDeps) {}

  /** Unkillable processes watched now (session_reaper_unkillable_processes). */
  get processes(): number {
    let n = 0;
    for (const procs of this.watched.values()) n += procs.size;
    return n;
  }

  /** At start: every reaped session whose unkillable processes were not yet all gone is watched again. */
  start(): { sessions: number; processes: number } {
    const reaps = this.deps.store.unresolvedReaps();
    for (const s of reaps) this.watchSession(s);
    return { sessions: reaps.length, processes: this.processes };
  }

  /** A reap just finished leaving unkillable processes (committed): watch them. */
  watch(sessionId: string): void {
    if (this.stopping || this.watched.has(sessionId) || this.resolving.has(sessionId)) return;
    const s = this.deps.store.getSession(sessionId);
    if (s === undefined || s.state !== "reaped" || !s.leftovers.some((l) => l.kind === "unkillable")) return;
    this.watchSession(s);
  }

  /**
   * Shutdown: nothing more is watched (the row still says so: the next start watches again),
   * and resolutions in flight get `graceMs` to commit; one cut short resolves at the next start.
   */
  async drain(graceMs: number): Promise<void> {
    this.stopping = true;
    for (const procs of this.watched.values()) for (const w of procs.values()) w.handle?.close();
    this.watched.clear();
    this.arm();
    let timer: NodeJS.Timeout | undefined;
    const graceOver = new Promise<void>((r) => (timer = setTimeout(r, graceMs)));
    await Promise.race([Promise.allSettled([...this.resolving.values()]), graceOver]);
    clearTimeout(timer);
  }

  private watchSession(s: Session): void {
    if (this.watched.has(s.id) || this.resolving.has(s.id)) return;
    const procs = new Map<string, Watch>();
    const named: { pid: number; startTime: number; comm: string }[] = [];
    this.watched.set(s.id, procs);
    this.named.set(s.id, named);
    const keys = new Set<string>();
    for (const l of s.leftovers) {
      const p = identityOf(l, s);
      if (p === null || keys.has(processKey(p))) continue;
      const key = processKey(p);
      keys.add(key);
      named.push({ pid: p.pid, startTime: p.startTime, comm: l.comm ?? "?" });
      const handle = ProcessHandle.open(p.pid, this.deps.onPidfdError);
      // Held while the identity is read: the pid cannot change hands meanwhile. A pid that no
      // longer names the process is a process gone, never one to watch.
      if (liveness(p) === "gone") {
        handle?.close();
        continue;
      }
      procs.set(key, { p, comm: l.comm ?? "?", handle });
      handle?.onExit(() => this.exited(s.id, key));
    }
    this.deps.log.info(
      { sessionId: s.id, watched: procs.size, named: named.length },
      procs.size > 0 ? "watching the processes a reap left unkillable" : "a reap's unkillable processes are gone",
    );
    this.arm();
    this.settle(s.id);
  }

  private exited(sessionId: string, key: string): void {
    const procs = this.watched.get(sessionId);
    const w = procs?.get(key);
    if (procs === undefined || w === undefined) return;
    w.handle?.close();
    procs.delete(key);
    this.deps.log.info({ sessionId, pid: w.p.pid, comm: w.comm }, "an unkillable process is gone");
    this.settle(sessionId);
  }

  /** A reap none of whose processes is left is resolved (on a later turn: never inside a watch's callback or `start`). */
  private settle(sessionId: string): void {
    const procs = this.watched.get(sessionId);
    if (procs === undefined || procs.size > 0 || this.stopping) return;
    this.watched.delete(sessionId);
    this.arm();
    const named = this.named.get(sessionId) ?? [];
    this.named.delete(sessionId);
    const run = new Promise<void>((r) => setImmediate(r))
      .then(() => this.resolve(sessionId, named))
      .catch((err: unknown) => {
        this.deps.log.error({ err, sessionId }, "the reap could not be resolved: trying again later");
        if (!this.stopping) setTimeout(() => this.watch(sessionId), RETRY_MS).unref();
      })
      .finally(() => this.resolving.delete(sessionId));
    this.resolving.set(sessionId, run);
  }

  /** The backstop timer runs while anything is watched. */
  private arm(): void {
    const needed = !this.stopping && this.watched.size > 0;
    if (needed && this.backstop === null) {
      this.backstop = setInterval(() => this.check(), BACKSTOP_MS);
      this.backstop.unref();
    } else if (!needed && this.backstop !== null) {
      clearInterval(this.backstop);
      this.backstop = null;
    }
  }

  private check(): void {
    for (const [sessionId, procs] of [...this.watched]) {
      for (const [key, w] of [...procs]) if (liveness(w.p) === "gone") this.exited(sessionId, key);
    }
  }

  private profileOf(session: Session): Profile {
    const { config } = this.deps;
    return config.profiles[session.profile] ?? (config.profiles.default as Profile);
  }

  /**
   * The resolution: the session's cgroup (when the daemon made it) removed, the steps that did
   * not complete run again (their records replaced, marked `resolution`; each first run stays
   * in its reap.step event), the verification, then in one transaction the row's outcome and
   * leftovers and `reap.resolved`. The finish step's record keeps what the reap found.
   */
  private async resolve(
    sessionId: string,
    unkillable: readonly { pid: number; startTime: number; comm: string }[],
  ): Promise<void> {
    const { store, audit, clock, reaper, daemonPid } = this.deps;
    const stored = store.getSession(sessionId);
    if (stored === undefined || stored.state !== "reaped") return;
    const records = store.steps(sessionId);
    const journal = new Map(records.filter((r) => r.damage === undefined).map((r) => [r.name, r]));
    const session = reaper.sessionToReap(stored, records);
    const profile = this.profileOf(session);
    const log = this.deps.log.child({ sessionId, resolution: true });
    const startedAt = clock.now();
    const c = session.containment;
    const cgroup = c?.kind === "cgroup" && c.made ? { path: c.path, error: cgroupRemoval(c.path) } : null;
    const rerun: StepResult[] = [];
    // An engine that cannot be identified is never acted on (reaper.ts): the verification only.
    for (const step of engineReadable(session) ? RERUN : []) {
      if (!needsRerun(journal.get(step.name))) continue;
      if (this.stopping) return; // the row still names its unkillable processes: the next start resolves it
      await loopTurn();
      const run = { session, profile, journal, attempt: session.reapAttempts, members: NO_MEMBERS };
      const r = await reaper.runStep(step, run, log.child({ step: step.name }));
      const result: StepResult = { ...r, detail: { ...r.detail, resolution: startedAt } };
      journal.set(step.name, result);
      rerun.push(result);
    }
    await loopTurn();
    const verification = await verify(session, journal, NO_MEMBERS, daemonPid, log);
    const alive = new Set(
      verification.leftovers.flatMap((l) => (l.kind === "process" && l.pid !== undefined ? [l.pid] : [])),
    );
    const removed = cgroup !== null && cgroup.error === null ? cgroup.path : null;
    const steps = CLEANUP_STEPS.map((s) => judged(journal.get(s.name), alive, removed));
    const leftovers = mergeLeftovers(
      steps.flatMap((s) => s?.detail.leftovers ?? []),
      verification.leftovers,
    );
    const verdict = outcomeOf(
      steps.filter((s): s is StepResult => s !== undefined),
      leftovers,
    );
    const outcome = verdict === "clean" && session.damage.length > 0 ? "partial" : verdict;
    await loopTurn(); // the transaction, paced like a finish
    const now = clock.now();
    const resolved = audit.transaction(() => {
      if (!store.resolveReap(sessionId, outcome, leftovers)) return false;
      for (const r of rerun) reaper.journalStep(session, r, session.reapAttempts);
      audit.record({
        event: "reap.resolved",
        sessionId,
        reason: session.reason ?? undefined,
        outcome,
        // How long the unkillable processes held out after the reap's finish.
        durationMs: now - (session.reapedAt ?? now),
        detail: {
          previousOutcome: stored.outcome,
          leftovers,
          unkillable,
          rerun: rerun.map((r) => ({ step: r.name, outcome: r.outcome })),
          ...(cgroup === null
            ? {}
            : {
                cgroup: {
                  path: cgroup.path,
                  removed: cgroup.error === null,
                  ...(cgroup.error === null ? {} : { error: cgroup.error }),
                },
              }),
          verified: verification.verified,
          ...(verification.reused === undefined ? {} : { portsReused: verification.reused }),
        },
      });
      return true;
    });
    if (resolved) log.info({ outcome, previousOutcome: stored.outcome, leftovers: leftovers.length }, "reap resolved");
  }
}

/**
 * The identity of a process an `unkillable` leftover names: its pid and start time, on the boot
 * the session's engine ran in (a reboot since ends every process of that boot). Null without
 * both (a leftover of another kind, or a damaged one): a pid alone is never watched.
 */
function identityOf(l: Leftover, s: Session): ProcessIdentity | null {
  if (l.kind !== "unkillable" || !Number.isSafeInteger(l.pid) || !Number.isSafeInteger(l.startTime)) return null;
  return { pid: l.pid as number, startTime: l.startTime as number, bootId: s.engine.bootId, uid: l.uid ?? -1 };
}

/** A step runs again unless its record says it completed: ok, nothing left. */
function needsRerun(r: StepResult | undefined): boolean {
  return r === undefined || r.outcome !== "ok" || (r.detail.leftovers ?? []).length > 0;
}

/**
 * A step's record as the resolution judges it. terminate failed for what it left; what it
 * left stands while the verification still finds that process alive (by its pid among the
 * session's processes it found), or while the cgroup is not removed; a terminate that failed
 * for nothing else (no error, no timeout) and of whose leftovers none stands counts as done.
 * Every other step is judged by its record (the one run again, if it was).
 */
function judged(
  r: StepResult | undefined,
  alive: ReadonlySet<number>,
  cgroupRemoved: string | null,
): StepResult | undefined {
  if (r === undefined || r.name !== "terminate") return r;
  const stands = (l: Leftover): boolean =>
    l.kind === "unkillable" || l.kind === "process"
      ? alive.has(Number(l.item))
      : !(l.kind === "path" && l.item === cgroupRemoved);
  const left = (r.detail.leftovers ?? []).filter(stands);
  const cleared =
    r.outcome === "failed" && r.detail.error === undefined && r.detail.notRun === undefined && left.length === 0;
  return { ...r, outcome: cleared ? "ok" : r.outcome, detail: { ...r.detail, leftovers: left } };
}
