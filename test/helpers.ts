import { execFileSync, spawn, spawnSync, type ChildProcess } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, readdirSync, rmdirSync, rmSync, writeFileSync } from "node:fs";
import { once } from "node:events";
import { createServer, type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { RecordedAuditEvent } from "../src/audit/audit.js";
import { callApi, type ApiResponse } from "../src/client/transport.js";
import type { Clock } from "../src/clock.js";
import { buildConfig, type Config } from "../src/config/load.js";
import { Daemon, type DaemonOptions } from "../src/daemon/daemon.js";
import { mountPoints } from "../src/paths/validate.js";
import { cgroup2Mount } from "../src/proc/cgroup.js";
import { readStat, isExited } from "../src/proc/stat.js";
import { NOT_YET_REAPED, type ProcessIdentity, type Session } from "../src/model/session.js";

export const ENGINE = fileURLToPath(new URL("./fixtures/engine.js", import.meta.url));
export const REAPERD = fileURLToPath(new URL("../src/main.js", import.meta.url));
export const REAPERCTL = fileURLToPath(new URL("../src/cli/reaperctl.js", import.meta.url));

/** A temp dir removed when the test ends. */
export function tempDir(t: { after: (fn: () => void) => void }, prefix = "sr-test-"): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.after(() => {
    // A test's bind mounts go first: rmSync would descend into them (same file system).
    for (const m of mountPoints()
      .filter((p) => p.startsWith(dir + "/"))
      .reverse())
      spawnSync("umount", ["-l", m]);
    rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}

/** A TOML-shaped config document for an in-process daemon rooted in `dir`. */
export function testConfig(dir: string, doc: Record<string, unknown> = {}): Config {
  const profiles = (doc.profiles ?? {}) as Record<string, Record<string, unknown>>;
  const base = {
    grace_period_sec: 1,
    step_timeout_sec: 5,
    allowed_roots: [dir],
    ...(profiles.default ?? {}),
  };
  return buildConfig(
    {
      ...doc,
      api: { socket: join(dir, "reaper.sock"), ...(doc.api as object) },
      store: { path: join(dir, "reaper.db"), flush_interval_ms: 50, ...(doc.store as object) },
      log: { level: "warn", ...(doc.log as object) },
      profiles: { ...profiles, default: base },
    },
    null,
    { env: {}, cwd: dir },
  );
}

export interface TestDaemon {
  daemon: Daemon;
  socket: string;
  lines: string[];
  api<T = Record<string, unknown>>(method: string, path: string, body?: unknown): Promise<ApiResponse<T>>;
  /** Resolves with the first audit event matching `pred` (also one already recorded). */
  waitFor(pred: (e: RecordedAuditEvent) => boolean, timeoutMs?: number): Promise<RecordedAuditEvent>;
  reaped(sessionId: string, timeoutMs?: number): Promise<RecordedAuditEvent>;
  stop(): Promise<void>;
}

/**
 * A real daemon in this process, on a real unix socket and a real SQLite file; `extra`: the
 * daemon's other options (test-only timings: eventStreams).
 */
export async function startDaemon(
  t: { after: (fn: () => Promise<void> | void) => void },
  config: Config,
  clock?: Clock,
  extra: Omit<DaemonOptions, "config" | "clock" | "logStream"> = {},
): Promise<TestDaemon> {
  const lines: string[] = [];
  const seen: RecordedAuditEvent[] = [];
  const daemon = new Daemon({ ...extra, config, clock, logStream: { write: (s: string) => void lines.push(s) } });
  daemon.audit.events.on("audit", (e) => seen.push(e));
  await daemon.start();
  await daemon.listen();
  const stop = async (): Promise<void> => {
    if (daemon.state !== "stopped") await daemon.stop();
  };
  t.after(stop);
  removeCgroupBaseAfter(t, config.store.path); // after the stop (hooks run in order)
  const waitFor = (pred: (e: RecordedAuditEvent) => boolean, timeoutMs = 15_000): Promise<RecordedAuditEvent> => {
    const found = seen.find(pred);
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        daemon.audit.events.off("audit", on);
        reject(
          new Error(`no matching audit event within ${timeoutMs} ms; seen: ${seen.map((e) => e.event).join(",")}`),
        );
      }, timeoutMs);
      const on = (e: RecordedAuditEvent): void => {
        if (!pred(e)) return;
        clearTimeout(timer);
        daemon.audit.events.off("audit", on);
        resolve(e);
      };
      daemon.audit.events.on("audit", on);
    });
  };
  return {
    daemon,
    socket: config.api.socket,
    lines,
    api: (method, path, body) => callApi(config.api.socket, method, path, body),
    waitFor,
    reaped: (id, timeoutMs) => waitFor((e) => e.event === "reap.finished" && e.sessionId === id, timeoutMs),
    stop,
  };
}

export interface Engine {
  pid: number;
  port: number;
  children: number[];
  /** The engine's and its children's identities when it said it was ready. */
  started: { pid: number; startTime: number | undefined }[];
  dir: string | undefined;
  child: ChildProcess;
  exited: Promise<void>;
}

/** Starts the engine fixture; killed (whole group) when the test ends if still running. */
export async function startEngine(
  t: { after: (fn: () => void) => void },
  args: string[] = [],
  dir?: string,
  opts: { detached?: boolean; user?: TestUser; uid?: number } = {},
): Promise<Engine> {
  // detached: the engine leads its own session and process group, as launchers do.
  const child = spawn(process.execPath, [ENGINE, ...(dir ? ["--dir", dir] : []), ...args], {
    stdio: ["ignore", "pipe", "inherit"],
    detached: opts.detached ?? false,
    ...(opts.user ? { uid: opts.user.uid, gid: opts.user.gid } : {}),
    // Another user's engine (the tests run as root): its group is the same number.
    ...(opts.uid === undefined ? {} : { uid: opts.uid, gid: opts.uid }),
  });
  const exited = new Promise<void>((r) => child.once("exit", () => r()));
  const ready = await new Promise<{ pid: number; port: number; children: number[] }>((resolve, reject) => {
    child.stdout?.setEncoding("utf8").once("data", (line: string) => resolve(JSON.parse(line) as never));
    child.once("exit", (code) => reject(new Error(`engine exited early with ${code}`)));
  });
  // Identities now: by the time the test ends, these pids may name other processes.
  const started = [ready.pid, ...ready.children].map((pid) => ({ pid, startTime: readStat(pid)?.startTime }));
  t.after(() => {
    for (const p of started) killIfSame(p.pid, p.startTime);
  });
  return { ...ready, started, dir, child, exited };
}

/**
 * Sends `signal` to `pid` only if it still names the process that started at `startTime` (read
 * when the test learnt the pid). A test's cleanup runs long after: by then the pid may be
 * another test's process, or a thread of another test file's process (thread ids share the pid
 * space, and kill(2) on a thread's id kills its whole process). `startTime` undefined: the pid
 * was already gone when it was learnt, so nothing is sent.
 */
export function killIfSame(pid: number, startTime: number | undefined, signal: NodeJS.Signals = "SIGKILL"): void {
  const st = readStat(pid);
  if (startTime === undefined || st === null || isExited(st) || st.startTime !== startTime) return;
  try {
    process.kill(pid, signal);
  } catch {
    // gone meanwhile
  }
}

/** The start time of `pid` now (undefined when it is gone): what killIfSame checks later. */
export function startTimeOf(pid: number): number | undefined {
  return readStat(pid)?.startTime;
}

/** A process is gone for the reaper when it does not exist or is a zombie. */
export function isGone(pid: number): boolean {
  const st = readStat(pid);
  return st === null || isExited(st);
}

/** Whether the process that started at `startTime` under `pid` is gone (a recycled pid names another). */
export function isGoneProcess(p: { pid: number; startTime: number | undefined }): boolean {
  const st = readStat(p.pid);
  return st === null || isExited(st) || st.startTime !== p.startTime;
}

/** Whether a test bind on 127.0.0.1:port succeeds. */
export function portFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.once("error", () => resolve(false));
    srv.listen({ port, host: "127.0.0.1", exclusive: true }, () => srv.close(() => resolve(true)));
  });
}

export async function until(
  cond: () => boolean | Promise<boolean>,
  timeoutMs = 10_000,
  what = "condition",
): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`${what} not reached within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * Writes the config of a daemon run as a separate process: its socket and database in
 * `dir`, then `extra` (more TOML sections: [reaper], [profiles.default], …).
 */
export function writeDaemonConfig(dir: string, extra = ""): { file: string; socket: string; db: string } {
  const socket = join(dir, "reaper.sock");
  const db = join(dir, "reaper.db");
  const file = writeConfig(dir, `[api]\nsocket = "${socket}"\n[store]\npath = "${db}"\n${extra}`);
  return { file, socket, db };
}

/** Writes a TOML config file for a daemon run as a separate process. */
export function writeConfig(dir: string, toml: string): string {
  const file = join(dir, "config.toml");
  writeFileSync(file, toml);
  return file;
}

/** Starts reaperd as a real process; resolves once its socket answers. */
export async function spawnDaemon(
  t: { after: (fn: () => void) => void },
  configFile: string,
  socket: string,
  env: NodeJS.ProcessEnv = {},
  /** A command line the daemon runs under (e.g. setpriv dropping a capability). */
  wrap: readonly string[] = [],
): Promise<{ proc: ChildProcess; exit: Promise<number | null>; output: () => string }> {
  const argv = [...wrap, process.execPath, REAPERD, "--config", configFile];
  const proc = spawn(argv[0] as string, argv.slice(1), {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, ...env },
  });
  let out = "";
  proc.stdout?.setEncoding("utf8").on("data", (d: string) => (out += d));
  proc.stderr?.setEncoding("utf8").on("data", (d: string) => (out += d));
  const exit = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
  t.after(() => void proc.kill("SIGKILL"));
  // The database this daemon runs on (written by writeDaemonConfig): its cgroup base goes after the test.
  const db = /^path = "(.*)"$/m.exec(readFileSync(configFile, "utf8"))?.[1];
  if (db !== undefined) removeCgroupBaseAfter(t, db);
  await until(
    async () => {
      if (proc.exitCode !== null) throw new Error(`reaperd exited with ${proc.exitCode}: ${out}`);
      try {
        return (await callApi(socket, "GET", "/readyz")).status === 200;
      } catch {
        return false;
      }
    },
    15_000,
    "daemon ready",
  );
  return { proc, exit, output: () => out };
}

/** A real child process (default `sleep 30`), killed when the test ends. */
export function sleeper(
  t: { after: (fn: () => void) => void },
  cmd = "sleep",
  args = ["30"],
): ChildProcess & { pid: number } {
  const child = spawn(cmd, args, { stdio: "ignore" });
  t.after(() => void child.kill("SIGKILL"));
  if (child.pid === undefined) throw new Error(`could not start ${cmd}`);
  return child as ChildProcess & { pid: number };
}

/** Resolves once the child has exited (at once if it already has). */
export function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((r) => child.once("exit", () => r()));
}

export const API_CLIENT = fileURLToPath(new URL("./fixtures/api-client.js", import.meta.url));

export interface TestUser {
  name: string;
  uid: number;
  gid: number;
}

/**
 * A real second user (useradd; the tests run as root), removed when the test ends. With
 * `groups`, the user is also a member of those (existing) groups.
 */
export function testUser(t: { after: (fn: () => void) => void }, groups: string[] = []): TestUser {
  const name = `sr${randomBytes(4).toString("hex")}`;
  execFileSync("useradd", [
    "--no-create-home",
    "--shell",
    "/usr/sbin/nologin",
    "--user-group",
    ...(groups.length > 0 ? ["--groups", groups.join(",")] : []),
    name,
  ]);
  const id = (flag: string): number => Number(execFileSync("id", [flag, name], { encoding: "utf8" }).trim());
  const user = { name, uid: id("-u"), gid: id("-g") };
  // Never throws: a failing after-hook would skip the others (the daemon's stop among them).
  t.after(() => {
    spawnSync("pkill", ["-KILL", "-U", String(user.uid)]);
    spawnSync("userdel", ["--force", name]);
  });
  return user;
}

/** A real group (groupadd), removed when the test ends. */
export function testGroup(t: { after: (fn: () => void) => void }): { name: string; gid: number } {
  const name = `srg${randomBytes(4).toString("hex")}`;
  execFileSync("groupadd", [name]);
  t.after(() => {
    spawnSync("groupdel", [name]);
  });
  const line =
    readFileSync("/etc/group", "utf8")
      .split("\n")
      .find((l) => l.startsWith(`${name}:`)) ?? "";
  return { name, gid: Number(line.split(":")[2]) };
}

/** Calls the API from a process running as `user`: the daemon sees that uid through SO_PEERCRED. */
export interface UserClient {
  call<T = Record<string, unknown>>(method: string, path: string, body?: unknown): Promise<{ status: number; body: T }>;
}

export function apiAs(t: { after: (fn: () => void) => void }, user: TestUser, socket: string): UserClient {
  // setpriv --init-groups: the user's supplementary groups too, as at a real login (Node's
  // spawn with uid/gid drops them all).
  const child = spawn(
    "setpriv",
    [
      "--reuid",
      String(user.uid),
      "--regid",
      String(user.gid),
      "--init-groups",
      "--",
      process.execPath,
      API_CLIENT,
      socket,
    ],
    { stdio: ["pipe", "pipe", "inherit"] },
  );
  t.after(() => {
    child.stdin?.end();
    child.kill("SIGKILL");
  });
  const waiting: ((line: string) => void)[] = [];
  child.stdout?.setEncoding("utf8");
  let buffered = "";
  child.stdout?.on("data", (d: string) => {
    buffered += d;
    let nl;
    while ((nl = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      waiting.shift()?.(line);
    }
  });
  return {
    call: (method, path, body) =>
      new Promise((resolve) => {
        waiting.push((line) => resolve(JSON.parse(line) as never));
        child.stdin?.write(JSON.stringify({ method, path, body }) + "\n");
      }),
  };
}

/** A made-up live session row for store tests (the pid need not exist). */
export function storedSession(id: string, over: Partial<Session> = {}, t0 = Date.UTC(2026, 0, 1)): Session {
  return {
    id,
    profile: "default",
    owner: "alice",
    engine: { pid: 4242, startTime: 123456, bootId: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", uid: 1000 },
    ownerPid: null,
    ports: [],
    paths: [],
    labels: {},
    heartbeatTimeoutSec: 30,
    idleTimeoutSec: 3600,
    maxLifetimeSec: 0,
    createdAt: t0,
    lastHeartbeatAt: t0,
    lastActivityAt: t0,
    deadline: t0 + 30_000,
    ...NOT_YET_REAPED,
    registeredBy: { uid: 1000, admin: false, via: "unix" },
    containment: null,
    tracking: null,
    ...over,
  };
}

/**
 * After the test: removes the empty session cgroups a daemon on this database made (sessions
 * still live when a test daemon stops keep theirs, as in production, for the next start),
 * and the daemon's own base (`session-reaper/<hash of the database path>` at the cgroup v2
 * root), so that runs do not pile up directories in the host's cgroup tree.
 */
export function removeCgroupBaseAfter(t: { after: (fn: () => void) => void }, db: string): void {
  t.after(() => {
    const mount = cgroup2Mount();
    if (mount === null) return;
    const base = join(mount, "session-reaper", createHash("sha256").update(db).digest("hex").slice(0, 8));
    let names: string[] = [];
    try {
      names = readdirSync(base, { withFileTypes: true })
        .filter((e) => e.isDirectory())
        .map((e) => e.name);
    } catch {
      return; // never made
    }
    for (const n of names) {
      try {
        rmdirSync(join(base, n));
      } catch {
        // populated: left for the next run to see
      }
    }
    try {
      rmdirSync(base);
    } catch {
      // not empty
    }
  });
}

/** A port this test process listens on (outside any engine's tree), closed when the test ends. */
export async function foreignPort(t: { after: (fn: () => Promise<void>) => void }): Promise<number> {
  const server = createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  t.after(() => new Promise<void>((r) => server.close(() => r())));
  return (server.address() as AddressInfo).port;
}

/** A port nobody listens on (bound, then released). */
export async function unusedPort(): Promise<number> {
  const server = createServer().listen(0, "127.0.0.1");
  await once(server, "listening");
  const port = (server.address() as AddressInfo).port;
  await new Promise<void>((r) => server.close(() => r()));
  return port;
}

/**
 * A session being reaped (forced, by root), as a step or the verification receives it: for
 * tests that run a step or the verification directly on a journal they write themselves.
 */
export function reapingSession(id: string, engine: ProcessIdentity, ports: number[]): Session {
  return {
    id,
    profile: "default",
    owner: null,
    engine,
    ownerPid: null,
    ports,
    paths: [],
    labels: {},
    heartbeatTimeoutSec: 30,
    idleTimeoutSec: 30,
    maxLifetimeSec: 0,
    createdAt: 0,
    lastHeartbeatAt: 0,
    lastActivityAt: 0,
    deadline: null,
    state: "reaping",
    reason: "forced",
    outcome: null,
    leftovers: [],
    reapStartedAt: 0,
    reapedAt: null,
    reapAttempts: 1,
    registeredBy: { uid: 0, admin: true, via: "unix" },
    containment: null,
    tracking: null,
    damage: [],
  };
}
