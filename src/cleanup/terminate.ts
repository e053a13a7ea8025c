import { rmdirSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { errorMessage } from "../errors.js";
import type { UnkillableEvidence } from "../model/evidence.js";
import { cgroupPids } from "../proc/cgroup.js";
import { emptied, removeOnceEmptied } from "../proc/containment.js";
import { readEvidence, type ProcessReading } from "../proc/evidence.js";
import { bootId, liveness } from "../proc/identity.js";
import { killCgroup, killSessionCgroup, signalProcess } from "../proc/signal.js";
import { readStat, readUid } from "../proc/stat.js";
import { cgroupUsage, processUsage, type UsageSample } from "../proc/usage.js";
import { processUses } from "../proc/users.js";
import { freshTable, recentTable, type ProcessTable } from "../proc/tree.js";
import { type Leftover, type ProcessIdentity, processKey } from "../model/session.js";
import { loopTurn } from "../pace/turns.js";
import { journaled } from "./journal.js";
import { commandHook, type HookReport } from "./release-hooks.js";
import { knownProcesses, sleep, type CleanupStep, type StepContext, type StepOutput } from "./step.js";

const POLL_MS = 25;
/** How old a shared /proc snapshot a poll may use (recentTable). */
const SHARED_SCAN_MS = 100;
/**
 * Processes read before their first SIGKILL (src/proc/evidence.ts), those in uninterruptible
 * sleep first: a tree of thousands is not read whole to explain the few that may not die.
 */
const EVIDENCE_BEFORE = 64;
/** Unkillable leftovers that carry their evidence in full (all are listed): the row and the audit line stay small. */
const EVIDENCE_KEPT = 8;
/** Freeze rounds: each stops the newcomers found by a re-scan, until a scan finds none. */
const MAX_FREEZE_ROUNDS = 50;

/**
 * Terminates the engine's whole process tree (BullMQ's child.kill: SIGTERM, then SIGKILL
 * after a deadline). Children forked during the grace period are found by re-scanning and
 * signalled too. Before SIGKILL the tree is frozen with SIGSTOP, round after round until a
 * scan finds no newcomer, so a process forking in a loop cannot outrun the kill; if the
 * engine has a cgroup of its own, `cgroup.kill` ends it at once. The tree is the union of what
 * lineage knows (every process the engine started, from the kernel), the walks of /proc, the
 * cookie and the cgroup. Every signal goes through
 * the identity-checked path; a zombie counts as gone. The processes handled are journaled
 * for the port step. A process still alive unkillable_timeout_sec after its SIGKILL (the
 * kernel holds it in uninterruptible sleep) is an `unkillable` leftover with the evidence of
 * why, read before the kill and after the wait; the profile's unkillable hook then runs, and
 * the daemon watches it until it dies (src/reaper/resolver.ts).
 */
export const terminate: CleanupStep<"terminate"> = {
  name: "terminate",
  // The grace period and the wait after SIGKILL are part of this step's job, and so is the
  // unkillable hook when there is one (step_timeout_sec of its own): its budget holds them all.
  timeoutMs: (p) =>
    (p.gracePeriodSec +
      p.unkillableTimeoutSec +
      p.stepTimeoutSec +
      (p.unkillableHook === null ? 0 : p.stepTimeoutSec)) *
    1000,
  async run(ctx, signal) {
    return new Termination(ctx, signal).run();
  },
};

type Cgroup = { path: string; made: boolean };

/** One session's termination: the tree as found so far, what was signalled, what refused. */
class Termination {
  /** Journaled before: the fence's and close-environment's trees, and the cookie's carriers. */
  private readonly known: ProcessIdentity[] = [];
  /** Every member found so far, by processKey. */
  private readonly seen = new Map<string, ProcessIdentity>();
  /** Members of another uid than a non-admin registrant's: left alone, reported. */
  private readonly notOurs = new Map<string, ProcessIdentity>();
  private readonly cg: Cgroup | null;
  /** A session a non-admin registered is reaped with that user's power. */
  private readonly policy: { onlyUid: number | undefined };
  private readonly counts = { sigterm: 0, sigstop: 0, sigkill: 0 };
  /** performance.now() of each process's first SIGKILL (cgroup.kill's included), by processKey. */
  private readonly killedAt = new Map<string, number>();
  /** What the kernel said of each process just before its first SIGKILL (readBefore). */
  private readonly before = new Map<string, ProcessReading>();
  /** Each process's state as last seen, and since when (ms since the epoch): how long it has been so, at least. */
  private readonly states = new Map<string, { state: string; since: number }>();

  constructor(
    private readonly ctx: StepContext<"terminate">,
    private readonly signal: AbortSignal,
  ) {
    const c = ctx.session.containment;
    this.cg = c?.kind === "cgroup" ? c : null;
    this.policy = { onlyUid: ctx.session.registeredBy.admin ? undefined : ctx.session.engine.uid };
  }

  async run(): Promise<StepOutput<"terminate">> {
    const { ctx, cg } = this;
    for (const p of [...knownProcesses(ctx.journal), ...(await this.byCookie())]) this.known.push(p);
    // What the session used, read before anything is signalled: the usage reported at finish.
    const before = await this.rescan();
    ctx.record({ usage: this.usageBefore(before) });
    this.counts.sigterm = this.send(before, "SIGTERM");
    if (this.seen.size === 0 && (cg === null || cgroupPids(cg.path).length === 0)) {
      const removed = cg !== null && cg.made && removeCgroup(cg.path);
      return {
        ok: true,
        detail: {
          skipped: "engine already gone",
          processes: [],
          ...cgroupDetail(cg, null, removed),
        },
      };
    }
    await this.grace();
    for (const p of await this.byCookie()) this.known.push(p);
    const containedKill = await this.killContained();
    const cgroupKill = this.alive().length > 0 ? await this.freeze() : null;
    await this.kill();
    return await this.report(containedKill, cgroupKill);
  }

  /** How long a SIGKILLed process may take to die before it is `unkillable`. */
  private get killWaitMs(): number {
    return this.ctx.profile.unkillableTimeoutSec * 1000;
  }

  /** The step's time kept at its end for the unkillable hook (none without one). */
  private get hookMs(): number {
    return this.ctx.profile.unkillableHook === null ? 0 : this.ctx.profile.stepTimeoutSec * 1000;
  }

  /**
   * Every process carrying the session's cookie belongs to it, wherever it was re-parented:
   * looked up at the start and again before the kill (a /proc pass each, not every poll).
   */
  private async byCookie(): Promise<ProcessIdentity[]> {
    const { ctx } = this;
    const uses = await processUses({ cookie: ctx.session.id, skip: new Set([ctx.daemonPid, process.pid]) });
    return uses.map((u) => ({ pid: u.pid, startTime: u.startTime, bootId: bootId(), uid: u.uid }));
  }

  /** The contained session's cgroup members, as identities (whatever their ancestry). */
  private members(): ProcessIdentity[] {
    if (this.cg === null) return [];
    const out: ProcessIdentity[] = [];
    for (const pid of cgroupPids(this.cg.path)) {
      const st = readStat(pid);
      const uid = readUid(pid);
      if (st !== null && uid !== null) out.push({ pid, startTime: st.startTime, bootId: bootId(), uid });
    }
    return out;
  }

  /**
   * New members of the tree (and cgroup) on a /proc snapshot: polls share one up to
   * SHARED_SCAN_MS old (recentTable, `rescan`); the scans that decide the tree is complete
   * (after a freeze, before the last kill check) wait for one taken after they asked
   * (freshTable, shared by the reaps that ask within 100 ms), unless the session is
   * contained: its cgroup (read fresh each time) holds every process born in it.
   */
  private rescanOn(table: ProcessTable): ProcessIdentity[] {
    const { ctx, seen } = this;
    const fresh: ProcessIdentity[] = [];
    const tree = table.tree(ctx.session.engine, [...this.known, ...seen.values()]);
    // Lineage: every process the engine started, wherever it went (setsid, double forks,
    // re-parenting, moved out of the cgroup), after every fork reported before this look.
    for (const p of [...tree, ...this.members(), ...ctx.lineage.members()]) {
      // A shared snapshot may be up to SHARED_SCAN_MS old: a process gone since is not one to handle.
      if (!seen.has(processKey(p)) && liveness(p) === "alive") {
        seen.set(processKey(p), p);
        fresh.push(p);
      }
    }
    // Journaled even if the step times out: the port step needs to know whose sockets these were.
    if (fresh.length > 0)
      ctx.record({ processes: [...seen.values()].map((p) => ({ pid: p.pid, startTime: p.startTime })) });
    return fresh;
  }

  private async rescan(): Promise<ProcessIdentity[]> {
    return this.rescanOn(await recentTable(SHARED_SCAN_MS));
  }

  private async rescanComplete(): Promise<ProcessIdentity[]> {
    return this.rescanOn(this.cg === null ? await freshTable() : await recentTable(SHARED_SCAN_MS));
  }

  private alive(): ProcessIdentity[] {
    return [...this.seen.values()].filter((p) => !this.notOurs.has(processKey(p)) && liveness(p) === "alive");
  }

  /** Signals those it may (identity-checked, one path); how many were sent. */
  private send(procs: ProcessIdentity[], sig: NodeJS.Signals): number {
    const { ctx, policy } = this;
    return procs.filter((p) => {
      if (policy.onlyUid !== undefined && p.uid !== policy.onlyUid) {
        this.notOurs.set(processKey(p), p);
        return false;
      }
      return signalProcess(p, sig, ctx.log, ctx.daemonPid, policy) === "sent";
    }).length;
  }

  /**
   * What the session used (a cgroup's totals, or the tree's own), journaled with the step,
   * even on a timeout. Members that exited already and were reaped outside the session (a
   * double fork's grandchild, re-parented to init) have their CPU in no live process's
   * counters: lineage kept it. The cgroup counts every process that ever ran in it, but only
   * from the moment it was moved there: what the engine used before (registration comes
   * after its start) is in its own counters. The larger of the two.
   */
  private usageBefore(before: ProcessIdentity[]): UsageSample {
    const live = processUsage(before.map((p) => p.pid));
    const own = { ...live, cpuSec: live.cpuSec + this.ctx.lineage.exitedCpuSec() };
    const cg = this.cg;
    const inCg = cg === null ? null : cgroupUsage(cg.path, cgroupPids(cg.path));
    return inCg === null ? own : { ...inCg, cpuSec: Math.max(inCg.cpuSec, own.cpuSec) };
  }

  /** The grace period: SIGTERM to every member found, newcomers included, until none is left or it ends. */
  private async grace(): Promise<void> {
    const { ctx, signal } = this;
    const graceEnd = Math.min(
      performance.now() + ctx.profile.gracePeriodSec * 1000,
      ctx.deadline - this.killWaitMs - this.hookMs,
    );
    while (!signal.aborted && this.alive().length > 0 && performance.now() < graceEnd) {
      await sleep(Math.min(POLL_MS, graceEnd - performance.now()));
      this.counts.sigterm += this.send(await this.rescan(), "SIGTERM");
    }
  }

  /** Contained: the kernel ends every member at once (cgroup.kill), and says when the cgroup is empty. */
  private async killContained(): Promise<"sent" | "refused" | "failed" | null> {
    const { ctx, cg, signal } = this;
    if (cg === null || cgroupPids(cg.path).length === 0) return null;
    await this.rescan();
    const members = this.members();
    await this.readBefore(members);
    const sent = killSessionCgroup(cg.path, ctx.log, this.policy);
    if (sent === "sent") {
      const at = performance.now();
      for (const p of members) if (!this.killedAt.has(processKey(p))) this.killedAt.set(processKey(p), at);
      const wait = Math.min(this.killWaitMs, ctx.deadline - performance.now() - 100 - this.hookMs);
      await emptied(cg.path, Math.max(0, wait), signal);
      await loopTurn(); // a storm's cgroups empty together: their reaps go on paced
    }
    return sent;
  }

  /**
   * An uncontained engine with a cgroup of its own gets cgroup.kill; then the freeze: stop
   * everything alive; a stopped process cannot fork, so a scan that finds no newcomer means
   * the tree is complete. Returns what the cgroup kill said (null: none tried).
   */
  private async freeze(): Promise<string | null> {
    const { ctx, cg, signal } = this;
    await this.rescan();
    if (cg === null) await this.readBefore(this.alive());
    const cgroupKill = cg === null ? killCgroup(ctx.session.engine, ctx.log, this.policy) : null;
    if (cgroupKill !== null) {
      // What the kernel just SIGKILLed: the engine's cgroup's members among the tree.
      const at = performance.now();
      const inIt = new Set(cgroupPids(cgroupKill));
      for (const p of this.alive())
        if (inIt.has(p.pid) && !this.killedAt.has(processKey(p))) this.killedAt.set(processKey(p), at);
    }
    const stopped = new Set<string>();
    for (let round = 0; round < MAX_FREEZE_ROUNDS && !signal.aborted; round++) {
      const fresh = await this.rescanComplete();
      const toStop = this.alive().filter((p) => !stopped.has(processKey(p)));
      for (const p of toStop) stopped.add(processKey(p));
      this.counts.sigstop += this.send(toStop, "SIGSTOP");
      if (round > 0 && fresh.length === 0 && toStop.length === 0) break;
    }
    return cgroupKill;
  }

  /**
   * SIGKILL to whatever is left, each read first (readBefore) and signalled once (a SIGKILL
   * stays pending until its process dies: another changes nothing); then the wait, until
   * nothing is left or every survivor has had unkillable_timeout_sec since its own first
   * SIGKILL (cgroup.kill's counts). The step's deadline cuts the wait short, keeping the
   * unkillable hook's time.
   */
  private async kill(): Promise<void> {
    const { ctx, signal } = this;
    const end = ctx.deadline - 50 - this.hookMs;
    while (!signal.aborted) {
      await this.rescanComplete();
      const left = this.alive();
      if (left.length === 0) break;
      const fresh = left.filter((p) => !this.killedAt.has(processKey(p)));
      if (fresh.length > 0) await this.readBefore(fresh);
      for (const p of fresh) {
        if (this.send([p], "SIGKILL") === 0) continue;
        this.counts.sigkill++;
        this.killedAt.set(processKey(p), performance.now());
      }
      const now = Date.now();
      for (const p of left) this.observe(p, readStat(p.pid)?.state ?? null, now);
      const killed = left.flatMap((p) => this.killedAt.get(processKey(p)) ?? []);
      if (killed.length === 0) break; // none could be sent a SIGKILL: nothing to wait for
      const waitEnd = Math.min(Math.max(...killed) + this.killWaitMs, end);
      if (performance.now() >= waitEnd) break;
      await sleep(Math.min(POLL_MS, waitEnd - performance.now()));
    }
  }

  /**
   * What the kernel says of processes about to get their first SIGKILL (src/proc/evidence.ts),
   * those in uninterruptible sleep first (a SIGKILL may not end them), up to EVIDENCE_BEFORE a
   * reap: one that then outlives its SIGKILL shows where it was before and where it is after.
   */
  private async readBefore(procs: readonly ProcessIdentity[]): Promise<void> {
    const room = EVIDENCE_BEFORE - this.before.size;
    if (room <= 0) return;
    const todo = procs
      .filter((p) => !this.before.has(processKey(p)))
      .map((p) => ({ p, asleep: readStat(p.pid)?.state === "D" }))
      .sort((a, b) => Number(b.asleep) - Number(a.asleep))
      .slice(0, room)
      .map(({ p }) => p);
    const readings = await Promise.all(todo.map((p) => readEvidence(p)));
    todo.forEach((p, i) => {
      const r = readings[i];
      if (r === null || r === undefined) return;
      this.before.set(processKey(p), r);
      this.observe(p, r.state, r.at);
    });
  }

  /** A state seen at `at` (ms since the epoch): its start is kept until another state is seen. */
  private observe(p: ProcessIdentity, state: string | null, at: number): void {
    if (state === null) return;
    const seen = this.states.get(processKey(p));
    if (seen === undefined || seen.state !== state) this.states.set(processKey(p), { state, since: at });
  }

  /**
   * Survivors of the wait, read again: each one's evidence (the first EVIDENCE_KEPT in full),
   * or "gone" when it died meanwhile (then it is no leftover).
   */
  private async evidenceOf(procs: readonly ProcessIdentity[]): Promise<(UnkillableEvidence | null | "gone")[]> {
    return Promise.all(
      procs.map(async (p, i): Promise<UnkillableEvidence | null | "gone"> => {
        const killedAt = this.killedAt.get(processKey(p)) ?? performance.now();
        if (i >= EVIDENCE_KEPT) return liveness(p) === "alive" ? null : "gone";
        const after = await readEvidence(p);
        if (after === null) return "gone";
        this.observe(p, after.state, after.at);
        const since = this.states.get(processKey(p))?.since ?? after.at;
        return {
          before: this.before.get(processKey(p)) ?? null,
          after,
          stateSince: since,
          inStateSec: round((after.at - since) / 1000),
          sinceKillSec: round((performance.now() - killedAt) / 1000),
        };
      }),
    );
  }

  /**
   * The profile's unkillable hook, run once by a reap that leaves unkillable processes: the
   * hook templates and `{pids}` (comma-joined), as the daemon's user, with step_timeout_sec of
   * its own (terminate's budget holds it). Its report is journaled with the step; a hook that
   * fails is logged and reported, not a leftover (the processes are).
   */
  private async unkillableHook(pids: readonly number[]): Promise<HookReport | null> {
    const { ctx, signal } = this;
    const argv = ctx.profile.unkillableHook;
    if (argv === null || pids.length === 0) return null;
    const t0 = performance.now();
    const controller = new AbortController();
    const timeoutMs = Math.max(0, Math.min(this.hookMs, ctx.deadline - performance.now() - 20));
    const timer = setTimeout(() => controller.abort(), timeoutMs);
    const onStepAbort = (): void => controller.abort();
    signal.addEventListener("abort", onStepAbort, { once: true });
    let report: HookReport;
    try {
      const r = await commandHook(argv, ctx.session, ctx.attempt, controller.signal, {
        path: ctx.profile.hookPath,
        extra: { pids: pids.join(",") },
      });
      report = { ...r, durationMs: Math.round(performance.now() - t0) };
    } catch (err) {
      report = {
        hook: "command",
        argv,
        outcome: "failed",
        error: errorMessage(err),
        durationMs: Math.round(performance.now() - t0),
      };
    } finally {
      clearTimeout(timer);
      signal.removeEventListener("abort", onStepAbort);
    }
    if (report.outcome !== "ok") ctx.log.warn({ hook: report }, "unkillable hook did not succeed");
    return report;
  }

  /**
   * The step's result: the unkillable (alive unkillable_timeout_sec after their SIGKILL, with
   * their evidence, and the unkillable hook's report), refusals, what is still in the cgroup,
   * and the cgroup itself.
   */
  private async report(
    containedKill: "sent" | "refused" | "failed" | null,
    cgroupKill: string | null,
  ): Promise<StepOutput<"terminate">> {
    const { ctx, cg } = this;
    const alive = this.alive();
    const killed = alive.filter((p) => this.killedAt.has(processKey(p)));
    const evidence = await this.evidenceOf(killed);
    const unkillable = killed.flatMap((p, i) => {
      const e = evidence[i] ?? null;
      return e === "gone" ? [] : [{ p, evidence: e }];
    });
    // Never sent a SIGKILL (refused at the last moment: a kernel thread, a protected pid).
    const unsent = alive.filter((p) => !this.killedAt.has(processKey(p)));
    const survivors = [...unkillable.map((u) => u.p), ...unsent];
    const refused = [...this.notOurs.values()].filter((p) => liveness(p) === "alive");
    // A contained session's cgroup, once empty, is removed (when the daemon made it).
    const inCgroup = cg === null ? [] : cgroupPids(cg.path);
    const cgroupError = cg !== null && cg.made && inCgroup.length === 0 ? cgroupRemoval(cg.path) : null;
    const removed = cg !== null && cg.made && inCgroup.length === 0 && cgroupError === null;
    const hook = await this.unkillableHook(unkillable.map((u) => u.p.pid));
    const leftovers: Leftover[] = [
      ...unkillable.map((u) => unkillableLeftover(u.p, u.evidence, ctx.profile.unkillableTimeoutSec)),
      ...unsent.map((p) => ({
        step: "terminate" as const,
        kind: "process" as const,
        item: String(p.pid),
        detail: "still running: no SIGKILL could be sent to it",
      })),
      ...refused.map((p) => ({
        step: "terminate" as const,
        kind: "process" as const,
        item: String(p.pid),
        detail: `not signalled: runs as uid ${p.uid}, and the session was registered by uid ${ctx.session.registeredBy.uid ?? "?"}, not an admin`,
      })),
    ];
    for (const pid of inCgroup) {
      if (survivors.some((p) => p.pid === pid) || refused.some((p) => p.pid === pid)) continue;
      leftovers.push({
        step: "terminate",
        kind: "process",
        item: String(pid),
        detail: "still in the session's cgroup",
      });
    }
    // A cgroup the daemon made and could not remove is a leftover of its own (a directory of
    // the cgroup tree, hence `path`): nothing else would ever remove it once the session is
    // reaped. Still populated, it goes in the background once it empties (its cgroup.events
    // says so), and the log says when; held by unkillable processes, the reap's resolution
    // (src/reaper/resolver.ts) removes it too, once they are gone.
    const cgroupLeft = cg !== null && cg.made && !removed;
    if (cgroupLeft) {
      leftovers.push(cgroupLeftover(cg, inCgroup, cgroupError));
      if (inCgroup.length > 0) removeOnceEmptied(cg.path, ctx.log);
    }
    return {
      ok: survivors.length === 0 && refused.length === 0 && inCgroup.length === 0 && !cgroupLeft,
      detail: {
        processes: [...this.seen.values()].map((p) => ({ pid: p.pid, startTime: p.startTime })),
        ...this.counts,
        ...(cgroupKill === null ? {} : { cgroupKill }),
        ...cgroupDetail(cg, containedKill, removed),
        ...(unkillable.length === 0 ? {} : { unkillable: unkillable.length }),
        ...(hook === null ? {} : { unkillableHook: hook }),
      },
      leftovers,
    };
  }
}

/**
 * An unkillable process (alive `waitSec` after its SIGKILL): who it is, by identity (what the
 * daemon watches it by: src/reaper/resolver.ts), and what the kernel says of it.
 */
function unkillableLeftover(p: ProcessIdentity, evidence: UnkillableEvidence | null, waitSec: number): Leftover {
  const st = readStat(p.pid);
  const comm = st?.comm ?? "?";
  const after = evidence?.after;
  const state = after?.state ?? st?.state ?? "?";
  const where = after?.wchan !== null && after?.wchan !== undefined && after.wchan !== "0" ? `, in ${after.wchan}` : "";
  const since = evidence === null ? "" : `, so for ${evidence.inStateSec} s at least`;
  return {
    step: "terminate",
    kind: "unkillable",
    item: String(p.pid),
    detail: `${comm} (pid ${p.pid}, uid ${p.uid}) still alive ${evidence?.sinceKillSec ?? waitSec} s after SIGKILL: state ${state}${where}${since}; watched until it dies, then the reap is resolved`,
    pid: p.pid,
    comm,
    uid: p.uid,
    startTime: p.startTime,
    ...(evidence === null ? {} : { evidence }),
  };
}

/** Seconds to the hundredth. */
const round = (sec: number): number => Math.round(sec * 100) / 100;

/** The leftover for a cgroup the daemon made and could not remove: what still holds it, or why rmdir failed. */
function cgroupLeftover(cg: Cgroup, inCgroup: number[], cgroupError: string | null): Leftover {
  const held = inCgroup.slice(0, 5).map((pid) => {
    const st = readStat(pid);
    return `pid ${pid} (${st?.comm ?? "?"}, uid ${readUid(pid) ?? "?"}${st?.state === "D" ? ", in uninterruptible sleep" : ""})`;
  });
  const more = inCgroup.length > held.length ? ` and ${inCgroup.length - held.length} more` : "";
  return {
    step: "terminate",
    kind: "path",
    item: cg.path,
    detail:
      inCgroup.length > 0
        ? `the session's cgroup, not removed: it still holds ${held.join(", ")}${more}; it is removed once it empties`
        : `the session's cgroup, empty but not removed: ${cgroupError ?? "rmdir failed"}`,
  };
}

/** What the terminate record says of the session's cgroup. */
function cgroupDetail(
  cg: { path: string; made: boolean } | null,
  kill: "sent" | "refused" | "failed" | null,
  removed = false,
): Record<string, unknown> {
  if (cg === null) return {};
  return { cgroup: { path: cg.path, kill: kill ?? "not needed", removed } };
}

/** rmdir of an empty cgroup the daemon made (not a file delete: a cgroup holds no files). */
function removeCgroup(path: string): boolean {
  return cgroupRemoval(path) === null;
}

/**
 * removeCgroup's rmdir: null once removed (or already gone), else why not ("rmdir: EBUSY").
 * Also the reap's resolution's, once the unkillable processes that held the cgroup are gone.
 */
export function cgroupRemoval(path: string): string | null {
  try {
    rmdirSync(path);
    return null;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    return code === "ENOENT" ? null : `rmdir: ${code ?? (err as Error).message}`;
  }
}

export type TerminatedProcess = { pid: number; startTime: number };

/** The processes a journaled terminate step handled (also after a restart). */
export function terminatedProcesses(ctx: Pick<StepContext, "journal">): TerminatedProcess[] {
  return [...(journaled(ctx.journal, "terminate")?.processes ?? [])];
}
