import assert from "node:assert/strict";
import { existsSync, mkdirSync, readFileSync, renameSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import {
  ENGINE,
  isGone,
  killIfSame,
  portFree,
  startDaemon,
  startEngine,
  startTimeOf,
  tempDir,
  testConfig,
  until,
} from "../helpers.js";

type Step = { name: string; outcome: string; durationMs: number; detail: Record<string, unknown> };
type SessionJson = {
  state: string;
  outcome: string;
  leftovers: { kind: string; item: string; detail: string }[];
  steps: Step[];
};

const step = (s: SessionJson, name: string): Step => {
  const found = s.steps.find((x) => x.name === name);
  assert.ok(found, `no step ${name}`);
  return found;
};

test("a hanging close hook times out and every later step still runs (partial)", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(
    t,
    // 3 s: enough for remove-paths' pass over /proc (in-use check, IPC) on a loaded host,
    // short enough for the hanging hook's timeout to keep the test quick.
    testConfig(dir, { profiles: { default: { close_hook: "/shutdown", step_timeout_sec: 3 } } }),
  );
  const engine = await startEngine(t, ["--hang-shutdown", "--fork", "1"], join(dir, "engine"));
  const reg = await d.api<{ id: string }>("POST", "/v1/sessions", {
    engine: { pid: engine.pid },
    ports: [engine.port],
    paths: [engine.dir],
  });
  const id = reg.body.id;
  await d.api("POST", `/v1/sessions/${id}/reap`);
  const finished = await d.reaped(id);
  assert.equal(finished.outcome, "partial");
  const s = (await d.api<SessionJson>("GET", `/v1/sessions/${id}`)).body;
  const close = step(s, "close-environment");
  assert.equal(close.outcome, "timeout");
  // The snapshot taken before the hook survives the timeout: terminate and the port check use it.
  assert.ok((close.detail.processes as { pid: number }[]).some((p) => p.pid === engine.children[0]));
  assert.ok(close.detail.sockets, "socket snapshot kept");
  assert.match(String(close.detail.error), /did not finish/);
  assert.equal(step(s, "terminate").outcome, "ok");
  assert.equal(step(s, "release-connections-and-ports").outcome, "ok");
  assert.equal(step(s, "remove-paths").outcome, "ok");
  for (const pid of [engine.pid, ...engine.children]) assert.ok(isGone(pid));
  assert.ok(await portFree(engine.port));
  assert.ok(!existsSync(engine.dir as string));
});

test("uncontained, an engine that ignores SIGTERM is SIGKILLed after the grace period", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(
    t,
    testConfig(dir, { profiles: { default: { grace_period_sec: 1, containment: "none" } } }),
  );
  const engine = await startEngine(t, ["--ignore-term", "--fork", "1"], join(dir, "engine"));
  const id = (
    await d.api<{ id: string }>("POST", "/v1/sessions", { engine: { pid: engine.pid }, ports: [engine.port] })
  ).body.id;
  await d.api("DELETE", `/v1/sessions/${id}`);
  const finished = await d.reaped(id);
  assert.equal(finished.outcome, "clean");
  const term = step((await d.api<SessionJson>("GET", `/v1/sessions/${id}`)).body, "terminate");
  assert.equal(term.detail.sigterm, 2);
  assert.equal(term.detail.sigkill, 2);
  assert.ok(term.durationMs >= 900, `SIGKILL came before the grace period ended (${term.durationMs} ms)`);
  for (const pid of [engine.pid, ...engine.children]) assert.ok(isGone(pid));
});

test("a port taken after the session was gone by a process not its own is a reuse: reported, never touched, the outcome clean", async (t) => {
  // Registration only accepts the engine's own ports, so the newcomer comes later, as in
  // life: once the engine is gone, another program binds the freed port (an ephemeral port
  // comes round again within seconds on a busy host). A release hook (which runs after
  // terminate, before the verification) starts it: another engine process, listening on
  // $SESSION_PORTS where the engine did (127.0.0.1), outside the session's tree.
  const dir = tempDir(t);
  const ready = join(dir, "outsider.json");
  const startOutsider = [
    "/bin/sh",
    "-c",
    '"$0" "$1" --port "$SESSION_PORTS" > "$2" 2>/dev/null </dev/null & while [ ! -s "$2" ]; do sleep 0.05; done',
    process.execPath,
    ENGINE,
    ready,
  ];
  const d = await startDaemon(t, testConfig(dir, { profiles: { default: { release_hooks: [startOutsider] } } }));
  const engine = await startEngine(t, [], join(dir, "engine"));
  const id = (
    await d.api<{ id: string }>("POST", "/v1/sessions", {
      engine: { pid: engine.pid },
      ports: [engine.port],
    })
  ).body.id;
  await d.api("POST", `/v1/sessions/${id}/reap`);
  const finished = await d.reaped(id);
  const outsider = JSON.parse(readFileSync(ready, "utf8")) as { pid: number; port: number };
  const outsiderStart = startTimeOf(outsider.pid);
  t.after(() => killIfSame(outsider.pid, outsiderStart));
  assert.equal(outsider.port, engine.port);
  assert.equal(finished.outcome, "clean");
  const s = (await d.api<SessionJson>("GET", `/v1/sessions/${id}`)).body;
  assert.deepEqual(s.leftovers, []);
  const ports = step(s, "release-connections-and-ports").detail.ports as { status: string; pid?: number }[];
  assert.deepEqual(
    ports.map((p) => [p.status, p.pid]),
    [["reused", outsider.pid]],
  );
  assert.ok(isGone(engine.pid));
  assert.ok(!isGone(outsider.pid), "the outsider was signalled");
  assert.equal(await portFree(engine.port), false, "the outsider still listens");
});

test("a port held by a process outside the session on another address of the same port is a leftover, never touched", async (t) => {
  // The close hook runs before terminate: the outsider it starts listens on the registered
  // port number on another loopback address (127.0.0.2) while the engine still holds it on
  // 127.0.0.1. It did not need the engine to let go, so nothing says it is a newcomer: the
  // session did not end with its port free, and says so.
  const dir = tempDir(t);
  const ready = join(dir, "outsider.pid");
  const listener = [
    "import os, socket, sys",
    "s = socket.socket()",
    "s.bind(('127.0.0.2', int(sys.argv[1])))",
    "s.listen(1)",
    "open(sys.argv[2] + '.tmp', 'w').write(str(os.getpid()))",
    "os.rename(sys.argv[2] + '.tmp', sys.argv[2])",
    "while True: s.accept()",
  ].join("\n");
  const startOutsider = [
    "/bin/sh",
    "-c",
    'python3 -c "$0" "$SESSION_PORTS" "$1" >/dev/null 2>&1 </dev/null & while [ ! -s "$1" ]; do sleep 0.05; done',
    listener,
    ready,
  ];
  const d = await startDaemon(t, testConfig(dir, { profiles: { default: { close_hook: startOutsider } } }));
  const engine = await startEngine(t, [], join(dir, "engine"));
  const id = (
    await d.api<{ id: string }>("POST", "/v1/sessions", { engine: { pid: engine.pid }, ports: [engine.port] })
  ).body.id;
  await d.api("POST", `/v1/sessions/${id}/reap`);
  const finished = await d.reaped(id);
  const outsider = Number(readFileSync(ready, "utf8"));
  const outsiderStart = startTimeOf(outsider);
  t.after(() => killIfSame(outsider, outsiderStart));
  assert.equal(finished.outcome, "partial");
  const s = (await d.api<SessionJson>("GET", `/v1/sessions/${id}`)).body;
  assert.deepEqual(
    s.leftovers.map((l) => [l.kind, l.item]),
    [["port", String(engine.port)]],
  );
  assert.match(s.leftovers[0]?.detail ?? "", new RegExp(`pid ${outsider}.*not touched`));
  assert.equal(step(s, "release-connections-and-ports").outcome, "ok");
  assert.ok(isGone(engine.pid));
  assert.ok(!isGone(outsider), "the outsider was signalled");
});

test("a command close hook runs with the session's environment", async (t) => {
  const dir = tempDir(t);
  const marker = join(dir, "hook-ran");
  const d = await startDaemon(
    t,
    testConfig(dir, {
      profiles: { default: { close_hook: ["/bin/sh", "-c", `echo "$SESSION_ID $ENGINE_PID" > ${marker}`] } },
    }),
  );
  const engine = await startEngine(t);
  await d.api("POST", "/v1/sessions", { id: "cmd-hook", engine: { pid: engine.pid } });
  await d.api("DELETE", "/v1/sessions/cmd-hook");
  assert.equal((await d.reaped("cmd-hook")).outcome, "clean");
  assert.equal(readFileSync(marker, "utf8").trim(), `cmd-hook ${engine.pid}`);
  assert.ok(isGone(engine.pid));
});

test("a path swapped for a symlink after registration is refused at delete time", async (t) => {
  const dir = tempDir(t);
  const outside = tempDir(t, "sr-outside-");
  writeFileSync(join(outside, "canary"), "keep me");
  mkdirSync(join(outside, "work"));
  writeFileSync(join(outside, "work", "canary"), "keep me too");
  const d = await startDaemon(t, testConfig(dir));
  const engine = await startEngine(t);
  const workdir = join(dir, "engine");
  mkdirSync(join(workdir, "work"), { recursive: true });
  const id = (
    await d.api<{ id: string }>("POST", "/v1/sessions", { engine: { pid: engine.pid }, paths: [join(workdir, "work")] })
  ).body.id;
  // The attack: after registration, a component of the path becomes a link to elsewhere.
  renameSync(workdir, join(dir, "moved"));
  symlinkSync(outside, workdir);
  await d.api("POST", `/v1/sessions/${id}/reap`);
  const finished = await d.reaped(id);
  assert.equal(finished.outcome, "partial");
  const s = (await d.api<SessionJson>("GET", `/v1/sessions/${id}`)).body;
  assert.equal(step(s, "remove-paths").outcome, "failed");
  assert.equal(s.leftovers[0]?.kind, "path");
  assert.match(s.leftovers[0]?.detail ?? "", /refused/);
  assert.equal(readFileSync(join(outside, "work", "canary"), "utf8"), "keep me too");
  assert.equal(readFileSync(join(outside, "canary"), "utf8"), "keep me");
});

test("reaps run at most reaper.concurrency at a time", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(
    t,
    testConfig(dir, {
      reaper: { concurrency: 2 },
      profiles: { default: { close_hook: "/shutdown", step_timeout_sec: 0.5 } },
    }),
  );
  const ids: string[] = [];
  for (let i = 0; i < 5; i++) {
    const engine = await startEngine(t, ["--hang-shutdown"]);
    const res = await d.api<{ id: string }>("POST", "/v1/sessions", {
      engine: { pid: engine.pid },
      ports: [engine.port],
    });
    ids.push(res.body.id);
  }
  let maxInFlight = 0;
  const sample = setInterval(() => (maxInFlight = Math.max(maxInFlight, d.daemon.reaper.inFlight)), 5);
  for (const id of ids) await d.api("POST", `/v1/sessions/${id}/reap`);
  assert.equal(d.daemon.reaper.inFlight, 2);
  assert.equal(d.daemon.reaper.pending, 3);
  await Promise.all(ids.map((id) => d.reaped(id)));
  clearInterval(sample);
  assert.equal(maxInFlight, 2);
  await until(() => d.daemon.reaper.inFlight === 0, 2_000, "queue drained");
});
