import { removePath } from "../paths/remove.js";
import { processUses } from "../proc/users.js";
import type { Leftover } from "../sessions/types.js";
import type { CleanupStep } from "./step.js";

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
export const removePaths: CleanupStep = {
  name: "remove-paths",
  timeoutMs: (p) => p.stepTimeoutSec * 1000,

  async run(ctx, signal) {
    const results: { path: string; status: string; detail?: string }[] = [];
    const leftovers: Leftover[] = [];
    for (const path of ctx.session.paths) {
      const users = processUses({ paths: [path], skip: new Set([ctx.daemonPid, process.pid]) });
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
    return { ok: leftovers.length === 0, detail: { paths: results }, leftovers };
  },
};
