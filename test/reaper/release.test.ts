import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { chmodSync, chownSync, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { createServer as createHttpServer, type IncomingMessage } from "node:http";
import { createConnection, createServer, type AddressInfo, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { test } from "node:test";
import { pino } from "pino";
import { releaseConnectionsAndPorts } from "../../src/cleanup/release-ports.js";
import type { StepContext } from "../../src/cleanup/step.js";
import { identify } from "../../src/proc/identity.js";
import { inetSockets, socketSnapshot, type SocketSnapshot } from "../../src/proc/sockets.js";
import { processTree } from "../../src/proc/tree.js";
import type { ProcessIdentity, StepName, StepResult } from "../../src/model/session.js";
import {
  isGone,
  reapingSession,
  startDaemon,
  startEngine,
  tempDir,
  testConfig,
  testUser,
  until,
  type Engine,
} from "../helpers.js";

type Ready = Engine & { childPorts: number[]; udpPort: number | null; connectedFrom: number | null };
type Step = { name: string; outcome: string; durationMs: number; detail: Record<string, unknown> };
type SessionJson = { outcome: string; leftovers: { kind: string; item: string; detail: string }[]; steps: Step[] };
type PortReport = { port: number; status: string; timeWait?: number };
type HookReport = { hook: string; outcome: string; status?: number; exit?: number | string; error?: string };
type SocketsReport = {
  checked?: number;
  gone?: number;
  skipped?: string;
  shared?: { item: string; pids: number[] }[];
  survivors?: { item: string; by: string; pid?: number }[];
};
type ReleaseDetail = { hooks: HookReport[]; ports: PortReport[]; sockets: SocketsReport; timeWait: string[] };

const RELEASE = "release-connections-and-ports";

const step = (s: SessionJson, name: string): Step => {
  const found = s.steps.find((x) => x.name === name);
  assert.ok(found, `no step ${name}`);
  return found;
};

/** A loopback server whose accepted connections are closed when the test ends. */
async function listen(t: { after: (fn: () => Promise<void>) => void }): Promise<{ server: Server; port: number }> {
  const accepted: Socket[] = [];
  const server = createServer((s) => {
    accepted.push(s);
    s.on("error", () => undefined);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  t.after(() => {
    for (const s of accepted) s.destroy();
    return new Promise<void>((r) => server.close(() => r()));
  });
  return { server, port: (server.address() as AddressInfo).port };
}

/** An HTTP server on loopback that records the requests it gets; `hang` never answers. */
async function registry(t: { after: (fn: () => Promise<void>) => void }, hang = false) {
  const requests: { method: string; url: string; headers: IncomingMessage["headers"]; body: string }[] = [];
  const server = createHttpServer((req: IncomingMessage, res) => {
    let body = "";
    req.setEncoding("utf8").on("data", (d: string) => (body += d));
    req.on("end", () => {
      requests.push({ method: req.method ?? "", url: req.url ?? "", headers: req.headers, body });
      if (!hang) res.end("ok");
    });
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  t.after(() => {
    server.closeAllConnections();
    return new Promise<void>((r) => server.close(() => r()));
  });
  return { requests, url: (path: string) => `http://127.0.0.1:${(server.address() as AddressInfo).port}${path}` };
}

const tcpLine = (local: number, remote: number): string => `tcp 127.0.0.1:${local} -> 127.0.0.1:${remote}`;

const inTimeWait = (local: number, remote: number): boolean =>
  inetSockets().some((s) => s.state === "TIME_WAIT" && s.localPort === local && s.remotePort === remote);

// --- the step itself, with a snapshot taken exactly as close-environment takes it -------

/**
 * Runs release-connections-and-ports directly, with the journal a reap would have written by
 * then: close-environment's process and socket snapshot, terminate's process list.
 */
async function runRelease(
  dir: string,
  engine: ProcessIdentity,
  ports: number[],
  journaled: { tree: ProcessIdentity[]; sockets?: SocketSnapshot },
) {
  const profile = testConfig(dir).profiles.default;
  assert.ok(profile);
  const session = reapingSession("direct", engine, ports);
  const entry = (name: StepName, detail: StepResult["detail"]): [StepName, StepResult] => [
    name,
    { name, outcome: "ok", startedAt: 0, durationMs: 0, detail },
  ];
  const processes = journaled.tree.map((p) => ({ pid: p.pid, startTime: p.startTime }));
  const journal = new Map([
    entry("close-environment", {
      processes: journaled.tree,
      ...(journaled.sockets ? { sockets: journaled.sockets } : {}),
    }),
    entry("terminate", { processes }),
  ]);
  const ctx: StepContext = {
    session,
    profile,
    // The release step alone, on a journal written by hand: no lineage to consult.
    lineage: { members: () => [], exitedCpuSec: () => 0, complete: () => false },
    log: pino({ level: "silent" }),
    daemonPid: process.pid,
    journal,
    deadline: performance.now() + releaseConnectionsAndPorts.timeoutMs(profile),
    attempt: 1,
    record: () => undefined,
  };
  const out = await releaseConnectionsAndPorts.run(ctx, new AbortController().signal);
  return { ...out, detail: out.detail as unknown as ReleaseDetail };
}

test("snapshot: once the tree is gone, each socket it held is verified gone; its connections' TIME_WAIT is reported", async (t) => {
  const dir = tempDir(t);
  const upstream = await listen(t);
  const engine = (await startEngine(t, [
    "--fork",
    "1",
    "--child-listen",
    "--udp",
    "--unix",
    join(dir, "engine.sock"),
    "--connect",
    String(upstream.port),
  ])) as Ready;
  // A client of the engine: the engine's side of it is an established socket on its port.
  const client = createConnection({ port: engine.port, host: "127.0.0.1" });
  client.on("error", () => undefined);
  await once(client, "connect");
  const clientPort = client.localPort as number;
  await until(
    () => inetSockets().some((s) => s.localPort === engine.port && s.remotePort === clientPort && s.inode > 0),
    5_000,
    "accepted by the engine",
  );

  const id = identify(engine.pid, "engine", process.pid);
  const tree = processTree(id);
  const sockets = socketSnapshot(tree.map((p) => p.pid));
  const connections = sockets.established.map((c) => `${c.proto} ${c.local} -> ${c.remote}`).sort();
  assert.deepEqual(
    connections,
    [tcpLine(engine.connectedFrom as number, upstream.port), tcpLine(engine.port, clientPort)].sort(),
  );
  assert.equal(sockets.listening.length, 3); // the engine's port, its child's, its UDP port

  // The engine dies; the kernel closes its sockets (FIN to both peers, which close in turn).
  for (const p of tree) process.kill(p.pid, "SIGKILL");
  await until(() => tree.every((p) => isGone(p.pid)), 5_000, "tree gone");
  await until(
    () => inTimeWait(engine.connectedFrom as number, upstream.port) && inTimeWait(engine.port, clientPort),
    5_000,
    "the engine's side of both connections in TIME_WAIT",
  );

  const out = await runRelease(dir, id, [engine.port], { tree, sockets });
  assert.equal(out.ok, true, JSON.stringify(out.detail));
  assert.deepEqual(out.leftovers, []);
  const report = out.detail.sockets;
  assert.equal(report.checked, sockets.listening.length + sockets.established.length + sockets.unix.length);
  assert.deepEqual(report.survivors, []);
  // What is still open is only what the engine inherited from its parent (this process).
  assert.equal((report.gone ?? 0) + (report.shared ?? []).length, report.checked);
  for (const s of report.shared ?? []) assert.ok(s.pids.includes(process.pid), JSON.stringify(s));
  assert.deepEqual(out.detail.ports, [{ port: engine.port, status: "free", timeWait: 1 }]);
  assert.ok(out.detail.timeWait.includes(tcpLine(engine.connectedFrom as number, upstream.port)));
  assert.ok(out.detail.timeWait.includes(tcpLine(engine.port, clientPort)));
  client.destroy();
});

test("snapshot: a socket still open in a session process that survived is a leftover, and the step fails", async (t) => {
  const dir = tempDir(t);
  const engine = (await startEngine(t, ["--fork", "1", "--child-listen"])) as Ready;
  const id = identify(engine.pid, "engine", process.pid);
  const tree = processTree(id);
  const sockets = socketSnapshot(tree.map((p) => p.pid));
  // Only the engine goes; its child (say, it escaped SIGKILL) keeps its listening socket.
  process.kill(engine.pid, "SIGKILL");
  await until(() => isGone(engine.pid), 5_000, "engine gone");
  const childPort = engine.childPorts[0] as number;
  const out = await runRelease(dir, id, [engine.port], { tree, sockets });
  assert.equal(out.ok, false);
  const child = engine.children[0] as number;
  // Its listening socket, and its end of the stdout pipe to the engine (a socketpair).
  const survivors = out.detail.sockets.survivors ?? [];
  assert.deepEqual(
    survivors.map((x) => [x.item.replace(/inode \d+/, "inode N"), x.by, x.pid]),
    [
      [`tcp 127.0.0.1:${childPort}`, "session", child],
      ["unix stream inode N", "session", child],
    ],
  );
  assert.deepEqual(
    out.leftovers?.map((l) => l.item),
    survivors.map((x) => x.item),
  );
  for (const l of out.leftovers ?? []) {
    assert.equal(l.kind, "socket");
    assert.match(l.detail, new RegExp(`session process ${child} \\(node\\)`));
  }
  assert.ok(!isGone(child), "the step never signals");
});

test("a connection on a registered port still held by a session process that survived: the port is held, not free", async (t) => {
  const dir = tempDir(t);
  // A server that accepts one client, then closes its listener and keeps the connection (a
  // backend that outlived its postmaster). Node's listener set SO_REUSEADDR, as servers do:
  // a test bind beside the connection succeeds, so only the tables show the port is held.
  const code = `
const srv = require("node:net").createServer((s) => { s.on("error", () => {}); srv.close(); });
srv.listen(0, "127.0.0.1", () => console.log(srv.address().port));
setInterval(() => {}, 60000);
`;
  const holder = spawn(process.execPath, ["-e", code], { stdio: ["ignore", "pipe", "inherit"] });
  t.after(() => void holder.kill("SIGKILL"));
  const port = Number(await new Promise<string>((r) => holder.stdout.setEncoding("utf8").once("data", r)));
  const client = createConnection({ port, host: "127.0.0.1" });
  client.on("error", () => undefined);
  await once(client, "connect");
  t.after(() => void client.destroy());
  await until(
    () => {
      const on = inetSockets("self", new Set([port]));
      return !on.some((s) => s.state === "LISTEN") && on.some((s) => s.state === "ESTABLISHED" && s.inode > 0);
    },
    5_000,
    "listener closed, connection kept",
  );
  const id = identify(holder.pid as number, "engine", process.pid);
  const sockets = socketSnapshot([id.pid]);
  const out = await runRelease(dir, id, [port], { tree: [id], sockets });
  assert.equal(out.ok, false);
  assert.deepEqual(out.detail.ports, [
    { port, status: "held", proto: "tcp", state: "ESTABLISHED", by: "session", pid: id.pid, comm: "node" },
  ]);
  const onPort = (out.leftovers ?? []).filter((l) => l.item === String(port) || l.item.includes(`:${port} `));
  // One leftover for the port, none again for its connection among the snapshot's sockets.
  assert.deepEqual(onPort, [
    {
      step: RELEASE,
      kind: "port",
      item: String(port),
      detail: `still held by session process ${id.pid} (node): tcp ESTABLISHED`,
    },
  ]);
});

test("snapshot: absent from the journal (engine already gone, older journal) is reported, not a failure", async (t) => {
  const dir = tempDir(t);
  const engine = await startEngine(t);
  const id = identify(engine.pid, "engine", process.pid);
  process.kill(engine.pid, "SIGKILL");
  await until(() => isGone(engine.pid), 5_000, "engine gone");
  const out = await runRelease(dir, id, [engine.port], { tree: [id] });
  assert.equal(out.ok, true);
  assert.match(out.detail.sockets.skipped ?? "", /no socket snapshot/);
  assert.deepEqual(out.detail.ports, [{ port: engine.port, status: "free", timeWait: 0 }]);
});

// --- through the daemon --------------------------------------------------------------------

test("TIME_WAIT on a registered port is reported, not a failure: outcome clean", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  const engine = await startEngine(t);
  const id = (
    await d.api<{ id: string }>("POST", "/v1/sessions", { engine: { pid: engine.pid }, ports: [engine.port] })
  ).body.id;
  // The engine closes first (Connection: close), so its side of the connection ends in
  // TIME_WAIT on its port: deterministic, and before the reap starts.
  const client = createConnection({ port: engine.port, host: "127.0.0.1" });
  await once(client, "connect");
  const clientPort = client.localPort as number;
  // write, not end: our FIN must come second (net.Socket ends its side once the peer has).
  client.write("GET /health HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n\r\n");
  client.resume();
  await once(client, "close");
  await until(() => inTimeWait(engine.port, clientPort), 5_000, "TIME_WAIT on the engine's port");

  await d.api("POST", `/v1/sessions/${id}/reap`);
  const finished = await d.reaped(id);
  assert.equal(finished.outcome, "clean");
  const s = (await d.api<SessionJson>("GET", `/v1/sessions/${id}`)).body;
  const release = step(s, RELEASE);
  assert.equal(release.outcome, "ok");
  const detail = release.detail as unknown as ReleaseDetail;
  assert.deepEqual(detail.ports, [{ port: engine.port, status: "free", timeWait: 1 }]);
  assert.ok(detail.timeWait.includes(tcpLine(engine.port, clientPort)), JSON.stringify(detail.timeWait));
  assert.deepEqual(s.leftovers, []);
});

test("release hooks: an argv hook runs with the session's environment, an HTTP hook gets the POST", async (t) => {
  const dir = tempDir(t);
  const reg = await registry(t);
  const envFile = join(dir, "hook-env");
  const d = await startDaemon(
    t,
    testConfig(dir, {
      profiles: {
        default: {
          release_hooks: [
            [
              "/bin/sh",
              "-c",
              'printf "%s|%s|%s|%s|%s|%s" "$SESSION_ID" "$ENGINE_PID" "$SESSION_PORTS" "$SESSION_PATHS" "$REAP_ATTEMPT" "$(id -u)" > "$0"',
              envFile,
            ],
            reg.url("/v1/deregister?from=reaper"),
          ],
        },
      },
    }),
  );
  const engine = (await startEngine(t, ["--udp"], join(dir, "engine"))) as Ready;
  await d.api("POST", "/v1/sessions", {
    id: "hooked",
    engine: { pid: engine.pid },
    ports: [engine.port, engine.udpPort],
    paths: [engine.dir],
    labels: { app: "nb" },
  });
  await d.api("DELETE", "/v1/sessions/hooked");
  assert.equal((await d.reaped("hooked")).outcome, "clean");

  assert.equal(
    readFileSync(envFile, "utf8"),
    `hooked|${engine.pid}|${engine.port},${engine.udpPort}|${engine.dir}|1|${process.getuid?.()}`,
  );
  assert.equal(reg.requests.length, 1);
  const req = reg.requests[0];
  assert.ok(req);
  assert.deepEqual(
    [
      req.method,
      req.url,
      req.headers["content-type"],
      req.headers["x-reaper-session"],
      req.headers["x-reaper-attempt"],
    ],
    ["POST", "/v1/deregister?from=reaper", "application/json", "hooked", "1"],
  );
  assert.deepEqual(JSON.parse(req.body), {
    sessionId: "hooked",
    profile: "default",
    owner: null,
    enginePid: engine.pid,
    ports: [engine.port, engine.udpPort],
    paths: [engine.dir],
    labels: { app: "nb" },
  });
  const s = (await d.api<SessionJson>("GET", "/v1/sessions/hooked")).body;
  const detail = step(s, RELEASE).detail as unknown as ReleaseDetail;
  assert.deepEqual(
    detail.hooks.map((h) => [h.hook, h.outcome]),
    [
      ["command", "ok"],
      ["http", "ok"],
    ],
  );
  // Both of the engine's ports were verified: TCP and UDP.
  assert.deepEqual(
    detail.ports.map((p) => [p.port, p.status]),
    [
      [engine.port, "free"],
      [engine.udpPort, "free"],
    ],
  );
});

test("release hooks: a hanging or failing hook never stops the others nor the port verification", async (t) => {
  const dir = tempDir(t);
  const ok = await registry(t);
  const hung = await registry(t, true);
  const sleeperPid = join(dir, "sleeper.pid");
  const marker = join(dir, "marker");
  const d = await startDaemon(
    t,
    testConfig(dir, {
      profiles: {
        default: {
          step_timeout_sec: 1,
          release_hooks: [
            ["/bin/sh", "-c", 'echo $$ > "$0"; exec sleep 30', sleeperPid],
            hung.url("/never"),
            ["/bin/sh", "-c", "echo 'registry down' >&2; exit 3"],
            ok.url("/gone"),
            ["/bin/sh", "-c", 'touch "$0"', marker],
            ["/nonexistent/hook"],
          ],
        },
      },
    }),
  );
  const engine = await startEngine(t);
  await d.api("POST", "/v1/sessions", { id: "hung", engine: { pid: engine.pid }, ports: [engine.port] });
  await d.api("POST", "/v1/sessions/hung/reap");
  assert.equal((await d.reaped("hung")).outcome, "partial");

  const s = (await d.api<SessionJson>("GET", "/v1/sessions/hung")).body;
  const release = step(s, RELEASE);
  assert.equal(release.outcome, "failed");
  assert.ok(release.durationMs >= 900 && release.durationMs < 2_000, `took ${release.durationMs} ms`);
  const detail = release.detail as unknown as ReleaseDetail;
  assert.deepEqual(
    detail.hooks.map((h) => [h.hook, h.outcome, h.exit ?? h.status ?? null]),
    [
      ["command", "timeout", null],
      ["http", "timeout", null],
      ["command", "failed", 3],
      ["http", "ok", 200],
      ["command", "ok", 0],
      ["command", "failed", null],
    ],
  );
  assert.match(detail.hooks[5]?.error ?? "", /ENOENT/);
  assert.deepEqual(detail.ports, [{ port: engine.port, status: "free", timeWait: 0 }]);
  assert.equal(ok.requests.length, 1);
  assert.equal(hung.requests.length, 1);
  assert.equal(readFileSync(marker, "utf8"), "");
  const hookSleeper = Number(readFileSync(sleeperPid, "utf8"));
  await until(() => isGone(hookSleeper), 2_000, "the hanging hook killed");
  assert.deepEqual(
    s.leftovers.map((l) => [l.kind, l.detail.split(":")[0]]),
    [
      ["hook", "release hook timed out"],
      ["hook", "release hook timed out"],
      ["hook", "release hook failed"],
      ["hook", "release hook failed"],
    ],
  );
  assert.equal(step(s, "remove-paths").outcome, "ok");
  assert.ok(isGone(engine.pid));
});

test("close-environment journals the socket snapshot; the release step verifies each socket gone", async (t) => {
  const dir = tempDir(t);
  const upstream = await listen(t);
  const d = await startDaemon(t, testConfig(dir));
  const engine = (await startEngine(t, ["--connect", String(upstream.port)])) as Ready;
  await d.api("POST", "/v1/sessions", { id: "snap", engine: { pid: engine.pid }, ports: [engine.port] });
  await d.api("POST", "/v1/sessions/snap/reap");
  assert.equal((await d.reaped("snap")).outcome, "clean");
  const s = (await d.api<SessionJson>("GET", "/v1/sessions/snap")).body;
  const snap = step(s, "close-environment").detail.sockets as SocketSnapshot;
  assert.deepEqual(
    snap.listening.map((l) => [l.proto, l.port]),
    [["tcp", engine.port]],
  );
  assert.deepEqual(
    snap.established.map((c) => c.remote),
    [`127.0.0.1:${upstream.port}`],
  );
  const report = (step(s, RELEASE).detail as unknown as ReleaseDetail).sockets;
  assert.deepEqual(report.survivors, []);
  assert.equal((report.gone ?? 0) + (report.shared ?? []).length, report.checked);
});

test("hook templates: both kinds expand per item with no shell, get HOME/USER/LOGNAME and the profile's PATH; a missing value fails the hook", async (t) => {
  const dir = tempDir(t);
  chmodSync(dir, 0o755);
  const user = testUser(t);
  const bin = join(dir, "bin");
  mkdirSync(bin, { mode: 0o755 });
  // A program found only through hook_path, which records its argv (one item per line) and
  // environment in the file named by its first argument.
  writeFileSync(
    join(bin, "record-hook"),
    '#!/bin/sh\nout="$1"; shift\n{ for a in "$@"; do printf "%s\\n" "$a"; done; printf "env %s|%s|%s|%s|%s\\n" "$HOME" "$USER" "$LOGNAME" "$PATH" "$(id -u)"; } > "$out"\n',
    { mode: 0o755 },
  );
  const closeOut = join(dir, "close-out");
  const releaseOut = join(dir, "release-out");
  writeFileSync(closeOut, "");
  chmodSync(closeOut, 0o666); // the close hook runs as the engine's user
  const hookPath = `${bin}:/usr/bin:/bin`;
  const d = await startDaemon(
    t,
    testConfig(dir, {
      profiles: {
        default: {
          allowed_roots: [dir],
          hook_path: hookPath,
          close_hook: [
            "record-hook",
            closeOut,
            "{id}",
            "{pid}",
            "{uid}",
            "{port}",
            "{ports}",
            "{label:team}",
            "x={path}",
          ],
          release_hooks: [
            ["record-hook", releaseOut, "{paths}", "{label:team}", "${SESSION_PORTS%%,*}"],
            ["record-hook", join(dir, "never"), "{label:absent}"],
          ],
        },
      },
    }),
  );
  const files = join(dir, "engine-files");
  mkdirSync(files);
  chownSync(files, user.uid, user.gid);
  const engine = (await startEngine(t, ["--udp"], files, { user })) as Ready;
  const reg = await d.api("POST", "/v1/sessions", {
    id: "tmpl-1",
    engine: { pid: engine.pid },
    ports: [engine.port, engine.udpPort],
    paths: [files],
    labels: { team: "data science; rm -rf /" },
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  await d.api("DELETE", "/v1/sessions/tmpl-1");
  await d.reaped("tmpl-1");

  const home = (n: string): string =>
    readFileSync("/etc/passwd", "utf8")
      .split("\n")
      .find((l) => l.startsWith(`${n}:`))!
      .split(":")[5]!;
  assert.deepEqual(readFileSync(closeOut, "utf8").split("\n"), [
    "tmpl-1",
    String(engine.pid),
    String(user.uid),
    String(engine.port),
    `${engine.port},${engine.udpPort}`,
    "data science; rm -rf /", // one argv item, never a command
    `x=${files}`,
    `env ${home(user.name)}|${user.name}|${user.name}|${hookPath}|${user.uid}`,
    "",
  ]);
  assert.deepEqual(readFileSync(releaseOut, "utf8").split("\n"), [
    files,
    "data science; rm -rf /",
    "${SESSION_PORTS%%,*}", // not a placeholder: left as written (no shell here to expand it)
    `env ${home("root")}|root|root|${hookPath}|0`,
    "",
  ]);
  assert.equal(existsSync(join(dir, "never")), false, "a hook with a missing value does not run");
  const s = (await d.api<SessionJson>("GET", "/v1/sessions/tmpl-1")).body;
  const hooks = (step(s, RELEASE).detail as unknown as ReleaseDetail).hooks;
  assert.deepEqual(
    hooks.map((h) => [h.outcome, h.error]),
    [
      ["ok", undefined],
      ["failed", 'not run: {label:absent}: the session has no label "absent"'],
    ],
  );
  assert.equal(s.outcome, "partial", "a failed release hook is reported, as before");
});
