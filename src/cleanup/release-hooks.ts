import { spawn } from "node:child_process";
import { performance } from "node:perf_hooks";
import type { Logger } from "pino";
import type { ReleaseHook } from "../config/load.js";
import { errorMessage } from "../errors.js";
import { passwdEntry } from "../proc/passwd.js";
import { TemplateError, expandArgv } from "../config/hook-template.js";
import type { Session } from "../model/session.js";
import { describeDamage } from "../store/columns.js";

type HookResult = { outcome: "ok" | "failed" | "timeout"; error?: string };
type HttpOutcome = { hook: "http"; url: string; status?: number } & HookResult;
type CommandOutcome = {
  hook: "command";
  argv: readonly string[];
  exit?: number | string;
  stderr?: string;
} & HookResult;
type HookOutcome = HttpOutcome | CommandOutcome;

/**
 * Why no hook may run for this session, or null: a hook is given the session's ports, paths
 * and labels (argv placeholders, environment, HTTP body), and one of them cannot be read (a
 * damaged row). A hook fed a wrong value (no port, no path) could act on the wrong thing.
 */
export function hookRefusal(session: Session): string | null {
  const facts = session.damage.filter((d) => d.table === "sessions" && ["ports", "paths", "labels"].includes(d.column));
  return facts.length === 0
    ? null
    : `not run: the session's stored ${facts.map((d) => d.column).join(" and ")} cannot be read (${describeDamage(facts)}), and a hook would be given a wrong value`;
}

/** One hook's entry in the step detail. */
export type HookReport = HookOutcome & { durationMs: number };

/** How much of a hook's stderr is kept in the step detail. */
const STDERR_TAIL = 1024;

/**
 * What a kind of hook adds to the session's facts: placeholders for its argv, fields for its
 * JSON body, and its name in the log (a warning's hooks: `{reason}` and `{in_sec}`).
 */
export interface HookNotice {
  readonly kind: string;
  readonly placeholders: Readonly<Record<string, string>>;
  readonly body: Readonly<Record<string, unknown>>;
}

/**
 * Runs the profile's release hooks (or a warning's, with `notice`) concurrently, each
 * isolated: its own timeout, its own error handling, its own report. Never rejects; a failing
 * or hanging hook only marks its own report, so the other hooks and the port verification
 * always run.
 */
export function runReleaseHooks(
  hooks: readonly ReleaseHook[],
  /** The profile's `hook_path`: PATH for command hooks. */
  hookPath: string,
  session: Session,
  /** The reap attempt (a hook may run again after a daemon crash: it can tell). */
  attempt: number,
  timeoutMs: number,
  signal: AbortSignal,
  log: Logger,
  notice?: HookNotice,
): Promise<HookReport[]> {
  return Promise.all(
    hooks.map(async (hook): Promise<HookReport> => {
      const t0 = performance.now();
      // The hook's own deadline, or the step's, whichever comes first.
      const controller = new AbortController();
      const timer = setTimeout(() => controller.abort(), timeoutMs);
      const onStepAbort = (): void => controller.abort();
      signal.addEventListener("abort", onStepAbort, { once: true });
      if (signal.aborted) controller.abort();
      try {
        let report: HookOutcome;
        try {
          report =
            hook.kind === "http"
              ? await postHook(hook.url, session, attempt, controller.signal, notice?.body)
              : await commandHook(hook.argv, session, attempt, controller.signal, {
                  path: hookPath,
                  extra: notice?.placeholders,
                });
        } catch (err) {
          // e.g. spawn() throwing synchronously on an argument it refuses
          const error = errorMessage(err);
          report =
            hook.kind === "http"
              ? { hook: "http", url: hook.url, outcome: "failed", error }
              : { hook: "command", argv: hook.argv, outcome: "failed", error };
        }
        const full: HookReport = { ...report, durationMs: Math.round(performance.now() - t0) };
        if (full.outcome !== "ok") log.warn({ hook: full }, `${notice?.kind ?? "release"} hook did not succeed`);
        return full;
      } finally {
        clearTimeout(timer);
        signal.removeEventListener("abort", onStepAbort);
      }
    }),
  );
}

/** POSTs the session's facts (and `extra`'s) as JSON; any 2xx answer is success. Redirects are refused. */
async function postHook(
  url: string,
  session: Session,
  attempt: number,
  signal: AbortSignal,
  extra: Readonly<Record<string, unknown>> = {},
): Promise<HookOutcome> {
  const refused = hookRefusal(session);
  if (refused !== null) return { hook: "http", url, outcome: "failed", error: refused };
  const body = JSON.stringify({
    sessionId: session.id,
    profile: session.profile,
    owner: session.owner,
    enginePid: session.engine.pid,
    ports: session.ports,
    paths: session.paths,
    labels: session.labels,
    ...extra,
  });
  try {
    const res = await fetch(url, {
      method: "POST",
      headers: {
        "content-type": "application/json",
        "x-reaper-session": session.id,
        "x-reaper-attempt": String(attempt),
      },
      body,
      signal,
      redirect: "error",
    });
    await res.arrayBuffer();
    return { hook: "http", url, status: res.status, outcome: res.ok ? "ok" : "failed" };
  } catch (err) {
    if (signal.aborted) return { hook: "http", url, outcome: "timeout", error: "no answer before the timeout" };
    return { hook: "http", url, outcome: "failed", error: errorMessage((err as { cause?: unknown }).cause ?? err) };
  }
}

/**
 * Runs a hook's argv, its placeholders expanded (src/config/hook-template.ts), with the session's facts
 * and the user's HOME, USER and LOGNAME (from the passwd database) in its environment, in a
 * process group of its own, so that on timeout the hook and whatever it started are
 * SIGKILLed together. The group id is the hook's own pid, which cannot have been reused
 * while the hook has not been reaped (no 'exit' yet). Release hooks run as the daemon's user
 * (they talk to the host's registries and lock services, not to the engine); the close hook
 * passes `runAs`, the engine's user. A placeholder the session has no value for fails the
 * hook before anything runs.
 */
export async function commandHook(
  argv: readonly string[],
  session: Session,
  attempt: number,
  signal: AbortSignal,
  opts: {
    path: string;
    runAs?: { uid: number; gid: number };
    /** Placeholders a kind of hook adds (a warning's `{reason}`, `{in_sec}`). */
    extra?: Readonly<Record<string, string>> | undefined;
  },
): Promise<CommandOutcome> {
  const refused = hookRefusal(session);
  if (refused !== null) return { hook: "command", argv, outcome: "failed", error: refused };
  let expanded: string[];
  try {
    expanded = expandArgv(argv, session, opts.extra);
  } catch (err) {
    if (!(err instanceof TemplateError)) throw err;
    return { hook: "command", argv, outcome: "failed", error: `not run: ${err.message}` };
  }
  if (signal.aborted) return { hook: "command", argv: expanded, outcome: "timeout", error: "no time left" };
  const uid = opts.runAs?.uid ?? process.geteuid?.() ?? 0;
  const user = await passwdEntry(uid);
  const [file, ...args] = expanded as [string, ...string[]];
  if (signal.aborted) return { hook: "command", argv: expanded, outcome: "timeout", error: "no time left" };
  return new Promise((resolve) => {
    const child = spawn(file, args, {
      stdio: ["ignore", "ignore", "pipe"],
      detached: true,
      ...(opts.runAs ?? {}),
      cwd: "/", // not the daemon's working directory
      env: {
        PATH: opts.path,
        HOME: user?.home ?? "/",
        ...(user === null ? {} : { USER: user.name, LOGNAME: user.name }),
        SESSION_ID: session.id,
        ENGINE_PID: String(session.engine.pid),
        SESSION_PORTS: session.ports.join(","),
        SESSION_PATHS: session.paths.join(":"),
        REAP_ATTEMPT: String(attempt),
      },
    });
    let stderr = "";
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr = (stderr + d).slice(-STDERR_TAIL)));
    let settled = false;
    const done = (r: HookResult & { exit?: number | string }): void => {
      if (settled) return;
      settled = true;
      signal.removeEventListener("abort", onAbort);
      const tail = stderr.trim();
      resolve({ hook: "command", argv: expanded, ...r, ...(tail ? { stderr: tail } : {}) });
    };
    const onAbort = (): void => {
      if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) {
        try {
          process.kill(-child.pid, "SIGKILL");
        } catch {
          // already gone
        }
      }
      child.stderr.destroy();
      done({ outcome: "timeout", error: "did not exit before the timeout; its process group was killed" });
    };
    signal.addEventListener("abort", onAbort, { once: true });
    child.on("error", (err) => done({ outcome: "failed", error: errorMessage(err) }));
    child.on("exit", (code, sig) => {
      if (signal.aborted) return; // already reported as a timeout
      // What the hook wrote just before exiting may still be in the pipe; a process it left
      // running may hold the pipe open for good, so do not wait for 'close' beyond a moment.
      const finish = (): void => {
        clearTimeout(grace);
        child.stderr.destroy();
        done(code === 0 ? { outcome: "ok", exit: 0 } : { outcome: "failed", exit: code ?? `killed by ${sig}` });
      };
      const grace = setTimeout(finish, 100);
      child.stderr.once("close", finish);
    });
  });
}
