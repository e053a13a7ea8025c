import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { request } from "node:http";
import { createServer, type AddressInfo, type Socket } from "node:net";
import { join } from "node:path";
import { test } from "node:test";
import type { Session } from "../../src/client/index.js";
import { ENGINE, isGone, portFree, startDaemon, tempDir, testConfig, until } from "../helpers.js";
import { ctl, startCtl } from "./ctl.js";

/** A port nobody listens on right now. */
function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const srv = createServer().listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

function post(port: number, path: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port, path, method: "POST" }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on("error", reject);
    req.end();
  });
}

interface Ready {
  pid: number;
  port: number;
  children: number[];
}

test("run -- sh -c 'exit 7': exits 7, the session is registered first and reaped after", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  const r = await ctl([
    "run",
    "--socket",
    d.socket,
    "--id",
    "run-7",
    "--",
    "sh",
    "-c",
    'echo "$REAPER_SESSION_ID"; exit 7',
  ]);
  assert.equal(r.code, 7, r.stderr);
  assert.equal(r.stdout, "run-7\n");
  assert.equal(r.stderr, "");
  // run waits for the cleanup: the session is reaped by the time it exits.
  const s = (await d.api<Session>("GET", "/v1/sessions/run-7")).body;
  assert.equal(s.state, "reaped");
  assert.equal(s.outcome, "clean");
  assert.equal(s.ownerPid === null, false);
  // reaperctl closes the session when the command exits, but the daemon's pidfd usually sees
  // the exit first and reaps it as engine_gone: either way the full cleanup ran.
  assert.ok(s.reason === "closed" || s.reason === "engine_gone", `reason ${s.reason}`);
  const registered = await d.waitFor((e) => e.event === "session.registered" && e.sessionId === "run-7");
  assert.ok(registered);
});

test("run: heartbeats within the daemon's keep-alive, on the one connection it keeps", async (t) => {
  const dir = tempDir(t);
  // Keep-alive 3 s: heartbeats about every 1.6 s, though a third of the 30 s timeout is 10 s.
  const d = await startDaemon(t, testConfig(dir, { api: { keep_alive_timeout_ms: 3000 } }));
  const byPid = new Map<number | null, number>();
  d.daemon.app.server.on("connection", (socket: Socket) => {
    const pid = d.daemon.callers.of(socket).pid;
    byPid.set(pid, (byPid.get(pid) ?? 0) + 1);
  });
  const run = startCtl(t, ["run", "--socket", d.socket, "--id", "run-kept", "--", "sleep", "60"]);
  await until(() => d.daemon.registry.get("run-kept") !== undefined, 15_000, "registered");
  const beats = new Set<number>();
  await until(
    () => {
      const s = d.daemon.registry.get("run-kept");
      if (s !== undefined && s.heartbeatMono > s.createdMono) beats.add(s.heartbeatMono);
      return beats.size >= 5;
    },
    20_000,
    "five heartbeats within 20 s",
  );
  const opened = byPid.get(run.proc.pid) ?? 0;
  // The registration's connection, kept; a timer late on a busy host may need one more.
  assert.ok(opened <= 3, `${opened} connections from reaperctl for a registration and 5 heartbeats`);
  run.proc.kill("SIGTERM");
  assert.equal((await run.done).code, 143);
});

/**
 * reaperctl run paused (SIGSTOP) past the daemon's keep-alive: the daemon closed the kept
 * connection meanwhile, and on SIGCONT the overdue heartbeat is written to it before the
 * close is read. Before, that heartbeat failed (write EPIPE) and a "heartbeat failed …
 * retrying" line was printed for a pause that lost nothing; now it goes out again at once on
 * a new connection, silently.
 */
test("run: paused past the keep-alive and continued, heartbeats go on with nothing printed", async (t) => {
  const dir = tempDir(t);
  // The defaults: keep-alive 5 s, reaperctl heartbeats every 3.2 s.
  const d = await startDaemon(t, testConfig(dir));
  const run = startCtl(t, ["run", "--socket", d.socket, "--id", "run-paused", "--", "sleep", "120"]);
  await until(() => d.daemon.registry.get("run-paused") !== undefined, 15_000, "registered");
  const beat = (): number => d.daemon.registry.get("run-paused")?.heartbeatMono ?? 0;
  for (const pauseMs of [7000, 9000]) {
    const before = beat();
    await until(() => beat() > before, 15_000, "a heartbeat");
    // Its answer read and the connection back in reaperctl's pool, idle, when the pause begins.
    await new Promise((r) => setTimeout(r, 1000));
    run.proc.kill("SIGSTOP");
    await new Promise((r) => setTimeout(r, pauseMs));
    const paused = beat();
    run.proc.kill("SIGCONT");
    await until(() => beat() > paused, 15_000, `a heartbeat after a pause of ${pauseMs} ms`);
  }
  assert.equal(run.stderr(), "", "nothing printed for the pauses");
  run.proc.kill("SIGTERM");
  assert.equal((await run.done).code, 143);
});

test("run with --port and --path: registered once listening, everything cleaned after it exits", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  const port = await freePort();
  const files = join(dir, "engine");
  const run = startCtl(t, [
    "run",
    "--socket",
    d.socket,
    "--id",
    "run-port",
    "--port",
    String(port),
    "--path",
    files,
    "--label",
    "team=data",
    "--owner",
    "carol",
    "--heartbeat",
    "100ms",
    "--",
    process.execPath,
    ENGINE,
    "--port",
    String(port),
    "--dir",
    files,
    "--fork",
    "1",
  ]);
  const ready = JSON.parse(await run.firstLine) as Ready;
  // Registered before the command ran (no unregistered moment), its port added once it listened.
  const registered = await d.waitFor((e) => e.event === "session.registered" && e.sessionId === "run-port");
  const updated = await d.waitFor((e) => e.event === "session.updated" && e.sessionId === "run-port");
  assert.ok(registered.at <= updated.at);
  assert.deepEqual((updated.detail as { added: { ports: number[] } }).added.ports, [port]);
  const s = (await d.api<Session>("GET", "/v1/sessions/run-port")).body;
  assert.equal(s.engine.pid, ready.pid);
  assert.equal(s.ownerPid?.pid, run.proc.pid);
  assert.deepEqual(s.ports, [port]);
  assert.deepEqual(s.paths, [files]);
  assert.deepEqual(s.labels, { team: "data" });
  assert.equal(s.owner, "carol");
  assert.ok(existsSync(join(files, "engine.log")));
  // Heartbeats every 100 ms move lastHeartbeatAt.
  await until(
    async () => (await d.api<Session>("GET", "/v1/sessions/run-port")).body.lastHeartbeatAt !== s.lastHeartbeatAt,
    5000,
    "a heartbeat",
  );

  assert.equal(await post(port, "/shutdown"), 200); // the engine exits 0, its child stays behind
  const r = await run.done;
  assert.equal(r.code, 0, r.stderr);
  assert.equal(existsSync(files), false, "the engine's files are gone");
  assert.equal(await portFree(port), true, "its port is free");
  for (const pid of ready.children) assert.equal(isGone(pid), true, `leftover child ${pid} is gone`);
  const end = (await d.api<Session>("GET", "/v1/sessions/run-port")).body;
  assert.equal(end.state, "reaped");
  assert.equal(end.outcome, "clean");
});

test("run: SIGTERM to reaperctl is forwarded to the engine's group; exit status 143", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  const run = startCtl(t, ["run", "--socket", d.socket, "--id", "run-term", "--", process.execPath, ENGINE]);
  const ready = JSON.parse(await run.firstLine) as Ready;
  run.proc.kill("SIGTERM");
  const r = await run.done;
  assert.equal(r.code, 143, r.stderr);
  assert.equal(isGone(ready.pid), true);
  assert.equal((await d.api<Session>("GET", "/v1/sessions/run-term")).body.state, "reaped");
});

test("run: SIGKILL to reaperctl makes the daemon reap the engine as owner_gone", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  const run = startCtl(t, [
    "run",
    "--socket",
    d.socket,
    "--id",
    "run-kill",
    "--",
    process.execPath,
    ENGINE,
    "--fork",
    "1",
  ]);
  const ready = JSON.parse(await run.firstLine) as Ready;
  run.proc.kill("SIGKILL");
  const finished = await d.reaped("run-kill");
  assert.equal(finished.reason, "owner_gone");
  assert.equal(finished.outcome, "clean", JSON.stringify(finished.detail));
  for (const pid of [ready.pid, ...ready.children]) assert.equal(isGone(pid), true, `${pid} is gone`);
});

test("run: the daemon fences the session; reaperctl says so with the reason, waits for the engine, then says how it ended", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  // --ignore-term: the engine outlives the SIGTERM for the grace period (1 s), long enough
  // for a heartbeat to meet the fence.
  const args = ["run", "--socket", d.socket, "--id", "run-fenced", "--heartbeat", "50ms"];
  const run = startCtl(t, [...args, "--", process.execPath, ENGINE, "--ignore-term"]);
  await run.firstLine;
  assert.equal((await d.api("POST", "/v1/sessions/run-fenced/reap")).status, 202);
  const r = await run.done;
  assert.equal(r.code, 137, r.stderr); // SIGKILLed by the daemon after the grace period
  const notes = r.stderr.trim().split("\n");
  assert.equal(notes.length, 2, r.stderr);
  assert.match(
    notes[0]!,
    /^reaperctl: session run-fenced was ended by the daemon \(reason forced\): heartbeats stopped; waiting for .* to exit$/,
  );
  assert.match(
    notes[1]!,
    /^reaperctl: session run-fenced \(reason forced\): .* exited with status 137, outcome clean$/,
  );
  assert.equal((await d.reaped("run-fenced")).reason, "forced");
});

test("run: a failed registration never leaves the command running", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));

  // The daemon is not there: the command never starts.
  const down = await ctl(["run", "--socket", join(dir, "absent.sock"), "--", "sh", "-c", "echo started"]);
  assert.equal(down.code, 4);
  assert.equal(down.stdout, "");
  assert.equal(down.stderr.trim().split("\n").length, 1);
  assert.match(down.stderr, /cannot register the session: .*is it running\?/);

  // Refused (unknown profile): same.
  const refused = await ctl(["run", "--socket", d.socket, "--profile", "nope", "--", "sh", "-c", "echo started"]);
  assert.equal(refused.code, 1);
  assert.equal(refused.stdout, "");
  assert.match(refused.stderr, /SR_UNKNOWN_PROFILE/);

  // A port the command never listens on: retried until --wait-ports, then the command's
  // whole group is killed and its session closed (it was registered before it started).
  const port = await freePort();
  const started = Date.now();
  const noPort = await ctl([
    "run",
    "--socket",
    d.socket,
    "--port",
    String(port),
    "--wait-ports",
    "600ms",
    "--",
    "sh",
    "-c",
    "sleep 30 & echo $$ $!; wait",
  ]);
  assert.equal(noPort.code, 1);
  assert.ok(Date.now() - started >= 600);
  assert.match(
    noPort.stderr,
    new RegExp(`did not listen on port ${port} within 600ms .*SR_PORT_NOT_OWNED.*; ending it`),
  );
  for (const pid of noPort.stdout.trim().split(" ").map(Number)) assert.equal(isGone(pid), true, `${pid} is gone`);
  const left = (await d.api<{ sessions: Session[] }>("GET", "/v1/sessions")).body.sessions;
  assert.equal(left.length, 1);
  assert.equal(left[0]?.state, "reaped");
  assert.deepEqual(left[0]?.ports, []);

  // A command that cannot be found: 127, as in a shell.
  const missing = await ctl(["run", "--socket", d.socket, "--", join(dir, "no-such-command")]);
  assert.equal(missing.code, 127);
});

test("run: usage errors exit 2", async () => {
  const noDashes = await ctl(["run", "sleep", "1"]);
  assert.equal(noDashes.code, 2);
  assert.match(noDashes.stderr, /put the command after "--"/);
  assert.equal((await ctl(["run", "--"])).code, 2);
  assert.equal((await ctl(["run", "--port", "http", "--", "true"])).code, 2);
  assert.equal((await ctl(["run", "--label", "novalue", "--", "true"])).code, 2);
  assert.equal((await ctl(["run", "--heartbeat", "soon", "--", "true"])).code, 2);
});

test("run: when the daemon ends the session before a heartbeat sees it, reaperctl says so with the reason", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  // Heartbeats every 10 s: the engine dies of the daemon's SIGTERM long before one is sent.
  const run = startCtl(t, [
    "run",
    "--socket",
    d.socket,
    "--id",
    "run-ended",
    "--heartbeat",
    "10s",
    "--",
    process.execPath,
    ENGINE,
  ]);
  await run.firstLine;
  assert.equal((await d.api("POST", "/v1/sessions/run-ended/reap")).status, 202);
  const r = await run.done;
  assert.equal(r.code, 143, r.stderr); // the daemon's SIGTERM
  assert.match(
    r.stderr.trim(),
    /^reaperctl: session run-ended was ended by the daemon \(reason forced\); .* exited with status 143, outcome clean$/,
  );
});

test("run: a warning the heartbeats carry is told once, before the daemon ends the session", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(
    t,
    testConfig(dir, { profiles: { default: { heartbeat_timeout_sec: 30, max_lifetime_sec: 3, warn_before_sec: 2 } } }),
  );
  const args = ["run", "--socket", d.socket, "--id", "run-warned", "--heartbeat", "100ms"];
  const run = startCtl(t, [...args, "--", process.execPath, ENGINE]);
  await run.firstLine;
  const r = await run.done;
  assert.equal(r.code, 143, r.stderr); // the daemon's SIGTERM at the max lifetime
  const notes = r.stderr.trim().split("\n");
  const warned = await d.waitFor((e) => e.event === "session.warning" && e.sessionId === "run-warned", 1000);
  const deadline = (warned.detail as { deadline: string }).deadline;
  assert.match(
    notes[0] ?? "",
    new RegExp(
      `^reaperctl: session run-warned will be reclaimed at ${deadline.replace(/\./g, "\\.")} \\(in \\d+s, reason max_lifetime\\) when its max lifetime ends \\(no extension goes past it\\)$`,
    ),
    r.stderr,
  );
  assert.equal(notes.filter((l) => l.includes("will be reclaimed")).length, 1, r.stderr);
  // Then the end, told as ever (at the fence or once the command exited).
  assert.match(r.stderr, /session run-warned was ended by the daemon \(reason max_lifetime\)/);
  assert.match(r.stderr, /exited with status 143, outcome clean\n$/);
  assert.equal((await d.reaped("run-warned")).reason, "max_lifetime");
});

test("run: a --heartbeat not shorter than the session's timeout is refused before the command starts", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir, { profiles: { default: { heartbeat_timeout_sec: 3 } } }));
  const marker = join(dir, "ran");
  const r = await ctl(["run", "--socket", d.socket, "--id", "run-slow", "--heartbeat", "3s", "--", "touch", marker]);
  assert.equal(r.code, 2, r.stderr);
  assert.match(
    r.stderr,
    /--heartbeat 3s is not shorter than the session's heartbeat timeout \(3 s, profile "default"\).*use at most 1s/,
  );
  assert.equal(existsSync(marker), false, "the command never ran");
  // Its session was closed, and nothing of it is left.
  const s = await d.reaped("run-slow");
  assert.equal(s.reason, "closed");
  assert.equal(s.outcome, "clean");
  // Shorter than the timeout is fine.
  const ok = await ctl(["run", "--socket", d.socket, "--heartbeat", "2s", "--", "touch", marker]);
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal(existsSync(marker), true);
});
