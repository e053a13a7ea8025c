/**
 * Helpers of the fault tests (test/faults/*.test.ts) only: real processes, real files, real
 * mounts. Nothing here mocks a module of the project.
 */
import BetterSqlite3, { type Database } from "better-sqlite3";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdirSync, openSync, closeSync, writeSync } from "node:fs";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { callApi, type ApiResponse } from "../../src/client/transport.js";
import { REAPERD } from "../helpers.js";

type After = { after: (fn: () => void | Promise<void>) => void };

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The API's error envelope. */
export type ErrorBody = { error: { code: string; message: string } };

/** Session fields the fault tests read. */
export type SessionBody = {
  id: string;
  state: "live" | "reaping" | "reaped";
  reason: string | null;
  createdAt: string;
  lastHeartbeatAt: string;
};

/** POST /v1/sessions for an engine pid (an admin caller: the tests run as root). */
export function register(
  socket: string,
  id: string,
  pid: number,
  extra: Record<string, unknown> = {},
  timeoutMs = 10_000,
): Promise<ApiResponse<SessionBody & ErrorBody>> {
  return callApi(socket, "POST", "/v1/sessions", { id, engine: { pid }, ...extra }, { timeoutMs });
}

export async function counts(socket: string): Promise<{ live: number; reaping: number; reaped: number }> {
  const r = await callApi<{ counts: { live: number; reaping: number; reaped: number } }>(socket, "GET", "/v1/daemon");
  return r.body.counts;
}

export async function stateOf(socket: string, id: string): Promise<string> {
  return (await callApi<SessionBody>(socket, "GET", `/v1/sessions/${id}`)).body.state;
}

/** The sum of a metric's samples (all label sets) in GET /metrics, or null when absent. */
export async function metric(socket: string, name: string): Promise<number | null> {
  const text = (await callApi<string>(socket, "GET", "/metrics")).body;
  let sum: number | null = null;
  for (const line of String(text).split("\n")) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})? (\S+)$/.exec(line);
    if (m && m[1] === name) sum = (sum ?? 0) + Number(m[2]);
  }
  return sum;
}

/** The audit lines (JSON, `"audit":true`) among a daemon's output lines. */
export function auditLines(output: string): { event: string; detail?: Record<string, unknown>; sessionId?: string }[] {
  const out: { event: string; detail?: Record<string, unknown>; sessionId?: string }[] = [];
  for (const line of output.split("\n")) {
    if (!line.startsWith("{")) continue;
    try {
      const o = JSON.parse(line) as { audit?: boolean; event?: string };
      if (o.audit === true && typeof o.event === "string") out.push(o as never);
    } catch {
      // a partial line (the daemon is still writing) or not JSON
    }
  }
  return out;
}

/** The database opened read-only (closed when the test ends). */
export function readDb(t: After, path: string): Database {
  const db = new BetterSqlite3(path, { readonly: true, fileMustExist: true });
  t.after(() => {
    if (db.open) db.close();
  });
  return db;
}

export interface HeartbeatSample {
  id: string;
  status: number;
  /** performance.now() when sent and when answered (or failed). */
  sentAt: number;
  ms: number;
  error?: string;
}

/**
 * Heartbeats every id every `periodMs`, as engines' clients do: one loop per id, each
 * waiting for its answer before the next heartbeat (a daemon that does not answer holds a
 * client up, as it would a real one), the ids' phases spread evenly over the period (clients
 * are not in step). `quiet(id)` stops one id's heartbeats. `stop()` ends the loops and
 * returns every sample; the loops also end with the test.
 *
 * `fresh`: one connection per heartbeat (`Connection: close`) instead of Node's keep-alive
 * agent. A heartbeat sent on a kept-alive connection races the daemon's keep-alive timeout
 * (HTTP's well-known race: the server closes a connection it sees idle as the request
 * arrives, ECONNRESET, which clients such as src/client retry); after a stall longer than
 * api.keep_alive_timeout_ms every held-up heartbeat on such a connection loses that race.
 */
export function heartbeats(
  t: After,
  socket: string,
  ids: readonly string[],
  periodMs = 1000,
  opts: { timeoutMs?: number; fresh?: boolean } = {},
): {
  samples: HeartbeatSample[];
  quiet(id: string): void;
  /** performance.now() of the last 200 answer for `id`, if any. */
  lastOk(id: string): number | undefined;
  stop(): Promise<HeartbeatSample[]>;
} {
  const samples: HeartbeatSample[] = [];
  const silent = new Set<string>();
  const lastOk = new Map<string, number>();
  let stopped = false;
  const wakers = new Set<() => void>();
  const pause = (ms: number): Promise<void> =>
    new Promise<void>((r) => {
      const timer = setTimeout(done, ms);
      function done(): void {
        clearTimeout(timer);
        wakers.delete(done);
        r();
      }
      wakers.add(done);
    });
  const end = (): void => {
    stopped = true;
    for (const w of [...wakers]) w();
  };
  const loops = ids.map(async (id, i) => {
    await pause((i * periodMs) / ids.length);
    while (!stopped && !silent.has(id)) {
      const sentAt = performance.now();
      try {
        const r = await callApi(socket, "POST", `/v1/sessions/${id}/heartbeat`, undefined, {
          timeoutMs: opts.timeoutMs ?? 30_000,
          ...(opts.fresh ? { headers: { connection: "close" } } : {}),
        });
        const now = performance.now();
        if (r.status === 200) lastOk.set(id, now);
        samples.push({ id, status: r.status, sentAt, ms: now - sentAt });
      } catch (err) {
        samples.push({ id, status: 0, sentAt, ms: performance.now() - sentAt, error: String(err) });
      }
      if (stopped) break;
      await pause(Math.max(0, periodMs - (performance.now() - sentAt)));
    }
  });
  // A failed assertion must not leave the loops (and so the test process) running.
  t.after(end);
  return {
    samples,
    quiet: (id) => void silent.add(id),
    lastOk: (id) => lastOk.get(id),
    async stop() {
      end();
      await Promise.all(loops);
      return samples;
    },
  };
}

/** The p-th percentile (0-100) of `values`, nearest rank. */
export function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))] as number;
}

export interface Finished {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** Milliseconds from spawn to exit. */
  ms: number;
}

/**
 * Runs reaperd (optionally as another user, through setpriv) and waits up to `timeoutMs`
 * for it to exit; a daemon still running then is killed and reported with `code: null,
 * signal: "SIGKILL"`, so a hang is a failed assertion, never a hung test.
 */
export function runReaperd(
  t: After,
  configFile: string,
  opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv; user?: { uid: number; gid: number } } = {},
): { proc: ChildProcess; finished: Promise<Finished> } {
  const argv = [REAPERD, "--config", configFile];
  const [cmd, args] = opts.user
    ? [
        "setpriv",
        [
          "--reuid",
          String(opts.user.uid),
          "--regid",
          String(opts.user.gid),
          "--clear-groups",
          "--",
          process.execPath,
          ...argv,
        ],
      ]
    : [process.execPath, argv];
  const t0 = performance.now();
  const proc = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...opts.env } });
  t.after(() => void proc.kill("SIGKILL"));
  let stdout = "";
  let stderr = "";
  proc.stdout?.setEncoding("utf8").on("data", (d: string) => (stdout += d));
  proc.stderr?.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  const finished = new Promise<Finished>((resolve) => {
    let ms = 0;
    const timer = setTimeout(() => proc.kill("SIGKILL"), opts.timeoutMs ?? 10_000);
    proc.once("exit", () => (ms = performance.now() - t0));
    proc.once("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, ms });
    });
  });
  return { proc, finished };
}

/**
 * Mounts a tmpfs of `size` (mount(8)'s size=, e.g. "2m") at `dir`/`name` and returns its
 * path. `dir` must come from tempDir: tempDir's cleanup unmounts what lies below it.
 */
export function mountTmpfs(dir: string, name: string, size: string): string {
  const at = join(dir, name);
  mkdirSync(at);
  const r = spawnSync("mount", ["-t", "tmpfs", "-o", `size=${size},mode=0755`, "tmpfs", at], { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`mount tmpfs at ${at}: ${r.stderr}`);
  return at;
}

/**
 * Writes `file` until the file system answers ENOSPC (whole 64 KiB blocks, then single
 * bytes: nothing is left); returns the bytes written.
 */
export function fillUp(file: string): number {
  const fd = openSync(file, "w");
  let written = 0;
  try {
    for (const size of [65536, 4096, 1]) {
      const block = Buffer.alloc(size, 0x5a);
      for (;;) {
        try {
          written += writeSync(fd, block);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === "ENOSPC") break;
          throw err;
        }
      }
    }
  } finally {
    closeSync(fd);
  }
  return written;
}

/**
 * `call`'s answer; a transport failure (the daemon died mid-request) is rethrown with the
 * daemon's exit and the end of its output, which say more than ECONNRESET.
 */
export async function orDied<T>(daemon: { proc: ChildProcess; output: () => string }, call: Promise<T>): Promise<T> {
  try {
    return await call;
  } catch (err) {
    await sleep(200);
    const { exitCode, signalCode } = daemon.proc;
    throw new Error(
      `${String(err)}; the daemon: exit ${exitCode}, signal ${signalCode}; output: ${daemon.output().slice(-2000)}`,
    );
  }
}
