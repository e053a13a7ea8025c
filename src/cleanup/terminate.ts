import { rmdirSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { cgroupPids } from "../proc/cgroup.js";
import { emptied, removeOnceEmptied } from "../proc/containment.js";
import { bootId, liveness } from "../proc/identity.js";
import { killCgroup, killSessionCgroup, signalProcess } from "../proc/signal.js";
import { readStat, readUid } from "../proc/stat.js";
import { cgroupUsage, processUsage, type UsageSample } from "../proc/usage.js";
import { processUses } from "../proc/users.js";
import { freshTable, recentTable, type ProcessTable } from "../proc/tree.js";
import { type Leftover, type ProcessIdentity, processKey } from "../model/session.js";
import { loopTurn } from "../pace/turns.js";
import { journaled } from "./journal.js";
import { knownProcesses, sleep, type CleanupStep, type StepContext, type StepOutput } from "./step.js";

const POLL_MS = 25;
/** How old a shared /proc snapshot a poll may use (recentTable). */
const SHARED_SCAN_MS = 100;
/** How long SIGKILLed processes get to disappear before they are reported as leftovers. */
const KILL_WAIT_MS = 3000;
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
 * for the port step.
 */
export const terminate: CleanupStep<"terminate"> = {
  name: "terminate",
  // The grace period is part of this step's job, so its budget is grace + step timeout.
  timeoutMs: (p) => (p.gracePeriodSec + p.stepTimeoutSec) * 1000,
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
    return this.report(containedKill, cgroupKill);
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
    const graceEnd = Math.min(performance.now() + ctx.profile.gracePeriodSec * 1000, ctx.deadline - KILL_WAIT_MS);
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
    const sent = killSessionCgroup(cg.path, ctx.log, this.policy);
    if (sent === "sent") {
      await emptied(cg.path, Math.max(0, Math.min(KILL_WAIT_MS, ctx.deadline - performance.now() - 100)), signal);
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
    const cgroupKill = cg === null ? killCgroup(ctx.session.engine, ctx.log, this.policy) : null;
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

  /** SIGKILL to whatever is left, until nothing is or KILL_WAIT_MS pass. */
  private async kill(): Promise<void> {
    const { ctx, signal } = this;
    const killEnd = Math.min(performance.now() + KILL_WAIT_MS, ctx.deadline - 50);
    while (!signal.aborted && performance.now() < killEnd) {
      await this.rescanComplete();
      const left = this.alive();
      if (left.length === 0) break;
      this.counts.sigkill += this.send(left, "SIGKILL");
      await sleep(POLL_MS);
    }
  }

  /** The step's result: survivors, refusals, what is still in the cgroup, and the cgroup itself. */
  private report(
    containedKill: "sent" | "refused" | "failed" | null,
    cgroupKill: string | null,
  ): StepOutput<"terminate"> {
    const { ctx, cg } = this;
    const survivors = this.alive();
    const refused = [...this.notOurs.values()].filter((p) => liveness(p) === "alive");
    // A contained session's cgroup, once empty, is removed (when the daemon made it).
    const inCgroup = cg === null ? [] : cgroupPids(cg.path);
    const cgroupError = cg !== null && cg.made && inCgroup.length === 0 ? cgroupRemoval(cg.path) : null;
    const removed = cg !== null && cg.made && inCgroup.length === 0 && cgroupError === null;
    const leftovers: Leftover[] = [
      ...survivors.map((p) => ({
        step: "terminate" as const,
        kind: "process" as const,
        item: String(p.pid),
        detail: "still running after SIGKILL",
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
    // says so), and the log says when.
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
      },
      leftovers,
    };
  }
}

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

/** removeCgroup's rmdir: null once removed (or already gone), else why not ("rmdir: EBUSY"). */
function cgroupRemoval(path: string): string | null {
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
