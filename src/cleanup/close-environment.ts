import { performance } from "node:perf_hooks";
import { liveness } from "../proc/identity.js";
import { readUid } from "../proc/stat.js";
import { freshTables, inetSockets, socketSnapshot } from "../proc/sockets.js";
import { recentTable } from "../proc/tree.js";
import { commandHook, hookRefusal } from "./release-hooks.js";
import { knownProcesses, sleep, type CleanupStep, type StepContext, type StepOutput } from "./step.js";

/**
 * Asks the engine to shut down gracefully through the profile's close hook (an HTTP POST to
 * the engine's first registered port on loopback, or an admin-configured argv run as the
 * engine's uid), then gives it the grace period to exit on its own before `terminate`.
 */
export const closeEnvironment: CleanupStep<"close-environment"> = {
  name: "close-environment",
  timeoutMs: (p) => p.stepTimeoutSec * 1000,

  async run(ctx, signal) {
    const { session, profile } = ctx;
    const hook = profile.closeHook;
    if (liveness(session.engine) === "gone") return { ok: true, detail: { skipped: "engine already gone" } };
    // Snapshot the tree before the engine is asked to go: once it exits, its children are
    // re-parented and only this record still ties them to the session.
    // A shared snapshot at most 100 ms old (every reap in flight takes one): a child forked
    // since is found by terminate (its parent, the cgroup, the cookie).
    const processes = (await recentTable(100)).tree(session.engine, knownProcesses(ctx.journal));
    // And its sockets: release-connections-and-ports verifies each one gone after terminate.
    // The network tables, read once for every reap snapshotting in this turn.
    const since = await freshTables(processes[0]?.pid ?? "self");
    const sockets = socketSnapshot(
      processes.map((p) => p.pid),
      since,
    );
    // And every socket on a registered port now, whoever holds it: one found there later that
    // is not among these is new (src/cleanup/reused-port.ts).
    const ports = new Set(session.ports);
    const portInodes =
      ports.size === 0
        ? []
        : inetSockets(processes[0]?.pid ?? "self", ports, since)
            .map((s) => s.inode)
            .filter((inode) => inode > 0);
    ctx.record({ processes, sockets, portInodes }); // kept even if the hook below hangs
    if (hook === null) return { ok: true, detail: { skipped: "the profile has no close hook" } };

    let out: StepOutput<"close-environment">;
    if (hook.kind === "http") {
      const refused = hookRefusal(session);
      if (refused !== null) return { ok: false, detail: { hook: "http", error: refused } };
      const port = session.ports[0];
      if (port === undefined) {
        return {
          ok: false,
          detail: { error: "the close hook is an HTTP path but the session registered no port" },
        };
      }
      const url = `http://127.0.0.1:${port}${hook.path}`;
      const res = await fetch(url, {
        method: "POST",
        signal,
        redirect: "error",
        headers: { "x-reaper-session": session.id, "x-reaper-attempt": String(ctx.attempt) },
      });
      await res.arrayBuffer().catch(() => undefined);
      out = { ok: res.ok, detail: { hook: "http", url, status: res.status } };
    } else {
      out = await runCommand(ctx, hook.argv, signal);
    }
    if (!out.ok) return out;
    const exited = await waitForExit(ctx, signal);
    return { ok: true, detail: { ...out.detail, engineExited: exited } };
  },
};

/** The close hook's argv, as the engine's user whenever that is not us. */
async function runCommand(
  ctx: StepContext<"close-environment">,
  argv: readonly string[],
  signal: AbortSignal,
): Promise<StepOutput<"close-environment">> {
  const { session } = ctx;
  const gid = readUid(session.engine.pid, "Gid");
  const runAs =
    session.engine.uid !== process.geteuid?.() && gid !== null ? { uid: session.engine.uid, gid } : undefined;
  const r = await commandHook(argv, session, ctx.attempt, signal, {
    path: ctx.profile.hookPath,
    ...(runAs === undefined ? {} : { runAs }),
  });
  return { ok: r.outcome === "ok", detail: { ...r } };
}

/** Polls until the engine is gone, the grace period ends, or the step's own time runs out. */
async function waitForExit(ctx: StepContext<"close-environment">, signal: AbortSignal): Promise<boolean> {
  const until = Math.min(performance.now() + ctx.profile.gracePeriodSec * 1000, ctx.deadline - 100);
  while (!signal.aborted && performance.now() < until) {
    if (liveness(ctx.session.engine) === "gone") return true;
    await sleep(Math.min(50, until - performance.now()));
  }
  return liveness(ctx.session.engine) === "gone";
}
