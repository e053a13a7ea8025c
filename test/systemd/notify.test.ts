import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { fileURLToPath } from "node:url";
import { callApi } from "../../src/client/transport.js";
import { REAPERD, spawnDaemon, startEngine, tempDir, until, writeDaemonConfig } from "../helpers.js";

const RECEIVER = fileURLToPath(new URL("../../../test/fixtures/notify_socket.py", import.meta.url));
const PYTHON = execFileSync("python3", ["-c", "import sys; sys.stdout.write(sys.executable)"], { encoding: "utf8" });

/** A unix datagram socket made by the test (systemd's side), collecting messages in order. */
async function notifySocket(t: TestContext, path: string): Promise<{ messages: string[] }> {
  const rx = spawn(PYTHON, ["-I", "-S", RECEIVER, path], { stdio: ["ignore", "pipe", "inherit"] });
  t.after(() => void rx.kill("SIGKILL"));
  const messages: string[] = [];
  let buf = "";
  await new Promise<void>((resolve) => {
    rx.stdout.setEncoding("utf8").on("data", (d: string) => {
      buf += d;
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line === "ready") resolve();
        else messages.push((JSON.parse(line) as { msg: string }).msg);
      }
    });
  });
  return { messages };
}

for (const kind of ["a path", "the abstract namespace"]) {
  test(`sd_notify to ${kind}: READY after listening, STATUS, WATCHDOG pings, STOPPING, in order`, async (t) => {
    const dir = tempDir(t);
    const { file, socket } = writeDaemonConfig(dir);
    const notify = kind === "a path" ? join(dir, "notify.sock") : `@sr-test-notify-${process.pid}-${Date.now()}`;
    const rx = await notifySocket(t, notify);
    const d = await spawnDaemon(t, file, socket, { NOTIFY_SOCKET: notify, WATCHDOG_USEC: "200000" });
    const engine = await startEngine(t);
    await callApi(socket, "POST", "/v1/sessions", { id: "n1", engine: { pid: engine.pid } });
    await until(
      () => rx.messages.filter((m) => m === "WATCHDOG=1\n").length >= 3,
      5_000,
      "watchdog pings every 100 ms",
    );
    d.proc.kill("SIGTERM");
    assert.equal(await d.exit, 0);
    await until(() => rx.messages.some((m) => m.startsWith("STOPPING=1")), 2_000, "STOPPING");

    const first = rx.messages[0] ?? "";
    assert.match(
      first,
      /^READY=1\nSTATUS=Running: 0 live, 0 reaping \(0 in flight or queued\), 0 reaped\nMAINPID=\d+\n$/,
    );
    const stopping = rx.messages.findIndex((m) => m.startsWith("STOPPING=1"));
    assert.equal(stopping, rx.messages.length - 1, "nothing after STOPPING");
    assert.match(rx.messages[stopping] ?? "", /STATUS=Stopping: 1 live/);
    assert.ok(rx.messages.slice(1, stopping).every((m) => m === "WATCHDOG=1\n" || m.startsWith("STATUS=")));
  });
}

test("without NOTIFY_SOCKET nothing is sent and the daemon runs as usual", async (t) => {
  const dir = tempDir(t);
  const { file, socket } = writeDaemonConfig(dir);
  const d = await spawnDaemon(t, file, socket, { NOTIFY_SOCKET: "", WATCHDOG_USEC: "100000" });
  assert.equal((await callApi(socket, "GET", "/readyz")).status, 200);
  d.proc.kill("SIGTERM");
  assert.equal(await d.exit, 0);
});

const HOLDER = fileURLToPath(new URL("../../../test/fixtures/socket_holder.py", import.meta.url));

/** systemd's part: a process that holds the listening socket and starts reaperd on it. */
async function socketHolder(t: TestContext, path: string, log: string, file: string) {
  const holder = spawn(PYTHON, ["-I", "-S", HOLDER, path, log, "--", process.execPath, REAPERD, "--config", file], {
    stdio: ["pipe", "pipe", "inherit"],
  });
  t.after(() => {
    holder.stdin.end();
    holder.kill("SIGKILL");
  });
  const lines: string[] = [];
  const waiters: ((line: string) => void)[] = [];
  let buf = "";
  holder.stdout.setEncoding("utf8").on("data", (d: string) => {
    buf += d;
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      const w = waiters.shift();
      if (w) w(line);
      else lines.push(line);
    }
  });
  const next = (): Promise<string> => {
    const l = lines.shift();
    return l !== undefined ? Promise.resolve(l) : new Promise((r) => waiters.push(r));
  };
  assert.equal(await next(), "ready");
  return {
    async start(): Promise<number> {
      holder.stdin.write("start\n");
      return Number((await next()).split(" ")[1]);
    },
    async term(): Promise<number> {
      holder.stdin.write("term\n");
      return Number((await next()).split(" ")[1]);
    },
  };
}

test("socket activation: serves the inherited fd; a request made while it restarts waits and is answered", async (t) => {
  const dir = tempDir(t);
  const path = join(dir, "activated.sock");
  const log = join(dir, "daemon.log");
  // The config names another socket: with LISTEN_FDS the passed one wins and no file is made.
  const { file, socket } = writeDaemonConfig(dir);
  const systemd = await socketHolder(t, path, log, file);

  await systemd.start();
  await until(
    async () => (await callApi(path, "GET", "/readyz").catch(() => ({ status: 0 }))).status === 200,
    15_000,
    "ready",
  );
  const engine = await startEngine(t);
  assert.equal((await callApi(path, "POST", "/v1/sessions", { id: "sa", engine: { pid: engine.pid } })).status, 201);
  assert.match(readFileSync(log, "utf8"), /"socket":"fd 3 \(socket activation\)"/);
  // The audit record says what serves: the inherited fd, not the configured path.
  const started = readFileSync(log, "utf8")
    .split("\n")
    .filter((l) => l.includes('"event":"daemon.started"'))
    .map((l) => JSON.parse(l) as { detail: { socket: string; inheritedFd: number | null } });
  assert.equal(started.length, 1);
  assert.equal(started[0]?.detail.socket, "fd 3 (socket activation)");
  assert.equal(started[0]?.detail.inheritedFd, 3);
  await assert.rejects(callApi(socket, "GET", "/healthz"), { code: "SR_DAEMON_UNREACHABLE" });
  assert.equal(await systemd.term(), 0);

  // The daemon is down but the socket is still held: the heartbeat's connection waits in the
  // backlog until the next daemon takes the fd, instead of failing.
  const pending = callApi(path, "POST", "/v1/sessions/sa/heartbeat", { activity: "busy" }, { timeoutMs: 20_000 });
  await new Promise((r) => setTimeout(r, 300));
  await systemd.start();
  const hb = await pending;
  assert.equal(hb.status, 200, JSON.stringify(hb.body));
  assert.equal(await systemd.term(), 0);
});

test("more than one passed socket is a configuration error (exit 78)", async (t) => {
  const dir = tempDir(t);
  const { file } = writeDaemonConfig(dir);
  const proc = spawn("/bin/sh", ["-c", 'LISTEN_PID=$$ exec "$0" "$@"', process.execPath, REAPERD, "--config", file], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, LISTEN_FDS: "2" },
  });
  let out = "";
  proc.stderr.setEncoding("utf8").on("data", (d: string) => (out += d));
  const code = await new Promise<number | null>((r) => proc.once("exit", (c) => r(c)));
  assert.equal(code, 78);
  assert.match(out, /LISTEN_FDS=2/);
});
