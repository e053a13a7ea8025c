/**
 * Real engines for the reaper's end-to-end tests: a PostgreSQL cluster (started directly, or
 * through the daemonizing `pg_ctl start`) and a Redis server, each run as a real non-root
 * test user in a temp dir that user owns; and checks of what is left that do not use the
 * daemon's code: /proc for processes, `ss` for listeners, lstat for paths.
 *
 * What PostgreSQL 15 looks like here (`ps -o pid,ppid,pgid,sid,stat,cmd`, postmaster started
 * from a shell, one busy backend):
 *
 *     PID  PPID  PGID   SID STAT CMD
 *   26652     1 26647 24824 S    postgres -D …/data -p 54999 -k …/sock -c listen_addresses=127.0.0.1
 *   26654 26652 26654 26654 Ss   postgres: checkpointer
 *   26655 26652 26655 26655 Ss   postgres: background writer
 *   26657 26652 26657 26657 Ss   postgres: walwriter
 *   26658 26652 26658 26658 Ss   postgres: autovacuum launcher
 *   26659 26652 26659 26659 Ss   postgres: logical replication launcher
 *   26683 26652 26683 26683 Rs   postgres: postgres postgres 127.0.0.1(58584) DO
 *
 * The postmaster stays in its launcher's group and session, but every child it forks calls
 * setsid() (InitPostmasterChild): each backend and auxiliary process leads a session and a
 * group of its own, tied to the postmaster by its parent pid alone. SIGKILL the postmaster
 * and the auxiliary processes notice (postmaster-death pipe) and exit, but a backend in a
 * CPU loop does not look: it runs on, re-parented to pid 1, with its own pgid/sid, its cwd
 * in the data dir and its ESTABLISHED socket on the cluster's port. (On this machine pid 1
 * reaps re-parented zombies only lazily: they linger as Z for a while; gone for us.)
 *
 * `pg_ctl start` forks a child that calls setsid() and execs `/bin/sh -c "exec postgres …"`,
 * waits until postmaster.pid says ready, and exits 0: the postmaster lives on, in a session
 * of its own, re-parented to pid 1.
 *
 * Redis' BGSAVE child (`redis-rdb-bgsave`) is a plain fork: same group and session as the
 * server, parent pid the server's.
 */
import { execFile, spawn, spawnSync, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import {
  chmodSync,
  chownSync,
  closeSync,
  existsSync,
  lstatSync,
  mkdirSync,
  openSync,
  readFileSync,
  readdirSync,
  rmSync,
} from "node:fs";
import { createServer, type AddressInfo } from "node:net";
import { join } from "node:path";
import type { Session } from "../../src/client/index.js";
import { REAPERCTL, tempDir, until, type TestUser } from "../helpers.js";

type After = { after: (fn: () => void | Promise<void>) => void };

/** The newest installed PostgreSQL's binaries (Debian: /usr/lib/postgresql/<major>/bin). */
export const PG_BIN = ((): string => {
  const root = "/usr/lib/postgresql";
  const majors = existsSync(root)
    ? readdirSync(root)
        .filter((v) => /^\d+$/.test(v) && existsSync(join(root, v, "bin", "postgres")))
        .sort((a, b) => Number(b) - Number(a))
    : [];
  return join(root, majors[0] ?? "15", "bin");
})();
const pg = (tool: string): string => join(PG_BIN, tool);

// ---------------------------------------------------------------------------------------
// Independent verification: /proc, ss, lstat. Nothing here uses the daemon's modules.
// ---------------------------------------------------------------------------------------

/** One process as /proc shows it now. */
export interface ProcInfo {
  pid: number;
  ppid: number;
  pgid: number;
  sid: number;
  state: string;
  /** /proc/<pid>/stat field 22: with the pid, the process's identity. */
  start: number;
  uid: number;
  cmd: string;
}

/** /proc/<pid>/stat and status, or null if there is no such process. */
export function procInfo(pid: number): ProcInfo | null {
  let stat: string;
  let status: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    status = readFileSync(`/proc/${pid}/status`, "utf8");
  } catch {
    return null;
  }
  // comm may hold spaces and parentheses: the fields start after the last ")".
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const uid = /^Uid:\s+(\d+)/m.exec(status)?.[1];
  let cmd = "";
  try {
    cmd = readFileSync(`/proc/${pid}/cmdline`, "utf8").replace(/\0+$/, "").replaceAll("\0", " ");
  } catch {
    // exited meanwhile
  }
  if (cmd === "") cmd = `[${stat.slice(stat.indexOf("(") + 1, stat.lastIndexOf(")"))}]`;
  return {
    pid,
    state: f[0] ?? "?",
    ppid: Number(f[1]),
    pgid: Number(f[2]),
    sid: Number(f[3]),
    start: Number(f[19]),
    uid: Number(uid),
    cmd,
  };
}

/** A process as seen once: pid and start time, so a reused pid is never mistaken for it. */
export interface ProcId {
  pid: number;
  start: number;
}

export function procId(pid: number): ProcId {
  const p = procInfo(pid);
  if (p === null) throw new Error(`no process ${pid}`);
  return { pid, start: p.start };
}

/** Whether the process runs: it exists, is no zombie (Z) or dead (X), and (for a ProcId) is still the same process. */
export function procAlive(p: number | ProcId): boolean {
  const id = typeof p === "number" ? { pid: p, start: undefined } : p;
  const info = procInfo(id.pid);
  if (info === null || info.state === "Z" || info.state === "X") return false;
  return id.start === undefined || info.start === id.start;
}

/** Every live (non-zombie) process of a uid, from /proc. */
export function processesOf(uid: number): ProcInfo[] {
  const out: ProcInfo[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    const p = procInfo(Number(name));
    if (p !== null && p.uid === uid && p.state !== "Z" && p.state !== "X") out.push(p);
  }
  return out.sort((a, b) => a.pid - b.pid);
}

/** `ps`-style lines of a uid's live processes, for messages and diagnostics. */
export function psOf(uid: number): string {
  const rows = processesOf(uid).map(
    (p) =>
      `${String(p.pid).padStart(7)} ${String(p.ppid).padStart(7)} ${String(p.pgid).padStart(7)} ${String(p.sid).padStart(7)} ${p.state.padEnd(4)} ${p.cmd}`,
  );
  return ["    PID    PPID    PGID     SID STAT CMD", ...rows].join("\n");
}

/** Who listens on a TCP port, from `ss -Htlnp sport = :P` (empty: nobody). */
export function listening(port: number): { pid: number; comm: string; line: string }[] {
  return ssUsers(["-Htlnp", `sport = :${port}`]);
}

/** The sockets `ss ARGS` lists, one entry per process using each (pid 0 when ss names none). */
export function ssUsers(args: readonly string[]): { pid: number; comm: string; line: string }[] {
  const r = spawnSync("ss", args, { encoding: "utf8", timeout: 10_000 });
  if (r.status !== 0) throw new Error(`ss failed: ${r.stderr || r.error?.message}`);
  const out: { pid: number; comm: string; line: string }[] = [];
  for (const line of r.stdout.split("\n").filter((l) => l.trim() !== "")) {
    const users = [...line.matchAll(/\("([^"]*)",pid=(\d+),fd=\d+\)/g)];
    if (users.length === 0) out.push({ pid: 0, comm: "?", line });
    for (const u of users) out.push({ pid: Number(u[2]), comm: u[1] ?? "?", line });
  }
  return out;
}

/** Whether nothing exists at `p` (lstat: a dangling symlink is something). */
export function pathGone(p: string): boolean {
  try {
    lstatSync(p);
    return false;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return true;
    throw err;
  }
}

/** What is really left of an engine after its reap. */
export interface Found {
  processes: ProcInfo[];
  ports: { port: number; holders: { pid: number; comm: string }[] }[];
  paths: string[];
}

/**
 * Looks for what an engine run as `uid` left behind: every live process of that uid (the
 * test user runs nothing but the engine), listeners on `ports`, and `paths` that exist.
 */
export function leftBehind(uid: number, ports: readonly number[], paths: readonly string[]): Found {
  return {
    processes: processesOf(uid),
    ports: ports
      .map((port) => ({ port, holders: listening(port).map(({ pid, comm }) => ({ pid, comm })) }))
      .filter((p) => p.holders.length > 0),
    paths: paths.filter((p) => !pathGone(p)),
  };
}

export const nothingLeft = (f: Found): boolean =>
  f.processes.length === 0 && f.ports.length === 0 && f.paths.length === 0;

/**
 * The daemon's report against what was found. Each thing really left must be a leftover of
 * the session naming it (a process by pid, a port by number, a path as registered), and an
 * outcome of `clean` with anything left is a lie. Returns the problems (empty: honest).
 */
export function reportProblems(s: Pick<Session, "outcome" | "leftovers">, found: Found): string[] {
  const problems: string[] = [];
  const named = (kind: string, item: string): boolean => s.leftovers.some((l) => l.kind === kind && l.item === item);
  for (const p of found.processes)
    if (!named("process", String(p.pid)))
      problems.push(`process ${p.pid} (${p.cmd}) is still running and no process leftover names it`);
  for (const p of found.ports)
    if (!named("port", String(p.port)))
      problems.push(
        `port ${p.port} still has a listener (${p.holders.map((h) => `${h.comm} ${h.pid}`).join(", ")}) and no port leftover names it`,
      );
  for (const p of found.paths) if (!named("path", p)) problems.push(`${p} still exists and no path leftover names it`);
  if (!nothingLeft(found) && s.outcome === "clean") problems.push(`the outcome is "clean" with all that left`);
  return problems;
}

/** One line: how the daemon says the session ended, and each step's outcome. */
export function summary(s: Pick<Session, "reason" | "outcome" | "leftovers" | "steps">): string {
  const steps = (s.steps ?? []).map((x) => `${x.name}=${x.outcome}`).join(" ");
  return `daemon: reason ${s.reason}, outcome ${s.outcome}, leftovers ${JSON.stringify(s.leftovers)}; steps: ${steps}`;
}

/** A message for an assertion: the problems, the daemon's leftovers, and the user's processes. */
export function explain(
  problems: string[],
  s: Pick<Session, "outcome" | "leftovers" | "reason">,
  uid: number,
  extra = "",
): string {
  return [
    ...problems,
    `daemon: reason ${s.reason}, outcome ${s.outcome}, leftovers ${JSON.stringify(s.leftovers)}`,
    `/proc now:\n${psOf(uid)}`,
    extra,
  ]
    .filter((l) => l !== "")
    .join("\n");
}

// ---------------------------------------------------------------------------------------
// Processes, users, dirs, ports
// ---------------------------------------------------------------------------------------

/** `p`, or a rejection after `ms` (the timer is cleared either way: it keeps nothing alive). */
export async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what} took over ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** Multi-line text as one diagnostic per line (TAP escapes newlines inside one). */
export function diagnose(t: { diagnostic: (msg: string) => void }, title: string, text: string): void {
  t.diagnostic(title);
  for (const line of text.split("\n")) t.diagnostic(line);
}

/** SIGKILLs the process when the test ends, if it is still the same process. Never throws. */
export function killAfter(t: After, p: ProcId): void {
  t.after(() => {
    if (!procAlive(p)) return;
    try {
      process.kill(p.pid, "SIGKILL");
    } catch {
      // gone meanwhile
    }
  });
}

/** A loopback TCP port nobody listens on right now. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

/**
 * A fresh directory owned by `user` (mode 0700) in `parent`/tmp, a sticky world-writable
 * dir like /tmp (created on first use; `parent`, a root-owned 0700 tempDir, is opened to
 * traversal). The daemon removes a path with rm run as the engine's uid in the path's
 * parent, so the parent must let that user unlink its own entry, as /tmp does.
 */
export function userDir(parent: string, user: TestUser, prefix: string): string {
  chmodSync(parent, 0o711);
  const tmp = join(parent, "tmp");
  if (!existsSync(tmp)) mkdirSync(tmp);
  chmodSync(tmp, 0o1777);
  const dir = join(tmp, `${prefix}${randomBytes(3).toString("hex")}`);
  mkdirSync(dir, { mode: 0o700 });
  chownSync(dir, user.uid, user.gid);
  return dir;
}

/** A minimal environment for the engines (no root HOME, C locale). */
function userEnv(user: TestUser, home: string): NodeJS.ProcessEnv {
  return { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: home, USER: user.name, LOGNAME: user.name, LC_ALL: "C" };
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs a command to its end (killed after `timeoutMs`), as `user` if given. */
export function run(
  cmd: string,
  args: string[],
  opts: { user?: TestUser; cwd?: string; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {},
): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(
      cmd,
      args,
      {
        encoding: "utf8",
        timeout: opts.timeoutMs ?? 30_000,
        killSignal: "SIGKILL",
        maxBuffer: 16 << 20,
        ...(opts.cwd === undefined ? {} : { cwd: opts.cwd }),
        ...(opts.env === undefined ? {} : { env: opts.env }),
        ...(opts.user === undefined ? {} : { uid: opts.user.uid, gid: opts.user.gid }),
      },
      (err, stdout, stderr) => {
        const e = err as (Error & { code?: unknown; signal?: NodeJS.Signals | null }) | null;
        resolve({
          code: e === null ? 0 : typeof e.code === "number" ? e.code : null,
          signal: e?.signal ?? null,
          stdout,
          stderr,
        });
      },
    );
  });
}

/** The last lines of a log file, for error messages. */
function tail(file: string, lines = 20): string {
  try {
    return readFileSync(file, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
  } catch {
    return `(no ${file})`;
  }
}

/** Starts `cmd` as `user`, detached (its own session, as a service manager would), output to `log`. */
function spawnAs(
  user: TestUser,
  cmd: string,
  args: string[],
  cwd: string,
  log: string,
): ChildProcess & { pid: number } {
  const fd = openSync(log, "a", 0o600);
  chownSync(log, user.uid, user.gid);
  try {
    const child = spawn(cmd, args, {
      cwd,
      env: userEnv(user, cwd),
      uid: user.uid,
      gid: user.gid,
      detached: true,
      stdio: ["ignore", fd, fd],
    });
    if (child.pid === undefined) throw new Error(`could not start ${cmd}`);
    child.unref();
    child.on("error", () => undefined);
    return child as ChildProcess & { pid: number };
  } finally {
    closeSync(fd);
  }
}

// ---------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------

/** An initialized (initdb) cluster, not running. `base` holds data, sockets and the log. */
export interface PgCluster {
  user: TestUser;
  /** The engine's temp dir: register this as the session's path. */
  base: string;
  dataDir: string;
  socketDir: string;
  logFile: string;
  port: number;
}

export interface Pg extends PgCluster {
  postmasterPid: number;
  postmaster: ProcId;
  /** Runs SQL through psql over the unix socket; resolves with its output (unaligned, tuples only). */
  psql(sql: string): Promise<string>;
  /** The test's t, for cleanups of what is started later (busyBackend). */
  readonly t: After;
}

/**
 * What a postmaster leaves outside its data dir when it is SIGKILLed (a clean shutdown
 * removes them): its SysV shared memory segment (56 bytes, the interlock) and its POSIX
 * dynamic shared memory in /dev/shm (PostgreSQL.<n>). Neither is a registered path, so the
 * daemon cannot know them: removed here, for every segment `uid` created, when the test ends.
 */
export function postgresIpcOf(uid: number): { shmids: number[]; files: string[] } {
  const shmids: number[] = [];
  try {
    for (const line of readFileSync("/proc/sysvipc/shm", "utf8").split("\n").slice(1)) {
      const f = line.trim().split(/\s+/);
      // key shmid perms size cpid lpid nattch uid gid cuid …
      if (f.length > 9 && Number(f[9]) === uid) shmids.push(Number(f[1]));
    }
  } catch {
    // no SysV IPC here
  }
  const files: string[] = [];
  try {
    for (const name of readdirSync("/dev/shm")) {
      if (!name.startsWith("PostgreSQL.")) continue;
      const file = join("/dev/shm", name);
      try {
        if (lstatSync(file).uid === uid) files.push(file);
      } catch {
        // gone meanwhile
      }
    }
  } catch {
    // no /dev/shm
  }
  return { shmids, files };
}

function removeIpcAfter(t: After, uid: number): void {
  t.after(() => {
    const { shmids, files } = postgresIpcOf(uid);
    for (const id of shmids) spawnSync("ipcrm", ["-m", String(id)]);
    for (const f of files) rmSync(f, { force: true });
  });
}

/** initdb as `user` in a fresh dir under `parent` (default: a new tempDir). */
export async function initCluster(t: After, user: TestUser, opts: { parent?: string } = {}): Promise<PgCluster> {
  const base = userDir(opts.parent ?? tempDir(t, "sr-pg-"), user, "pg-");
  removeIpcAfter(t, user.uid);
  const dataDir = join(base, "data");
  const socketDir = join(base, "sock");
  mkdirSync(socketDir, { mode: 0o700 });
  chownSync(socketDir, user.uid, user.gid);
  const r = await run(pg("initdb"), ["-D", dataDir, "-A", "trust", "-U", "postgres", "-N", "--no-instructions"], {
    user,
    cwd: base,
    env: userEnv(user, base),
    timeoutMs: 45_000,
  });
  if (r.code !== 0) throw new Error(`initdb failed (${r.code ?? r.signal}): ${r.stderr}`);
  return { user, base, dataDir, socketDir, logFile: join(base, "postgres.log"), port: await freePort() };
}

/** The postmaster's options: its port, its socket dir, loopback only. */
function serverOptions(c: PgCluster): string[] {
  return ["-p", String(c.port), "-k", c.socketDir, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"];
}

/** Whether the cluster accepts connections on its unix socket (pg_isready). */
async function ready(c: PgCluster): Promise<boolean> {
  const r = await run(pg("pg_isready"), ["-q", "-h", c.socketDir, "-p", String(c.port), "-t", "2"], {
    timeoutMs: 5_000,
  });
  return r.code === 0;
}

/**
 * A PostgreSQL cluster run as `user`: initdb in a dir under `parent`, then the postmaster
 * started directly (`postgres -D data -p PORT -k sock -c listen_addresses=127.0.0.1`),
 * detached (its own session, as a service manager starts it), as a child of this process.
 * Resolves once it accepts connections. Everything is SIGKILLed when the test ends.
 */
export async function startPostgres(t: After, user: TestUser, opts: { parent?: string } = {}): Promise<Pg> {
  const c = await initCluster(t, user, opts);
  const child = spawnAs(user, pg("postgres"), ["-D", c.dataDir, ...serverOptions(c)], c.base, c.logFile);
  const postmaster = procId(child.pid);
  killAfter(t, postmaster);
  await until(
    async () => {
      if (child.exitCode !== null || child.signalCode !== null)
        throw new Error(`postgres exited (${child.exitCode ?? child.signalCode}):\n${tail(c.logFile)}`);
      return ready(c);
    },
    30_000,
    "postgres accepting connections",
  );
  return { ...c, postmasterPid: child.pid, postmaster, psql: psql(c), t };
}

/** psql over the cluster's unix socket (as root: trust authentication, user postgres). */
function psql(c: PgCluster): (sql: string) => Promise<string> {
  return async (sql) => {
    const r = await run(
      pg("psql"),
      [
        "-X",
        "-A",
        "-t",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        c.socketDir,
        "-p",
        String(c.port),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-c",
        sql,
      ],
      { timeoutMs: 10_000 },
    );
    if (r.code !== 0) throw new Error(`psql failed (${r.code ?? r.signal}): ${r.stderr}`);
    return r.stdout.trim();
  };
}

/** A backend spinning on the CPU, and the psql client (a process of this test, as root) that started it. */
export interface BusyBackend {
  pid: number;
  id: ProcId;
  client: ChildProcess;
  tag: string;
}

/**
 * Opens a TCP connection (psql, as root, to 127.0.0.1:port) whose backend runs an endless
 * PL/pgSQL loop: pure CPU, no disk (a `generate_series` in FROM would materialize to temp
 * files). Resolves with the backend's pid (pg_stat_activity, by application_name) once
 * its state is `active`; the backend is a child of the postmaster.
 */
export async function busyBackend(p: Pg): Promise<BusyBackend> {
  const tag = `sr-busy-${randomBytes(4).toString("hex")}`;
  const client = spawn(
    pg("psql"),
    [
      "-X",
      "-q",
      "-d",
      `host=127.0.0.1 port=${p.port} user=postgres dbname=postgres application_name=${tag}`,
      "-c",
      "DO $$ BEGIN LOOP END LOOP; END $$",
    ],
    { stdio: "ignore" },
  );
  client.on("error", () => undefined);
  p.t.after(() => void client.kill("SIGKILL"));
  let pid = 0;
  await until(
    async () => {
      if (client.exitCode !== null) throw new Error(`the busy psql exited with ${client.exitCode}`);
      const out = await p.psql(
        `SELECT pid FROM pg_stat_activity WHERE application_name = '${tag}' AND state = 'active'`,
      );
      pid = Number(out);
      return pid > 0;
    },
    15_000,
    "busy backend active",
  );
  const id = procId(pid);
  killAfter(p.t, id);
  return { pid, id, client, tag };
}

/**
 * `pg_ctl start`'s command line for a cluster (to run as its user: pg_ctl refuses root):
 * pg_ctl forks, the child calls setsid() and execs the postmaster; pg_ctl waits (-w) until
 * the server is ready and exits 0, leaving the postmaster to be re-parented.
 */
export function pgCtlCommand(c: PgCluster): string[] {
  return [pg("pg_ctl"), "-D", c.dataDir, "-o", serverOptions(c).join(" "), "-l", c.logFile, "-w", "-t", "30", "start"];
}

/** `setpriv` to run a command as `user` (it execs: the command keeps setpriv's pid). */
export function asUser(user: TestUser): string[] {
  return ["setpriv", "--reuid", String(user.uid), "--regid", String(user.gid), "--clear-groups", "--"];
}

/**
 * The real reaperctl run as `user` (through setpriv, so the daemon sees that uid), as
 * test/cli/ctl.ts's startCtl runs it as root; SIGKILLed when the test ends if still running.
 */
export function ctlAs(t: After, user: TestUser, args: string[]): { proc: ChildProcess; done: Promise<RunResult> } {
  const proc = spawn(asUser(user)[0] as string, [...asUser(user).slice(1), process.execPath, REAPERCTL, ...args], {
    cwd: "/",
    env: { PATH: process.env.PATH, LC_ALL: "C", USER: user.name, LOGNAME: user.name, HOME: "/" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  t.after(() => void proc.kill("SIGKILL"));
  let stdout = "";
  let stderr = "";
  proc.stdout?.setEncoding("utf8").on("data", (d: string) => (stdout += d));
  proc.stderr?.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  const done = new Promise<RunResult>((resolve) =>
    proc.once("close", (code, signal) => resolve({ code, signal, stdout, stderr })),
  );
  return { proc, done };
}

/**
 * The daemonizing launcher on its own: `pg_ctl start` run to its end (it exits 0 once the
 * server is ready); the postmaster lives on. Resolves with pg_ctl's pid and the postmaster
 * (from postmaster.pid, checked against the port's listener).
 */
export async function pgCtlStart(
  t: After,
  c: PgCluster,
): Promise<{ launcherPid: number; launcher: RunResult; postmasterPid: number; postmaster: ProcId; psql: Pg["psql"] }> {
  const [cmd, ...args] = [...asUser(c.user), ...pgCtlCommand(c)] as [string, ...string[]];
  const child = spawn(cmd, args, { cwd: c.base, stdio: ["ignore", "pipe", "pipe"], detached: true });
  if (child.pid === undefined) throw new Error("could not start pg_ctl");
  const launcherPid = child.pid;
  let stdout = "";
  let stderr = "";
  child.stdout?.setEncoding("utf8").on("data", (d: string) => (stdout += d));
  child.stderr?.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  const launcher = await new Promise<RunResult>((resolve) =>
    child.once("close", (code, signal) => resolve({ code, signal, stdout, stderr })),
  );
  const postmasterPid = Number(readFileSync(join(c.dataDir, "postmaster.pid"), "utf8").split("\n")[0]);
  const postmaster = procId(postmasterPid);
  killAfter(t, postmaster);
  if (launcher.code !== 0) throw new Error(`pg_ctl start failed (${launcher.code}): ${stderr}\n${tail(c.logFile)}`);
  if (!listening(c.port).some((l) => l.pid === postmasterPid))
    throw new Error(`postmaster ${postmasterPid} does not listen on ${c.port}`);
  return { launcherPid, launcher, postmasterPid, postmaster, psql: psql(c) };
}

// ---------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------

export interface Redis {
  pid: number;
  id: ProcId;
  port: number;
  /** Its --dir (working dir, dump files, log): register this as the session's path. */
  dir: string;
  user: TestUser;
  /** redis-cli -p PORT ARGS…; resolves with its output. */
  cli(...args: string[]): Promise<string>;
  readonly t: After;
}

/**
 * `redis-server --port P --bind 127.0.0.1 --dir D --save "" --daemonize no` as `user`
 * (DEBUG allowed from loopback, for DEBUG POPULATE), detached, as a child of this process.
 * Resolves once `redis-cli ping` answers PONG.
 */
export async function startRedis(t: After, user: TestUser, opts: { parent?: string } = {}): Promise<Redis> {
  const dir = userDir(opts.parent ?? tempDir(t, "sr-redis-"), user, "redis-");
  const port = await freePort();
  const log = join(dir, "redis.log");
  const child = spawnAs(
    user,
    "redis-server",
    [
      "--port",
      String(port),
      "--bind",
      "127.0.0.1",
      "--dir",
      dir,
      "--save",
      "",
      "--appendonly",
      "no",
      "--daemonize",
      "no",
      "--enable-debug-command",
      "local",
    ],
    dir,
    log,
  );
  const id = procId(child.pid);
  killAfter(t, id);
  const cli = async (...args: string[]): Promise<string> => {
    const r = await run("redis-cli", ["-h", "127.0.0.1", "-p", String(port), ...args], { timeoutMs: 10_000 });
    if (r.code !== 0) throw new Error(`redis-cli ${args.join(" ")} failed (${r.code ?? r.signal}): ${r.stderr}`);
    return r.stdout.trim();
  };
  await until(
    async () => {
      if (child.exitCode !== null || child.signalCode !== null)
        throw new Error(`redis-server exited (${child.exitCode ?? child.signalCode}):\n${tail(log)}`);
      return (
        (
          await run("redis-cli", ["-h", "127.0.0.1", "-p", String(port), "ping"], { timeoutMs: 5_000 })
        ).stdout.trim() === "PONG"
      );
    },
    15_000,
    "redis answering PING",
  );
  return { pid: child.pid, id, port, dir, user, cli, t };
}

/**
 * Starts a BGSAVE that stays in flight: `keys` keys (DEBUG POPULATE) and
 * rdb-key-save-delay of 1 s per key, so the child needs `keys` seconds. Resolves with the
 * child's pid (the server's child in /proc) once INFO says the save is in progress.
 */
export async function bgsave(r: Redis, keys = 200): Promise<{ pid: number; id: ProcId }> {
  await r.cli("DEBUG", "POPULATE", String(keys));
  await r.cli("CONFIG", "SET", "rdb-key-save-delay", "1000000");
  const answer = await r.cli("BGSAVE");
  if (!/Background saving started/.test(answer)) throw new Error(`BGSAVE: ${answer}`);
  let child: ProcInfo | undefined;
  await until(
    () => {
      child = processesOf(r.user.uid).find((p) => p.ppid === r.pid);
      return child !== undefined;
    },
    10_000,
    "the BGSAVE child",
  );
  const id = { pid: (child as ProcInfo).pid, start: (child as ProcInfo).start };
  killAfter(r.t, id);
  const info = await r.cli("INFO", "persistence");
  if (!/rdb_bgsave_in_progress:1/.test(info)) throw new Error(`no BGSAVE in progress:\n${info}`);
  return { pid: id.pid, id };
}
