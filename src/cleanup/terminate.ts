import { performance } from "node:perf_hooks";
import { liveness } from "../proc/identity.js";
import { signalProcess } from "../proc/signal.js";
import { processTree } from "../proc/tree.js";
import type { Leftover, ProcessIdentity } from "../sessions/types.js";
import { knownProcesses, sleep, type CleanupStep, type StepContext } from "./step.js";

const POLL_MS = 25;
/** How long SIGKILLed processes get to disappear before they are reported as leftovers. */
const KILL_WAIT_MS = 3000;

/**
 * Terminates the engine's whole process tree (BullMQ's child.kill: SIGTERM, then SIGKILL
 * after a deadline). The tree is re-scanned while waiting, so children forked during the
 * grace period are signalled too; identities are re-checked before every signal; a zombie
 * counts as gone. The processes handled are journaled for the port step.
 */
export const terminate: CleanupStep = {
  name: "terminate",
  // The grace period is part of this step's job, so its budget is grace + step timeout.
  timeoutMs: (p) => (p.gracePeriodSec + p.stepTimeoutSec) * 1000,

  async run(ctx, signal) {
    const known = knownProcesses(ctx.journal);
    const seen = new Map<string, ProcessIdentity>();
    const key = (p: ProcessIdentity): string => `${p.pid}:${p.startTime}`;
    const rescan = (): ProcessIdentity[] => {
      const fresh: ProcessIdentity[] = [];
      for (const p of processTree(ctx.session.engine, [...known, ...seen.values()])) {
        if (!seen.has(key(p))) {
          seen.set(key(p), p);
          fresh.push(p);
        }
      }
      return fresh;
    };
    const alive = (): ProcessIdentity[] => [...seen.values()].filter((p) => liveness(p) === "alive");
    const send = (procs: ProcessIdentity[], sig: NodeJS.Signals): number =>
      procs.filter((p) => signalProcess(p, sig, ctx.log, ctx.daemonPid) === "sent").length;

    let sigterm = send(rescan(), "SIGTERM");
    if (seen.size === 0) return { ok: true, detail: { skipped: "engine already gone", processes: [] } };

    const graceEnd = Math.min(performance.now() + ctx.profile.gracePeriodSec * 1000, ctx.deadline - KILL_WAIT_MS);
    while (!signal.aborted && alive().length > 0 && performance.now() < graceEnd) {
      await sleep(Math.min(POLL_MS, graceEnd - performance.now()));
      sigterm += send(rescan(), "SIGTERM");
    }

    let sigkill = 0;
    const killEnd = Math.min(performance.now() + KILL_WAIT_MS, ctx.deadline - 50);
    while (!signal.aborted && performance.now() < killEnd) {
      rescan();
      const left = alive();
      if (left.length === 0) break;
      sigkill += send(left, "SIGKILL");
      await sleep(POLL_MS);
    }

    const survivors = alive();
    const leftovers: Leftover[] = survivors.map((p) => ({
      step: "terminate",
      kind: "process",
      item: String(p.pid),
      detail: "still running after SIGKILL",
    }));
    return {
      ok: survivors.length === 0,
      detail: {
        processes: [...seen.values()].map((p) => ({ pid: p.pid, startTime: p.startTime })),
        sigterm,
        sigkill,
      },
      leftovers,
    };
  },
};

export type TerminatedProcess = { pid: number; startTime: number };

/** The processes a journaled terminate step handled (also after a restart). */
export function terminatedProcesses(ctx: StepContext): TerminatedProcess[] {
  const detail = ctx.journal.get("terminate")?.detail;
  return Array.isArray(detail?.processes) ? (detail.processes as TerminatedProcess[]) : [];
}
