import type { ChildProcess } from "node:child_process";
import { closeSync, openSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { callApi, type ApiResponse } from "../../src/client/transport.js";
import { exited, start } from "./resources.js";
import { sleep } from "./report.js";

export const REAPERD = fileURLToPath(new URL("../../src/main.js", import.meta.url));
/** The node flags of systemd/session-reaper.service's ExecStart: the daemon is measured as deployed. */
export const DEPLOYED_NODE_FLAGS = ["--max-semi-space-size=2"];
/**
 * BENCH_DAEMON_NODE_ARGS: more node flags for every reaperd a figure starts, for looking into
 * one (e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof"); never set for the figures as reported.
 */
const PROFILE_NODE_ARGS = (process.env.BENCH_DAEMON_NODE_ARGS ?? "").split(" ").filter(Boolean);
/** The test suite's stand-in for systemd's notification socket (prints each datagram, timed). */
const NOTIFY_FIXTURE = fileURLToPath(new URL("../../../test/fixtures/notify_socket.py", import.meta.url));

export interface ReaperdOptions {
  /** Holds the socket, the database (unless `db`), the config and the stdout log. */
  dir: string;
  /** An existing database to start on (e.g. seeded with sessions). */
  db?: string;
  /** More TOML after [api] and [store] ([reaper], [profiles.default], …). */
  toml?: string;
  /** flush_interval_ms; default the daemon's (1000). */
  flushIntervalMs?: number;
  /** More [store] keys (e.g. "retain_reaped_sec = 60"), one per line. */
  storeToml?: string;
  env?: NodeJS.ProcessEnv;
  /** Another build's dist/src/main.js (before/after comparisons); default this build's. */
  reaperd?: string;
  /** Extra node flags (e.g. --cpu-prof when profiling). */
  nodeArgs?: readonly string[];
}

export interface Reaperd {
  pid: number;
  socket: string;
  db: string;
  /** The daemon's stdout (log and audit lines, JSON), written to a file as journald would receive it. */
  logFile: string;
  proc: ChildProcess;
  /** Milliseconds from spawn to READY=1 on $NOTIFY_SOCKET (migrations, recovery and listening done). */
  readyMs: number;
  api<T = Record<string, unknown>>(method: string, path: string, body?: unknown): Promise<ApiResponse<T>>;
  /** Graceful stop (SIGTERM), SIGKILL after `timeoutMs`. */
  stop(timeoutMs?: number): Promise<void>;
}

/**
 * Starts reaperd as a separate process, as systemd would: its own pid (so /proc/<pid> gives
 * its CPU time and RSS alone), NOTIFY_SOCKET set (READY=1 is timed, and the STATUS= timer
 * runs as in production), stdout to a file.
 */
export async function startReaperd(opts: ReaperdOptions): Promise<Reaperd> {
  const socket = join(opts.dir, "reaper.sock");
  const db = opts.db ?? join(opts.dir, "reaper.db");
  const config = join(opts.dir, "config.toml");
  const flush = opts.flushIntervalMs === undefined ? "" : `flush_interval_ms = ${opts.flushIntervalMs}\n`;
  const store = opts.storeToml === undefined ? "" : `${opts.storeToml}\n`;
  writeFileSync(config, `[api]\nsocket = "${socket}"\n[store]\npath = "${db}"\n${flush}${store}${opts.toml ?? ""}\n`);

  const notifyPath = join(opts.dir, "notify.sock");
  const notify = start("python3", [NOTIFY_FIXTURE, notifyPath], { stdio: ["ignore", "pipe", "inherit"] });
  const messages: { t: number; msg: string }[] = [];
  let buffered = "";
  const notified = new Promise<void>((resolve, reject) => {
    notify.stdout?.setEncoding("utf8").on("data", (d: string) => {
      buffered += d;
      let nl;
      while ((nl = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        if (line === "ready") resolve();
        else messages.push(JSON.parse(line) as { t: number; msg: string });
      }
    });
    notify.once("exit", (code) => reject(new Error(`notify socket helper exited with ${code}`)));
  });
  await notified;

  const logFile = join(opts.dir, "reaperd.log");
  const out = openSync(logFile, "a");
  let stderr = "";
  const t0 = Date.now();
  const proc = start(
    process.execPath,
    [
      ...DEPLOYED_NODE_FLAGS,
      ...PROFILE_NODE_ARGS,
      ...(opts.nodeArgs ?? []),
      opts.reaperd ?? REAPERD,
      "--config",
      config,
    ],
    {
      stdio: ["ignore", out, "pipe"],
      env: { ...process.env, REAPER_LOG_LEVEL: "", ...opts.env, NOTIFY_SOCKET: notifyPath },
    },
  );
  closeSync(out);
  proc.stderr?.setEncoding("utf8").on("data", (d: string) => (stderr += d));

  let readyAt: number | undefined;
  for (;;) {
    readyAt = messages.find((m) => /^READY=1$/m.test(m.msg))?.t;
    if (readyAt !== undefined) break;
    if (proc.exitCode !== null || proc.signalCode !== null) {
      throw new Error(`reaperd exited (${proc.exitCode ?? proc.signalCode}) before READY: ${stderr.slice(-2000)}`);
    }
    if (Date.now() - t0 > 120_000) throw new Error("reaperd not READY within 120 s");
    await sleep(5);
  }
  const pid = proc.pid as number;
  return {
    pid,
    socket,
    db,
    logFile,
    proc,
    readyMs: readyAt - t0,
    api: (method, path, body) => callApi(socket, method, path, body, { timeoutMs: 60_000 }),
    async stop(timeoutMs = 30_000) {
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill("SIGTERM");
        const timer = setTimeout(() => proc.kill("SIGKILL"), timeoutMs);
        await exited(proc);
        clearTimeout(timer);
      }
      notify.kill("SIGKILL");
      await exited(notify);
    },
  };
}

/** The daemon's stdout lines parsed as JSON (lines that are not JSON are skipped). */
export function logLines(file: string): Record<string, unknown>[] {
  const out: Record<string, unknown>[] = [];
  for (const line of readFileSync(file, "utf8").split("\n")) {
    if (!line.startsWith("{")) continue;
    try {
      out.push(JSON.parse(line) as Record<string, unknown>);
    } catch {
      // a line cut by a kill
    }
  }
  return out;
}
