/**
 * The Jupyter kernel provisioner (`integrations/jupyter/`) against Debian's real
 * jupyter_client 7.4.9 and ipykernel 6.17 (`/usr/bin/python3`: the pyenv python3 on PATH
 * has neither) and a real reaperd process. A Python driver (test/fixtures/jupyter_driver.py)
 * plays the Jupyter server: an AsyncKernelManager set up as jupyter_server sets it up, whose
 * kernel spec opts into the provisioner. The provisioner is found as an installed package
 * would be: through a `*.dist-info/entry_points.txt` on PYTHONPATH, written from the
 * entry point that `integrations/jupyter/pyproject.toml` declares. What is left after each
 * end is checked without the daemon's code: /proc, `ss`, a test bind, lstat.
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { fileURLToPath } from "node:url";
import { parse as parseToml } from "smol-toml";
import type { Session } from "../../src/client/index.js";
import { socketApi, type SocketApi } from "../engines/checks.js";
import { killAfter, listening, pathGone, procAlive, procId, within, type ProcId } from "../engines/lib.js";
import { portFree, spawnDaemon, tempDir, until, writeDaemonConfig } from "../helpers.js";

const PYTHON = "/usr/bin/python3";
const PACKAGE = fileURLToPath(new URL("../../../integrations/jupyter/", import.meta.url));
const DRIVER = fileURLToPath(new URL("../../../test/fixtures/jupyter_driver.py", import.meta.url));
const PROVISIONER = "session-reaper-provisioner";

/** What the driver answers once its kernel runs (see describe() in the driver). */
interface Kernel {
  event: string;
  result: string | null;
  kernel_id: string;
  session_id: string;
  pid: number;
  driver_pid: number;
  ports: number[];
  connection_file: string;
  kernel_dir: string;
  error?: string;
  has_kernel?: boolean;
}

/**
 * A Jupyter installation in `dir`: the provisioner made discoverable by a dist-info on
 * PYTHONPATH (what `pip install` leaves), the data, config, runtime and IPython dirs inside
 * `dir` (nothing in root's home), and a kernel spec per call of `spec`.
 */
function jupyter(dir: string): { env: NodeJS.ProcessEnv; runtime: string; spec(name: string, config: object): void } {
  const pyproject = parseToml(readFileSync(join(PACKAGE, "pyproject.toml"), "utf8")) as {
    project: { name: string; version: string; "entry-points": Record<string, Record<string, string>> };
  };
  const group = pyproject.project["entry-points"]["jupyter_client.kernel_provisioners"] ?? {};
  assert.ok(group[PROVISIONER], `pyproject.toml declares the ${PROVISIONER} entry point`);
  const { name, version } = pyproject.project;
  const distInfo = join(dir, "site", `${name.replaceAll("-", "_")}-${version}.dist-info`);
  mkdirSync(distInfo, { recursive: true });
  writeFileSync(join(distInfo, "METADATA"), `Metadata-Version: 2.1\nName: ${name}\nVersion: ${version}\n`);
  writeFileSync(
    join(distInfo, "entry_points.txt"),
    `[jupyter_client.kernel_provisioners]\n${Object.entries(group)
      .map(([k, v]) => `${k} = ${v}`)
      .join("\n")}\n`,
  );
  const runtime = join(dir, "runtime");
  for (const d of ["runtime", "data/kernels", "config", "ipython"]) mkdirSync(join(dir, d), { recursive: true });
  const env: NodeJS.ProcessEnv = {
    PATH: process.env.PATH ?? "/usr/bin:/bin",
    HOME: dir,
    LC_ALL: "C.UTF-8",
    PYTHONPATH: `${join(dir, "site")}:${PACKAGE}`,
    JUPYTER_PATH: join(dir, "data"),
    JUPYTER_DATA_DIR: join(dir, "data"),
    JUPYTER_CONFIG_DIR: join(dir, "config"),
    JUPYTER_RUNTIME_DIR: runtime,
    IPYTHONDIR: join(dir, "ipython"),
    PYTHONDONTWRITEBYTECODE: "1", // no __pycache__ in the repository's package
    // ipykernel's debugger warns about frozen modules on every start.
    PYDEVD_DISABLE_FILE_VALIDATION: "1",
  };
  return {
    env,
    runtime,
    spec(specName, config) {
      mkdirSync(join(dir, "data", "kernels", specName), { recursive: true });
      writeFileSync(
        join(dir, "data", "kernels", specName, "kernel.json"),
        JSON.stringify({
          argv: [PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          display_name: `Python 3 (${specName})`,
          language: "python",
          metadata: { kernel_provisioner: { provisioner_name: PROVISIONER, config } },
        }),
      );
    },
  };
}

/** The driver process: JSON lines out, commands in; SIGKILLed when the test ends. */
class Driver {
  readonly proc: ChildProcess & { pid: number };
  readonly exited: Promise<number | null>;
  private lines: string[] = [];
  private waiting: ((line: string) => void)[] = [];
  private err = "";

  constructor(t: TestContext, env: NodeJS.ProcessEnv, args: string[]) {
    const proc = spawn(PYTHON, [DRIVER, ...args], { env, stdio: ["pipe", "pipe", "pipe"] });
    if (proc.pid === undefined) throw new Error("could not start the driver");
    this.proc = proc as ChildProcess & { pid: number };
    this.exited = new Promise((r) => proc.once("exit", (code) => r(code)));
    let buf = "";
    proc.stdout.setEncoding("utf8").on("data", (d: string) => {
      buf += d;
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        const w = this.waiting.shift();
        if (w) w(line);
        else this.lines.push(line);
      }
    });
    proc.stderr.setEncoding("utf8").on("data", (d: string) => (this.err += d));
    proc.stdin.on("error", () => undefined); // writes after its exit
    t.after(() => void proc.kill("SIGKILL"));
  }

  /** Python's log lines (the provisioner logs through traitlets at INFO). */
  get stderr(): string {
    return this.err;
  }

  /** The next JSON line, within `ms`. */
  next(ms = 45_000): Promise<Kernel> {
    const line = this.lines.shift();
    const got =
      line !== undefined
        ? Promise.resolve(line)
        : new Promise<string>((resolve, reject) => {
            this.waiting.push(resolve);
            void this.exited.then((code) => reject(new Error(`driver exited (${code}):\n${this.err}`)));
          });
    return within(
      got.then((l) => JSON.parse(l) as Kernel),
      ms,
      `driver answer (stderr so far:\n${this.err})`,
    );
  }

  send(command: string): void {
    this.proc.stdin?.write(command + "\n");
  }
}

/** Processes whose environment carries the session's cookie (REAPER_SESSION_ID=<id>). */
function cookieHolders(sessionId: string): number[] {
  const needle = Buffer.from(`\0REAPER_SESSION_ID=${sessionId}\0`);
  const out: number[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const env = Buffer.concat([Buffer.from([0]), readFileSync(`/proc/${name}/environ`)]);
      if (env.includes(needle) && procAlive(Number(name))) out.push(Number(name));
    } catch {
      // gone, or a kernel thread
    }
  }
  return out;
}

/** The kernel's environment variable `key`, from /proc. */
function environOf(pid: number, key: string): string | undefined {
  const entry = readFileSync(`/proc/${pid}/environ`, "utf8")
    .split("\0")
    .find((e) => e.startsWith(`${key}=`));
  return entry?.slice(key.length + 1);
}

/** Polls the session until `pred` holds; resolves with it. */
async function sessionUntil(api: SocketApi, id: string, pred: (s: Session) => boolean, what: string): Promise<Session> {
  let s: Session | undefined;
  await until(
    async () => {
      const r = await api.api<Session>("GET", `/v1/sessions/${id}`);
      if (r.status !== 200) return false;
      s = r.body;
      return pred(s);
    },
    20_000,
    `${what} (last seen: ${JSON.stringify(s && { state: s.state, ports: s.ports, reason: s.reason })})`,
  );
  return s as Session;
}

const sorted = (ports: readonly number[]): number[] => [...ports].sort((a, b) => a - b);

/** The registered session of a started kernel, once its five ports are part of it. */
async function liveWithPorts(api: SocketApi, k: Kernel): Promise<Session> {
  assert.equal(k.result, "42", "the kernel ran a cell");
  assert.equal(k.ports.length, 5);
  return sessionUntil(
    api,
    k.session_id,
    (s) => s.state === "live" && JSON.stringify(sorted(s.ports)) === JSON.stringify(sorted(k.ports)),
    `session ${k.session_id} live with the kernel's 5 ports`,
  );
}

/** Nothing of the kernel is left: process, cookie holders, listeners and a test bind on its ports, its files. */
async function assertNothingLeft(k: Kernel, kernel: ProcId): Promise<void> {
  await until(() => !procAlive(kernel), 5_000, `kernel ${k.pid} gone`);
  assert.deepEqual(cookieHolders(k.session_id), [], "no process carries the session's cookie");
  for (const port of k.ports) {
    assert.deepEqual(listening(port), [], `nobody listens on ${port} (ss)`);
    assert.equal(await portFree(port), true, `port ${port} binds`);
  }
  assert.equal(pathGone(k.connection_file), true, `${k.connection_file} is gone`);
  assert.equal(pathGone(k.kernel_dir), true, `${k.kernel_dir} is gone`);
}

/** A real reaperd whose default profile may delete below `dir`, and a Jupyter set up in `dir`. */
async function setUp(
  t: TestContext,
  profile = "",
): Promise<{ dir: string; api: SocketApi; socket: string; jup: ReturnType<typeof jupyter> }> {
  const dir = tempDir(t, "sr-jupyter-");
  const { file, socket } = writeDaemonConfig(
    dir,
    `[profiles.default]\nallowed_roots = ["${dir}"]\ngrace_period_sec = 3\nstep_timeout_sec = 10\n${profile}`,
  );
  await spawnDaemon(t, file, socket);
  return { dir, api: socketApi(socket), socket, jup: jupyter(dir) };
}

test("a kernel started and shut down normally: its session ends closed and clean, nothing of it is left", async (t) => {
  const { api, socket, jup } = await setUp(t);
  jup.spec("reaped", { socket });
  const driver = new Driver(t, jup.env, ["start", "reaped"]);
  const k = await driver.next();
  assert.equal(k.event, "started", JSON.stringify(k));
  const kernel = procId(k.pid);
  killAfter(t, kernel);
  const s = await liveWithPorts(api, k);
  assert.equal(s.engine.pid, k.pid, "the engine is the kernel process");
  assert.equal(s.ownerPid?.pid, k.driver_pid, "the owner is the server process");
  assert.deepEqual(s.paths, [k.connection_file, k.kernel_dir]);
  assert.ok(k.kernel_dir.startsWith(jup.runtime + "/.reaper-"), "the kernel's own dir, not the shared runtime dir");
  assert.ok(!s.paths.includes(jup.runtime), "the shared runtime dir is never registered");
  assert.equal(s.labels["jupyter.kernel-id"], k.kernel_id);
  assert.equal(s.labels["jupyter.kernel-name"], "reaped");
  assert.equal(environOf(k.pid, "REAPER_SESSION_ID"), k.session_id, "the kernel carries the session's cookie");
  assert.equal(environOf(k.pid, "JUPYTER_RUNTIME_DIR"), k.kernel_dir, "the kernel's runtime dir is its own");
  const updated = (await api.events(k.session_id)).filter((e) => e.event === "session.updated");
  assert.deepEqual(
    updated.map((e) => sorted((e.detail?.added as { ports: number[] }).ports)),
    [sorted(k.ports)],
    "the ports were added once the kernel listened (PATCH)",
  );

  // The server passes a user's "keep it 2 hours" on (the default max_extend_sec is 8 h), and a
  // longer ask is refused naming the cap.
  driver.send("extend 7200");
  const ext = (await driver.next()) as unknown as { event: string; extendedUntil: string; cappedBy: string | null };
  assert.equal(ext.event, "extended", JSON.stringify(ext));
  assert.equal(ext.cappedBy, null);
  assert.ok(Math.abs(Date.parse(ext.extendedUntil) - (Date.now() + 7200_000)) < 10_000, ext.extendedUntil);
  assert.equal((await api.session(k.session_id)).extendedUntil, ext.extendedUntil);
  driver.send("extend 999999");
  const refused = (await driver.next()) as unknown as { event: string; error: string };
  assert.equal(refused.event, "extend-refused");
  assert.match(refused.error, /SR_EXTEND_ABOVE_MAX/);

  driver.send("shutdown");
  assert.equal((await driver.next()).event, "shut-down");
  assert.equal(await within(driver.exited, 10_000, "driver exit"), 0);
  const done = await api.reaped(k.session_id, 20_000);
  t.diagnostic(`reaped ${done.reason} ${done.outcome} ${JSON.stringify(done.leftovers)}`);
  assert.equal(done.reason, "closed");
  assert.equal(done.outcome, "clean", JSON.stringify(done.leftovers));
  await assertNothingLeft(k, kernel);
});

test("a warning the heartbeats carry is logged once by the server, before the kernel is reclaimed at its max lifetime", async (t) => {
  // The warning is due 4 s after registration, the reap 14 s after.
  const { api, socket, jup } = await setUp(t, "max_lifetime_sec = 14\nwarn_before_sec = 10\n");
  jup.spec("warned", { socket, heartbeat_interval: 0.3 });
  const driver = new Driver(t, jup.env, ["start", "warned"]);
  const k = await driver.next();
  assert.equal(k.event, "started", JSON.stringify(k));
  const kernel = procId(k.pid);
  killAfter(t, kernel);
  const warned =
    /session-reaper: kernel (\S+) \(session (\S+)\) will be reclaimed at (\S+) \(reason max_lifetime\) unless it is busy first$/m;
  await until(() => warned.test(driver.stderr), 20_000, `the server to log the warning (stderr: ${driver.stderr})`);
  const [, kernelId, sessionId, deadline] = warned.exec(driver.stderr) ?? [];
  assert.equal(kernelId, k.kernel_id);
  assert.equal(sessionId, k.session_id);
  const recorded = (await api.events(k.session_id)).find((e) => e.event === "session.warning");
  assert.equal(deadline, (recorded?.detail as { deadline?: string } | undefined)?.deadline);
  const done = await api.reaped(k.session_id, 30_000);
  assert.equal(done.reason, "max_lifetime");
  assert.equal(done.outcome, "clean", JSON.stringify(done.leftovers));
  assert.equal(
    driver.stderr.match(new RegExp(warned.source, "gm"))?.length,
    1,
    "logged once, though every answer carried it",
  );
  await assertNothingLeft(k, kernel);
});

test("the server SIGKILLed: its kernel is reaped owner_gone, its 5 ports freed, its files deleted", async (t) => {
  const { api, socket, jup } = await setUp(t);
  jup.spec("reaped", { socket });
  // --independent: the kernel is not told its parent's pid, so ipykernel's parent poller
  // (which exits the kernel once it is re-parented to pid 1, and only then) stays out of it,
  // as under a subreaper: the daemon alone ends it.
  const driver = new Driver(t, jup.env, ["start", "reaped", "--independent"]);
  const k = await driver.next();
  assert.equal(k.event, "started", JSON.stringify(k));
  const kernel = procId(k.pid);
  killAfter(t, kernel);
  await liveWithPorts(api, k);

  driver.proc.kill("SIGKILL");
  await within(driver.exited, 5_000, "driver exit");
  const done = await api.reaped(k.session_id, 20_000);
  t.diagnostic(`reaped ${done.reason} ${done.outcome} ${JSON.stringify(done.leftovers)}`);
  assert.equal(done.reason, "owner_gone");
  assert.equal(done.outcome, "clean", JSON.stringify(done.leftovers));
  const terminate = done.steps?.find((x) => x.name === "terminate")?.detail as { sigterm?: number } | undefined;
  t.diagnostic(`terminate: ${JSON.stringify(terminate)}`);
  await assertNothingLeft(k, kernel);
});

test("re-attach: a second server loads the provisioner info, heartbeats the same session and closes it", async (t) => {
  const { dir, api, socket, jup } = await setUp(t);
  // Not bound to the first server's pid (it would be reaped owner_gone when that one exits),
  // and a short timeout: the second server must take over the heartbeats within it.
  jup.spec("reaped-unbound", { socket, bind_to_server: false, heartbeat_timeout: 10 });
  const first = new Driver(t, jup.env, ["start", "reaped-unbound", "--independent"]);
  const k = await first.next();
  assert.equal(k.event, "started", JSON.stringify(k));
  const kernel = procId(k.pid);
  killAfter(t, kernel);
  const s = await liveWithPorts(api, k);
  assert.equal(s.ownerPid, null);
  const info = join(dir, "kernel-info.json");
  first.send(`info ${info}`);
  assert.equal((await first.next()).event, "info");
  first.send("leave");
  await within(first.exited, 10_000, "first driver exit");
  const left = Date.now();

  const second = new Driver(t, jup.env, ["attach", info]);
  const a = await second.next();
  assert.equal(a.event, "attached", JSON.stringify(a));
  assert.equal(a.has_kernel, true, "the second server manages the running kernel");
  assert.equal(a.result, "42", "and talks to it");
  assert.equal(a.session_id, k.session_id, "same session");
  assert.equal(a.pid, k.pid, "same kernel");
  await sessionUntil(
    api,
    k.session_id,
    (x) => x.state === "live" && Date.parse(x.lastHeartbeatAt ?? "") > left,
    "a heartbeat from the second server",
  );

  second.send("shutdown");
  assert.equal((await second.next()).event, "shut-down");
  assert.equal(await within(second.exited, 10_000, "second driver exit"), 0);
  const done = await api.reaped(k.session_id, 20_000);
  t.diagnostic(`reaped ${done.reason} ${done.outcome} ${JSON.stringify(done.leftovers)}`);
  assert.equal(done.reason, "closed");
  assert.equal(done.outcome, "clean", JSON.stringify(done.leftovers));
  assert.equal((await api.api<{ sessions: Session[] }>("GET", "/v1/sessions")).body.sessions.length, 1);
  await assertNothingLeft(k, kernel);
});

test("restart: the old kernel's session is closed and cleaned up before the new kernel binds the same ports", async (t) => {
  const { api, socket, jup } = await setUp(t);
  jup.spec("reaped", { socket });
  const driver = new Driver(t, jup.env, ["start", "reaped"]);
  const k = await driver.next();
  assert.equal(k.event, "started", JSON.stringify(k));
  const oldKernel = procId(k.pid);
  killAfter(t, oldKernel);
  await liveWithPorts(api, k);

  driver.send("restart");
  const r = (await driver.next()) as Kernel & { old: Kernel };
  assert.equal(r.event, "restarted", JSON.stringify(r));
  assert.notEqual(r.session_id, k.session_id, "a new launch, a new session");
  assert.notEqual(r.pid, k.pid);
  assert.deepEqual(r.ports, k.ports, "the cached ports, again");
  assert.equal(r.connection_file, k.connection_file, "the same connection file, written again");
  assert.equal(pathGone(r.connection_file), false);
  const old = await api.session(k.session_id);
  assert.equal(old.state, "reaped", "the old session was cleaned up before the new kernel started");
  assert.equal(old.reason, "closed");
  assert.equal(old.outcome, "clean", JSON.stringify(old.leftovers));
  assert.equal(procAlive(oldKernel), false);
  const fresh = await liveWithPorts(api, r);
  assert.equal(fresh.labels["jupyter.launch"], "2");
  const newKernel = procId(r.pid);
  killAfter(t, newKernel);

  driver.send("shutdown");
  assert.equal((await driver.next()).event, "shut-down");
  const done = await api.reaped(r.session_id, 20_000);
  assert.equal(done.reason, "closed");
  assert.equal(done.outcome, "clean", JSON.stringify(done.leftovers));
  await assertNothingLeft(r, newKernel);
});

test("daemon unreachable: required (the default) refuses the kernel; required = false starts it and registers it later", async (t) => {
  const dir = tempDir(t, "sr-jupyter-");
  const jup = jupyter(dir);
  const socket = join(dir, "late", "reaper.sock"); // no daemon yet
  mkdirSync(join(dir, "late"));

  jup.spec("reaped-required", { socket, register_timeout: 0.5 });
  const refused = new Driver(t, jup.env, ["start", "reaped-required"]);
  const f = await refused.next();
  assert.equal(f.event, "start-failed", JSON.stringify(f));
  assert.match(f.error ?? "", /not started: the daemon at .* did not register it/);
  assert.match(f.error ?? "", /start the daemon .* or set kernel_provisioner\.config\.required = false/);
  assert.equal(await within(refused.exited, 10_000, "driver exit"), 1);
  assert.deepEqual(
    readdirSync("/proc").filter(
      (p) => /^\d+$/.test(p) && procAlive(Number(p)) && cmdline(Number(p)).includes(f.kernel_id),
    ),
    [],
    "no kernel process runs",
  );
  assert.deepEqual(
    readdirSync(jup.runtime).filter((e) => e.startsWith(".reaper-")),
    [],
    "its own dir was removed",
  );

  jup.spec("reaped-optional", { socket, required: false });
  const driver = new Driver(t, jup.env, ["start", "reaped-optional"]);
  const k = await driver.next();
  assert.equal(k.event, "started", JSON.stringify(k));
  const kernel = procId(k.pid);
  killAfter(t, kernel);
  assert.match(driver.stderr, /runs UNREGISTERED/);
  const { file } = writeDaemonConfig(
    join(dir, "late"),
    `[profiles.default]\nallowed_roots = ["${dir}"]\ngrace_period_sec = 3\n`,
  );
  await spawnDaemon(t, file, socket);
  const api = socketApi(socket);
  const s = await liveWithPorts(api, k);
  assert.equal(s.engine.pid, k.pid);
  assert.match(driver.stderr, /registered late/);

  driver.send("shutdown");
  assert.equal((await driver.next()).event, "shut-down");
  const done = await api.reaped(k.session_id, 20_000);
  assert.equal(done.reason, "closed");
  assert.equal(done.outcome, "clean", JSON.stringify(done.leftovers));
  await assertNothingLeft(k, kernel);
});

test("a daemon that refuses the kernel's directory: the hint names allowed_roots, not the daemon being down", async (t) => {
  const dir = tempDir(t, "sr-jupyter-");
  const jup = jupyter(dir);
  const elsewhere = tempDir(t, "sr-jupyter-root-");
  mkdirSync(join(dir, "daemon"));
  const { file, socket } = writeDaemonConfig(
    join(dir, "daemon"),
    `[profiles.default]\nallowed_roots = ["${elsewhere}"]\ngrace_period_sec = 3\n`,
  );
  await spawnDaemon(t, file, socket);
  jup.spec("outside-root", { socket, register_timeout: 0.5 });
  const refused = new Driver(t, jup.env, ["start", "outside-root"]);
  const f = await refused.next();
  assert.equal(f.event, "start-failed", JSON.stringify(f));
  assert.match(f.error ?? "", /SR_PATH_OUTSIDE_ROOT/);
  assert.match(f.error ?? "", /refused the kernel's directory \/.*: add its parent to the profile's allowed_roots/);
  assert.doesNotMatch(f.error ?? "", /required = false/);
  assert.equal(await within(refused.exited, 10_000, "driver exit"), 1);
});

function cmdline(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").replaceAll("\0", " ");
  } catch {
    return "";
  }
}
