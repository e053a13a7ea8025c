import { removePath } from "../paths/remove.js";
import { ipcLeftovers, POSIX_SHM_DIR, removeSysv, type IpcQuery } from "../proc/ipc.js";
import { processUses } from "../proc/users.js";
import type { Leftover } from "../model/session.js";
import { damageOf, whereIs } from "../store/columns.js";
import { knownProcesses, type CleanupStep, type StepContext } from "./step.js";
import { terminatedProcesses } from "./terminate.js";

/**
 * Deletes the session's registered files and directories through the one audited delete
 * path (policy re-checked at delete time, no symlink followed, no mount crossed, as the
 * engine's uid). A path already gone counts as removed.
 *
 * A path some live process still uses (its cwd or root, an open fd, a mapped file below it)
 * is left alone and listed as a leftover naming that process: deleting a PostgreSQL data
 * directory under a running postmaster (a daemonizing launcher's engine that the session
 * never knew) destroys a live database.
 */
export const removePaths: CleanupStep<"remove-paths"> = {
  name: "remove-paths",
  timeoutMs: (p) => p.stepTimeoutSec * 1000,

  async run(ctx, signal) {
    const results: { path: string; status: string; detail?: string }[] = [];
    const leftovers: Leftover[] = [];
    // Paths that cannot be read are never guessed at: nothing is deleted, and the step fails.
    const damaged = damageOf(ctx.session, "paths");
    const unreadable =
      damaged === undefined
        ? {}
        : {
            unreadable: `${whereIs(damaged)} cannot be read (${damaged.error}): the session's paths are unknown, none was deleted`,
          };
    for (const path of ctx.session.paths) {
      const users = await processUses({ paths: [path], skip: new Set([ctx.daemonPid, process.pid]) });
      if (users.length > 0) {
        const who = users
          .slice(0, 5)
          .map((u) => `${u.comm} (pid ${u.pid}, uid ${u.uid}): ${u.why}`)
          .join("; ");
        results.push({ path, status: "in_use", detail: who });
        leftovers.push({ step: "remove-paths", kind: "path", item: path, detail: `in use, not deleted: ${who}` });
        continue;
      }
      const r = await removePath(path, ctx.profile.allowedRoots, ctx.session.engine.uid, ctx.log, signal);
      if (r.status === "removed" || r.status === "absent") {
        results.push({ path, status: r.status });
      } else if ("detail" in r) {
        results.push({ path, status: r.status, detail: r.detail });
        leftovers.push({ step: "remove-paths", kind: "path", item: path, detail: `${r.status}: ${r.detail}` });
      }
    }
    const ipc = await removeIpc(ctx, signal);
    leftovers.push(...ipc.leftovers);
    return {
      ok: leftovers.length === 0 && damaged === undefined,
      detail: { paths: results, ...unreadable, ...(ipc.results.length > 0 ? { ipc: ipc.results } : {}) },
      leftovers,
    };
  },
};

/**
 * IPC the session left (src/proc/ipc.ts): reported as `ipc` leftovers, and removed when the
 * profile says `remove_ipc = true` (POSIX shm through the one delete path, with /dev/shm as
 * its only allowed root; SysV with ipcrm as the owner). What is removed is no leftover. An
 * object still in use (attached, mapped or open by a survivor) is reported, never removed:
 * as with a registered path in use, what a live process holds is not pulled from under it.
 */
async function removeIpc(
  ctx: StepContext,
  signal: AbortSignal,
): Promise<{ results: { kind: string; item: string; status: string }[]; leftovers: Leftover[] }> {
  const { session, profile } = ctx;
  if (session.engine.pid === 0) return { results: [], leftovers: [] }; // a path's session: no process ever ran
  const found = await ipcLeftovers(ipcQuery(ctx));
  const results: { kind: string; item: string; status: string }[] = [];
  const leftovers: Leftover[] = [];
  for (const o of found) {
    let error: string | null = o.inUse !== undefined ? "in use: not removed" : "not removed (remove_ipc = false)";
    if (profile.removeIpc && o.inUse === undefined) {
      if (o.kind === "posix_shm") {
        const r = await removePath(o.item, [POSIX_SHM_DIR], o.uid, ctx.log, signal);
        error =
          r.status === "removed" || r.status === "absent" ? null : `${r.status}: ${"detail" in r ? r.detail : ""}`;
      } else {
        error = await removeSysv(o);
        if (error === null) ctx.log.info({ ipc: o.kind, id: o.item, uid: o.uid }, "ipc removed");
      }
    }
    results.push({ kind: o.kind, item: o.item, status: error === null ? "removed" : error });
    if (error !== null) {
      leftovers.push({ step: "remove-paths", kind: "ipc", item: `${o.kind} ${o.item}`, detail: `${o.why}; ${error}` });
    }
  }
  return { results, leftovers };
}

/**
 * The session's IPC, by identity (src/proc/ipc.ts): its engine's, and the processes journaled
 * as the session's (by pid, start time and, where recorded, uid); those alive are survivors.
 */
export function ipcQuery(ctx: Pick<StepContext, "session" | "journal">): IpcQuery {
  const { session } = ctx;
  return {
    engine: session.engine,
    members: [session.engine, ...knownProcesses(ctx.journal), ...terminatedProcesses(ctx)],
  };
}
