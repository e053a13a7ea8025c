import { performance } from "node:perf_hooks";
import type { Logger } from "pino";
import type { AuditTrail } from "../audit/audit.js";
import { closeEnvironment } from "../cleanup/close-environment.js";
import { releaseConnectionsAndPorts } from "../cleanup/release-ports.js";
import { removePaths } from "../cleanup/remove-paths.js";
import { knownProcesses, type CleanupStep, type SessionMembers, type StepOutput } from "../cleanup/step.js";
import { terminate } from "../cleanup/terminate.js";
import { JOURNAL_VERSION, type FenceDetail } from "../cleanup/journal.js";
import { sessionUsage } from "../cleanup/usage.js";
import { verifyGone, type Verification } from "../cleanup/verify.js";
import type { Clock } from "../clock.js";
import type { Config, Profile } from "../config/load.js";
import { ReaperError, errorMessage } from "../errors.js";
import type { Metrics } from "../metrics/metrics.js";
import { trackingOf, type SessionLineage } from "../proc/lineage.js";
import type { SessionCgroups } from "../proc/containment.js";
import type { Leftover, Outcome, ProcessIdentity, Reason, Session, StepName, StepResult } from "../model/session.js";
import { damageOf, describeDamage, engineDamage, engineReadable } from "../store/columns.js";
import type { Store } from "../store/store.js";
import { loopTurn } from "../pace/turns.js";

/** The cleanup order (docs/how-a-session-ends.md). `fence` happens in `begin`, `finish` closes the pipeline. */
export const CLEANUP_STEPS: readonly CleanupStep[] = [
  closeEnvironment,
  terminate,
  releaseConnectionsAndPorts,
  removePaths,
];

/** Each step's place in the journal (reap_steps.position). */
export const POSITION: Record<StepName, number> = {
  fence: 0,
  "close-environment": 1,
  terminate: 2,
  "release-connections-and-ports": 3,
  "remove-paths": 4,
  finish: 5,
};

class StepTimeout extends Error {}

/**
 * A pipeline that crashes (a bug: steps never throw) is started again this many times, a
 * second apart; then the reap is finished as it stands, never left `reaping`.
 */
const CRASH_RESTARTS = 2;
const CRASH_RESTART_MS = 1000;

/** What one start of a session's pipeline works with. */
interface ReapRun {
  readonly session: Session;
  readonly journal: Map<StepName, StepResult>;
  readonly members: SessionMembers;
  readonly attempt: number;
  readonly log: Logger;
}

/** Step boundaries at which a failpoint may stop the daemon dead (crash-safety tests). */
export const FAILPOINTS: readonly string[] = [
  "after-fence",
  ...CLEANUP_STEPS.map((s) => `after-${s.name}`),
  "after-finish",
];

export interface ReaperDeps {
  store: Store;
  audit: AuditTrail;
  clock: Clock;
  log: Logger;
  config: Config;
  /** Step durations and finished reaps are counted here once committed. */
  metrics?: Metrics | undefined;
  daemonPid: number;
  /** Session membership by lineage: adopted at registration, released once the reap finished. */
  lineage: SessionLineage;
  /** Where the daemon makes session cgroups: the one of a session whose stored containment is damaged. */
  cgroups?: Pick<SessionCgroups, "madeFor"> | undefined;
  /** Boundaries (names from FAILPOINTS) at which to call `crash`. Empty in production. */
  failpoints?: ReadonlySet<string> | undefined;
  /** What a failpoint does: main.ts passes a SIGKILL to the daemon itself. */
  crash?: (() => void) | undefined;
  /** Told of each reap that finished leaving unkillable processes, once committed: it watches them (resolver.ts). */
  unkillable?: { watch(sessionId: string): void } | undefined;
}

/**
 * Runs the cleanup pipeline for fenced sessions, at most `reaper.concurrency` at a time.
 * Every step's result is journaled before the next starts, so a daemon killed mid-reap
 * resumes after the last journaled step (`resumeAll`).
 */
export class Reaper {
  private readonly queue: string[] = [];
  private readonly queued = new Set<string>();
  private readonly running = new Map<string, Promise<void>>();
  /**
   * Pipelines stopped because the store could not journal a step: taken up again by
   * `storeAvailable` (each step is idempotent, so the step whose record was lost runs again).
   */
  private readonly parked = new Set<string>();
  /** No new pipeline starts (shutdown). */
  private stopping = false;
  /** Running pipelines stop at their next step boundary (shutdown grace exhausted). */
  private halted = false;
  /** Crashes of each session's pipeline in this daemon run (see CRASH_RESTARTS). */
  private readonly crashes = new Map<string, number>();

  constructor(private readonly deps: ReaperDeps) {}

  get inFlight(): number {
    return this.running.size;
  }

  get pending(): number {
    return this.queue.length + this.parked.size;
  }

  /** The store commits again: parked pipelines resume. */
  storeAvailable(): void {
    const ids = [...this.parked];
    this.parked.clear();
    for (const id of ids) this.enqueue(id);
  }

  /**
   * The fence: commits `reaping` (with the audit rows) before anything acts, so from this
   * moment heartbeats answer 409 and the session cannot come back. Returns false if the
   * session was not live (already fenced by someone else: nothing to do).
   */
  begin(
    id: string,
    reason: Reason,
    detail: Record<string, unknown> = {},
    known: readonly ProcessIdentity[] = [],
    last?: { lastHeartbeatAt: number; lastActivityAt: number; peaks?: { processes: number; rssBytes: number } },
  ): boolean {
    const { store, audit, clock } = this.deps;
    const now = clock.now();
    const fenced = audit.transaction(() => {
      if (!store.fence(id, reason, now, last)) return false;
      audit.record({
        event: reason === "closed" ? "session.closed" : "session.expired",
        sessionId: id,
        reason,
        detail,
      });
      audit.record({ event: "reap.started", sessionId: id, reason });
      // The last known process tree is journaled with the fence: terminate starts from it.
      const fence: StepResult = {
        name: "fence",
        outcome: "ok",
        startedAt: now,
        durationMs: 0,
        detail: {
          v: JOURNAL_VERSION,
          processes: known,
          ...(last?.peaks === undefined ? {} : { peaks: last.peaks }),
        } satisfies FenceDetail & { v: number },
      };
      store.recordStep(id, POSITION.fence, fence);
      audit.record({ event: "reap.step", sessionId: id, reason, step: "fence", outcome: "ok", durationMs: 0 });
      return true;
    });
    if (fenced) {
      audit.afterCommit(() => {
        this.failpoint("after-fence", id);
        this.enqueue(id);
      });
    }
    return fenced;
  }

  /** Re-queues every session left in `reaping` by an earlier run of the daemon. */
  resumeAll(): number {
    const left = this.deps.store.sessionsInState("reaping");
    for (const s of left) this.enqueue(s.id);
    return left.length;
  }

  /**
   * Shutdown: start nothing new; let running pipelines finish within `graceMs`, then make
   * them stop at their next step boundary. What did not finish resumes at the next start.
   */
  async drain(graceMs: number): Promise<void> {
    this.stopping = true;
    const all = (): Promise<unknown> => Promise.allSettled([...this.running.values()]);
    let timer: NodeJS.Timeout | undefined;
    const graceOver = new Promise<void>((r) => (timer = setTimeout(r, graceMs)));
    await Promise.race([all(), graceOver]);
    clearTimeout(timer);
    this.halted = true;
    await all();
  }

  private enqueue(id: string): void {
    if (this.queued.has(id) || this.running.has(id)) return;
    this.queued.add(id);
    this.queue.push(id);
    this.pump();
  }

  private pump(): void {
    while (!this.stopping && this.running.size < this.deps.config.reaper.concurrency && this.queue.length > 0) {
      const id = this.queue.shift() as string;
      this.queued.delete(id);
      const run = this.runPipeline(id)
        .catch(async (err: unknown) => {
          if (isStoreUnavailable(err)) {
            this.deps.log.warn(
              { sessionId: id, err },
              "reap paused: the store cannot journal; resumes when it commits",
            );
            this.parked.add(id);
          } else {
            await this.crashed(id, err);
          }
        })
        .finally(() => {
          this.running.delete(id);
          this.pump();
        });
      this.running.set(id, run);
    }
  }

  private profileOf(session: Session): Profile {
    const { config, log } = this.deps;
    const p = config.profiles[session.profile];
    if (p !== undefined) return p;
    log.warn({ sessionId: session.id, profile: session.profile }, "profile no longer configured; using default");
    return config.profiles.default as Profile;
  }

  private async runPipeline(id: string): Promise<void> {
    const { store, audit, clock } = this.deps;
    // Its reading of the journal and its attempt's record, paced too: a burst of fences
    // (a tenant force-reaped, a thousand deadlines at once) starts its pipelines a few per turn.
    await loopTurn();
    const stored = store.getSession(id);
    if (stored === undefined || stored.state !== "reaping") return;
    const records = store.steps(id);
    // A record whose detail cannot be read (a damaged row) is no record: its step runs again.
    const journal = new Map(records.filter((r) => r.damage === undefined).map((r) => [r.name, r]));
    const session = this.sessionToReap(stored, records);
    const profile = this.profileOf(session);
    const attempt = store.startAttempt(id) ?? 1;
    const log = this.deps.log.child({ sessionId: id, attempt });
    // An engine that cannot be identified (its stored identity is damaged) is never acted on:
    // no hook, no signal, no delete; the verification still looks, and says what is left.
    const identified = engineReadable(session);
    const notRun = identified
      ? null
      : `not run: the engine cannot be identified (${describeDamage(engineDamage(session))}); nothing is signalled, deleted or run for this session`;
    // A reap resumed after a restart (or an orphan's) has no membership yet: the engine's
    // descendants now and those of the processes already journaled.
    const { lineage } = this.deps;
    if (identified && lineage.get(id) === undefined) {
      lineage.adopt(id, session.engine);
      lineage.include(id, knownProcesses(journal));
    }
    const members: SessionMembers = {
      members: () => lineage.members(id),
      exitedCpuSec: () => lineage.get(id)?.exitedCpuSec ?? 0,
      complete: () => session.tracking === "lineage" && lineage.get(id)?.complete === true,
    };

    for (const step of CLEANUP_STEPS) {
      if (journal.has(step.name)) continue; // done before a restart: never run twice
      if (this.halted) {
        log.info({ step: step.name }, "reap paused by shutdown; resumes at next start");
        return;
      }
      await loopTurn(); // each step's synchronous start, paced across the reaps in flight
      const result =
        notRun === null
          ? await this.runStep(step, { session, profile, journal, attempt, members }, log.child({ step: step.name }))
          : notRunResult(step.name, clock.now(), notRun);
      // Committed with the step records of the other reaps of this turn, and before the next
      // step acts (a record lost to a crash only makes its step run again: steps are idempotent).
      await audit.commitSoon(() => this.journalStep(session, result, attempt));
      if (notRun === null) this.deps.metrics?.stepFinished(step.name, result.durationMs);
      journal.set(step.name, result);
      this.failpoint(`after-${step.name}`, id);
    }
    await this.finishReap({ session, journal, members, attempt, log });
  }

  /**
   * The session as its reap sees it: the damage of its journal's records with its own, and,
   * when its stored containment cannot be read, the cgroup the daemon made for it if there is
   * one (a damaged containment means: start from the engine, its cgroup and its lineage).
   */
  sessionToReap(stored: Session, records: readonly StepResult[]): Session {
    const journalDamage = records.flatMap((r) => (r.damage === undefined ? [] : [r.damage]));
    const containment =
      damageOf(stored, "containment") === undefined
        ? stored.containment
        : (this.deps.cgroups?.madeFor(stored.id) ?? null);
    if (journalDamage.length === 0 && containment === stored.containment) return stored;
    return { ...stored, containment, damage: [...stored.damage, ...journalDamage] };
  }

  /** A step's record and its reap.step event (inside the caller's transaction). */
  journalStep(session: Session, result: StepResult, attempt: number): void {
    this.deps.store.recordStep(session.id, POSITION[result.name], result);
    this.deps.audit.record({
      event: "reap.step",
      sessionId: session.id,
      reason: session.reason ?? undefined,
      step: result.name,
      outcome: result.outcome,
      durationMs: result.durationMs,
      detail: { ...result.detail, attempt },
    });
  }

  /**
   * The verification pass, the outcome and the finish. `crashed`: the pipeline crashed past
   * its restarts; the steps it did not journal are recorded as not run, and the reap ends as it
   * stands. A session with a damaged row is never `clean`: what the damaged values held (its
   * ports, its paths, its tree) could not be cleaned up nor verified.
   */
  private async finishReap(run: ReapRun, crashed?: string): Promise<void> {
    const { store, audit, clock, lineage } = this.deps;
    const { session, journal, members, attempt, log } = run;
    const id = session.id;
    const missing =
      crashed === undefined
        ? []
        : CLEANUP_STEPS.filter((s) => !journal.has(s.name)).map((s) =>
            notRunResult(s.name, clock.now(), `not run: ${crashed}`),
          );
    for (const r of missing) journal.set(r.name, r);
    const steps = CLEANUP_STEPS.map((s) => journal.get(s.name) as StepResult);
    const verifyStart = performance.now();
    await loopTurn();
    const verification = await verify(session, journal, members, this.deps.daemonPid, log);
    await loopTurn(); // the finish transaction, paced too
    const verifyMs = performance.now() - verifyStart;
    const leftovers = mergeLeftovers(
      steps.flatMap((s) => s.detail.leftovers ?? []),
      verification.leftovers,
    );
    const verified = outcomeOf(steps, leftovers);
    const outcome = verified === "clean" && session.damage.length > 0 ? "partial" : verified;
    const now = clock.now();
    const usage = sessionUsage(session, journal, now);
    // Lineage holds to the end only if no event was lost and the daemon never restarted meanwhile.
    const tracking =
      session.tracking === "lineage" && !members.complete()
        ? trackingOf(undefined, session.containment)
        : session.tracking;
    const damage = session.damage.length > 0 ? { damage: session.damage } : {};
    const reused = verification.reused === undefined ? {} : { portsReused: verification.reused };
    const finished = audit.transaction(() => {
      if (!store.finish(id, outcome, leftovers, now)) return false;
      for (const r of missing) this.journalStep(session, r, attempt);
      if (tracking !== null) store.setTracking(id, tracking);
      const finish: StepResult = {
        name: "finish",
        outcome: "ok",
        startedAt: now,
        durationMs: verifyMs,
        detail: {
          v: JOURNAL_VERSION,
          outcome,
          verified: verification.verified,
          tracking,
          usage,
          ...reused,
          ...damage,
          ...(crashed === undefined ? {} : { crashed }),
        },
      };
      store.recordStep(id, POSITION.finish, finish);
      audit.record({
        event: "reap.finished",
        sessionId: id,
        reason: session.reason ?? undefined,
        outcome,
        durationMs: now - (session.reapStartedAt ?? now),
        detail: {
          leftovers,
          attempts: attempt,
          verified: verification.verified,
          tracking,
          usage,
          ...reused,
          ...damage,
          ...(crashed === undefined ? {} : { crashed }),
        },
      });
      return true;
    });
    if (finished) {
      lineage.release(id);
      this.crashes.delete(id);
      if (leftovers.some((l) => l.kind === "unkillable")) this.deps.unkillable?.watch(id);
      this.deps.metrics?.reapFinished(session.reason ?? "forced", outcome, session.profile);
      this.deps.metrics?.sessionUsage(session.profile, usage);
    }
    this.failpoint("after-finish", id);
  }

  /**
   * The pipeline threw past its steps (a bug: steps never throw, damaged values read as
   * nothing). Started again up to CRASH_RESTARTS times (steps are idempotent and journaled);
   * then the reap is finished as it stands, `partial` or `failed`, with what the verification
   * finds still alive: a reap never stays `reaping`.
   */
  private async crashed(id: string, err: unknown): Promise<void> {
    const { store, log } = this.deps;
    const n = (this.crashes.get(id) ?? 0) + 1;
    this.crashes.set(id, n);
    if (n <= CRASH_RESTARTS) {
      log.error({ sessionId: id, err, crashes: n }, "reap pipeline crashed: starting it again");
      setTimeout(() => this.enqueue(id), CRASH_RESTART_MS).unref();
      return;
    }
    const why = `the reap pipeline crashed ${n} times (last: ${errorMessage(err)})`;
    log.error({ sessionId: id, err, crashes: n }, `${why}: the reap is finished as it stands`);
    try {
      const stored = store.getSession(id);
      if (stored === undefined || stored.state !== "reaping") return;
      const records = store.steps(id);
      const journal = new Map(records.filter((r) => r.damage === undefined).map((r) => [r.name, r]));
      const { lineage } = this.deps;
      const members: SessionMembers = {
        members: () => lineage.members(id),
        exitedCpuSec: () => lineage.get(id)?.exitedCpuSec ?? 0,
        complete: () => false,
      };
      const session = this.sessionToReap(stored, records);
      await this.finishReap({ session, journal, members, attempt: stored.reapAttempts, log }, why);
    } catch (finishErr) {
      if (isStoreUnavailable(finishErr)) {
        this.parked.add(id);
        return;
      }
      // Left `reaping`: the next start resumes it.
      log.error({ sessionId: id, err: finishErr }, "the crashed reap could not be finished");
    }
  }

  private failpoint(name: string, sessionId: string): void {
    if (this.deps.failpoints?.has(name) !== true) return;
    this.deps.log.warn({ failpoint: name, sessionId }, "failpoint reached: crashing on purpose");
    this.deps.crash?.();
  }

  /**
   * Own deadline, own try/catch, own record: a step never throws past here. Also how a reap's
   * resolution runs again the steps its unkillable processes kept from completing.
   */
  async runStep(
    step: CleanupStep,
    run: {
      session: Session;
      profile: Profile;
      journal: ReadonlyMap<StepName, StepResult>;
      attempt: number;
      members: SessionMembers;
    },
    log: Logger,
  ): Promise<StepResult> {
    const { session, profile, journal, attempt, members } = run;
    const startedAt = this.deps.clock.now();
    const t0 = performance.now();
    const timeoutMs = step.timeoutMs(profile);
    const controller = new AbortController();
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        const err = new StepTimeout(`${step.name} did not finish within ${timeoutMs} ms`);
        controller.abort(err);
        reject(err);
      }, timeoutMs);
    });
    let out: StepOutput;
    let outcome: StepResult["outcome"];
    const recorded: Record<string, unknown> = {};
    try {
      const ctx = {
        session,
        profile,
        log,
        daemonPid: this.deps.daemonPid,
        journal,
        deadline: t0 + timeoutMs,
        attempt,
        record: (fields: Record<string, unknown>) => Object.assign(recorded, fields),
        lineage: members,
      };
      out = await Promise.race([step.run(ctx, controller.signal), timedOut]);
      outcome = out.ok ? "ok" : "failed";
    } catch (err) {
      const isTimeout = err instanceof StepTimeout || controller.signal.aborted;
      outcome = isTimeout ? "timeout" : "failed";
      out = { ok: false, detail: { error: errorMessage(err) } };
      log.warn({ err }, `step ${outcome}`);
    } finally {
      clearTimeout(timer);
      controller.abort(new Error("step over"));
    }
    const detail: StepResult["detail"] = { v: JOURNAL_VERSION, ...recorded, ...out.detail };
    if (out.leftovers && out.leftovers.length > 0) detail.leftovers = out.leftovers;
    return { name: step.name, outcome, startedAt, durationMs: performance.now() - t0, detail };
  }
}

/**
 * The verification pass (src/cleanup/verify.ts), made safe: a pass that fails verified
 * nothing, and says so (a `clean` then rests on the steps alone, and `reaperctl audit
 * verify` names it).
 */
export async function verify(
  session: Session,
  journal: ReadonlyMap<StepName, StepResult>,
  members: SessionMembers,
  daemonPid: number,
  log: Logger,
): Promise<Verification> {
  try {
    return await verifyGone(session, journal, members, daemonPid);
  } catch (err) {
    log.error({ err }, "verification pass failed");
    return { verified: [], leftovers: [] };
  }
}

const isStoreUnavailable = (err: unknown): boolean => err instanceof ReaperError && err.code === "SR_STORE_UNAVAILABLE";

/** A step that was not run (its reason in `detail.notRun`): failed, and journaled like any. */
function notRunResult(name: StepName, now: number, why: string): StepResult {
  return { name, outcome: "failed", startedAt: now, durationMs: 0, detail: { v: JOURNAL_VERSION, notRun: why } };
}

/**
 * A reap's leftovers: the steps' own, then what the verification found that no step named
 * already: a survivor of terminate (by its pid, unkillable or not), the holder of a port the
 * release step reported (by that port).
 */
export function mergeLeftovers(stepLeftovers: readonly Leftover[], found: readonly Leftover[]): Leftover[] {
  const named = new Set(stepLeftovers.map((l) => `${l.kind === "unkillable" ? "process" : l.kind}:${l.item}`));
  return [
    ...stepLeftovers,
    ...found.filter(
      (l) =>
        !named.has(`${l.kind}:${l.item}`) &&
        !(l.why ?? "").split(", ").every((r) => named.has(`port:${/^port (\d+) /.exec(r)?.[1]}`)),
    ),
  ];
}

/** clean: every step ok and nothing left; failed: no step succeeded; partial otherwise. */
export function outcomeOf(steps: readonly StepResult[], leftovers: readonly Leftover[]): Outcome {
  const ok = steps.filter((s) => s.outcome === "ok").length;
  if (ok === steps.length && leftovers.length === 0) return "clean";
  if (ok === 0) return "failed";
  return "partial";
}
