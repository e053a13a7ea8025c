/**
 * Connection limits per peer uid on the unix socket (src/http/connection-limits.ts), and the
 * crowding rule (src/detect/crowd.ts): real daemon, real unix socket, connections held by
 * processes running as real second users (setpriv), so that SO_PEERCRED tells the daemon who
 * holds them.
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { chmodSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import { test } from "node:test";
import type { RecordedAuditEvent } from "../../src/audit/audit.js";
import { sleeper, startDaemon, tempDir, testConfig, testUser, until, type TestUser } from "../helpers.js";

const CONNECTIONS = fileURLToPath(new URL("../fixtures/connections.js", import.meta.url));

type Event = { id: number; event: "connect" | "close" | "response" | "error"; status?: number; code?: string };

/** Connections held by a process running as `user` (root when null): test/fixtures/connections.ts. */
class Holder {
  readonly events: Event[] = [];
  private readonly proc: ChildProcess;
  private opened = 0;

  constructor(t: { after: (fn: () => void) => void }, socket: string, user: TestUser | null, all: ChildProcess[]) {
    const as = user === null ? [] : ["setpriv", "--reuid", `${user.uid}`, "--regid", `${user.gid}`, "--clear-groups"];
    const argv = [...as, process.execPath, CONNECTIONS, socket];
    this.proc = spawn(argv[0] as string, argv.slice(1), { stdio: ["pipe", "pipe", "inherit"] });
    all.push(this.proc);
    t.after(() => void this.proc.kill("SIGKILL"));
    let buffered = "";
    this.proc.stdout?.setEncoding("utf8").on("data", (d: string) => {
      buffered += d;
      for (let nl; (nl = buffered.indexOf("\n")) >= 0; buffered = buffered.slice(nl + 1)) {
        this.events.push(JSON.parse(buffered.slice(0, nl)) as Event);
      }
    });
  }

  /** Opens `n` connections; resolves with their ids once each is connected. */
  async open(n: number): Promise<number[]> {
    const ids = Array.from({ length: n }, () => ++this.opened);
    for (let i = 0; i < n; i++) this.send({ op: "open" });
    await until(() => ids.every((id) => this.saw(id, "connect") || this.saw(id, "error")), 20_000, "connected");
    assert.deepEqual(
      this.events.filter((e) => e.event === "error"),
      [],
      "every connect went through",
    );
    return ids;
  }

  /** GET /healthz on each; resolves with the statuses. */
  async get(ids: number[]): Promise<number[]> {
    const before = new Map(ids.map((id) => [id, this.count(id, "response")]));
    for (const id of ids) this.send({ op: "get", id, path: "/healthz" });
    await until(
      () => ids.every((id) => this.count(id, "response") > (before.get(id) ?? 0) || this.saw(id, "close")),
      20_000,
      "answered",
    );
    return ids.map((id) => this.events.filter((e) => e.id === id && e.event === "response").at(-1)?.status ?? 0);
  }

  /** Sends a request head and one byte of its body on each: busy until the daemon's request timeout. */
  hold(ids: number[]): void {
    for (const id of ids) this.send({ op: "hold", id });
  }

  saw(id: number, event: Event["event"]): boolean {
    return this.count(id, event) > 0;
  }

  closed(): number[] {
    return this.events.filter((e) => e.event === "close").map((e) => e.id);
  }

  private count(id: number, event: Event["event"]): number {
    return this.events.filter((e) => e.id === id && e.event === event).length;
  }

  private send(cmd: Record<string, unknown>): void {
    this.proc.stdin?.write(JSON.stringify(cmd) + "\n");
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Counts the requests the daemon has read whose head says POST (the holds), as they are read. */
function postsRead(d: { daemon: { app: { server: NodeJS.EventEmitter } } }): () => number {
  let n = 0;
  d.daemon.app.server.on("request", (req: { method?: string }) => {
    if (req.method === "POST") n++;
  });
  return () => n;
}

async function metric(d: { daemon: { metrics: { exposition(): Promise<{ body: string }> } } }, name: string) {
  const text = (await d.daemon.metrics.exposition()).body;
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  return line === undefined ? 0 : Number(line.slice(name.length + 1));
}

test("one uid holds at most api.max_connections_per_uid (128) connections; other users and root always connect", async (t) => {
  const dir = tempDir(t);
  chmodSync(dir, 0o755);
  // Idle connections kept a minute: only the limit closes any during the test.
  const d = await startDaemon(t, testConfig(dir, { api: { socket_mode: "0666", keep_alive_timeout_ms: 60_000 } }));
  const events: RecordedAuditEvent[] = [];
  d.daemon.audit.events.on("audit", (e) => events.push(e));
  const all: ChildProcess[] = [];
  try {
    const [crowder, other] = [testUser(t), testUser(t)];
    const x = new Holder(t, d.socket, crowder, all);
    const held = await x.open(128);
    assert.deepEqual(
      (await x.get(held)).filter((s) => s !== 200),
      [],
      "128 connections of one uid are served",
    );
    // All 128 idle for over a second: the next one takes the place of one of them.
    await sleep(1200);
    const [extra] = (await x.open(1)) as [number];
    assert.deepEqual(await x.get([extra]), [200], "the 129th connection is served");
    await until(() => x.closed().length > 0, 10_000, "one idle connection closed to make room");
    const evicted = x.closed();
    assert.equal(evicted.length, 1, `exactly one was closed (${evicted.join(",")})`);
    assert.ok(held.includes(evicted[0] as number), "one of the idle ones, not the new one");

    // Every connection it holds busy with a request: one more is closed at accept.
    const busy = [...held.filter((id) => id !== evicted[0]), extra];
    const posts = postsRead(d);
    x.hold(busy);
    await until(() => posts() === busy.length, 10_000, "the holds read");
    const [refused] = (await x.open(1)) as [number];
    await until(() => x.saw(refused, "close"), 10_000, "the refused connection closed");
    assert.deepEqual(
      busy.filter((id) => x.saw(id, "close")),
      [],
      "no busy connection is closed",
    );

    // Another user, and root (more connections than the limit), connect meanwhile.
    const y = new Holder(t, d.socket, other, all);
    assert.deepEqual(await y.get(await y.open(1)), [200], "another uid's connection is served");
    const root = new Holder(t, d.socket, null, all);
    const rootIds = await root.open(150);
    assert.deepEqual(
      (await root.get(rootIds)).filter((s) => s !== 200),
      [],
      "150 connections of root are served",
    );
    assert.deepEqual(root.closed(), [], "root's connections are never closed to make room");

    assert.ok((await metric(d, 'session_reaper_connections_evicted_total{limit="uid"}')) >= 1);
    assert.ok((await metric(d, 'session_reaper_connections_refused_total{limit="uid"}')) >= 1);
    assert.equal(await metric(d, 'session_reaper_connections{peer="user"}'), 128 + 1);
    assert.equal(await metric(d, 'session_reaper_connections{peer="admin"}'), 150);
    // One uid over its own limit moves no deadline.
    assert.deepEqual(
      events.filter((e) => e.event === "daemon.stalled" && e.detail?.cause === "crowded"),
      [],
    );
  } finally {
    for (const p of all) p.kill("SIGKILL");
  }
});

test("connections turned away while every slot is busy do not count against heartbeat timeouts (daemon.stalled, cause crowded)", async (t) => {
  const dir = tempDir(t);
  chmodSync(dir, 0o755);
  const d = await startDaemon(
    t,
    testConfig(dir, {
      api: { socket_mode: "0666", max_connections: 4, max_connections_per_uid: 2, request_timeout_ms: 120_000 },
    }),
  );
  const events: RecordedAuditEvent[] = [];
  d.daemon.audit.events.on("audit", (e) => events.push(e));
  const all: ChildProcess[] = [];
  try {
    const engine = sleeper(t);
    const reg = await d.api("POST", "/v1/sessions", {
      id: "quiet",
      engine: { pid: engine.pid },
      heartbeatTimeoutSec: 3,
    });
    assert.equal(reg.status, 201, JSON.stringify(reg.body));

    // Two uids, each at its limit of 2, every connection busy: the socket's 4 are taken.
    const [a, b, c] = [testUser(t), testUser(t), testUser(t)];
    const posts = postsRead(d);
    for (const user of [a, b]) {
      const h = new Holder(t, d.socket, user, all);
      h.hold(await h.open(2));
    }
    await until(() => posts() === 4, 10_000, "the holds read");

    // A third uid, within its limit, is turned away for longer than the session's timeout.
    const z = new Holder(t, d.socket, c, all);
    const start = performance.now();
    let tries = 0;
    while (performance.now() - start < 5000) {
      await z.open(1);
      tries++;
      await sleep(100);
    }
    await until(() => z.closed().length === tries, 10_000, "every connection of the third uid closed");
    const stoppedAt = Date.now();
    assert.deepEqual(
      events.filter((e) => e.event === "session.expired"),
      [],
      "no heartbeat timeout while connections were turned away",
    );
    // Root is never turned away.
    assert.equal((await d.api("GET", "/healthz")).status, 200);

    const stalled = await d.waitFor((e) => e.event === "daemon.stalled" && e.detail?.cause === "crowded");
    assert.ok((stalled.detail?.refused as number) >= tries, JSON.stringify(stalled.detail));
    assert.ok((stalled.detail?.stalledMs as number) >= 4000, JSON.stringify(stalled.detail));
    assert.equal(stalled.detail?.budgetSpent, false);
    // Once nothing is turned away, the timeout runs again, from the last refusal.
    const expired = await d.waitFor((e) => e.event === "session.expired" && e.sessionId === "quiet");
    assert.equal(expired.reason, "heartbeat_timeout");
    assert.ok(expired.at >= stoppedAt, "expired only after the crowding ended");
    assert.ok((await metric(d, 'session_reaper_connections_refused_total{limit="total"}')) >= tries);
    assert.equal(await metric(d, 'session_reaper_stalls_total{cause="crowded"}'), 1);
  } finally {
    for (const p of all) p.kill("SIGKILL");
  }
});

/**
 * 300 heartbeats on 300 new connections, sent at once by another process, while every turn of
 * the daemon's loop (this process's) spends 20 ms in a check-phase callback, as in a reap
 * storm: the slowest answer's wait. libuv accepts one connection a turn: 6 s without the
 * daemon's backlog drain (src/http/accept-backlog.ts).
 */
async function burstOnBusyLoop(
  t: { after: (fn: () => void) => void; diagnostic: (m: string) => void },
  target: string,
  headers: Record<string, string>,
): Promise<{ slowest: number }> {
  let spinning = true;
  let turns = 0;
  const spin = (): void => {
    if (!spinning) return;
    const end = performance.now() + 20;
    while (performance.now() < end);
    turns++;
    setImmediate(spin);
  };
  t.after(() => void (spinning = false));
  const script = `
    const { request } = require("node:http");
    const target = ${target};
    const one = () => new Promise((done) => {
      const t0 = performance.now();
      const req = request({ ...target, agent: false, method: "POST", path: "/v1/sessions/burst/heartbeat",
        headers: ${JSON.stringify({ "content-type": "application/json", ...headers })} }, (res) => {
        res.resume();
        res.on("end", () => done([res.statusCode, performance.now() - t0]));
      });
      req.on("error", (e) => done([String(e.code), performance.now() - t0]));
      req.end('{"activity":"busy"}');
    });
    Promise.all(Array.from({ length: 300 }, one)).then((r) => process.stdout.write(JSON.stringify(r)));`;
  setImmediate(spin);
  const child = spawn(process.execPath, ["-e", script], { stdio: ["ignore", "pipe", "inherit"] });
  t.after(() => void child.kill("SIGKILL"));
  let out = "";
  child.stdout?.setEncoding("utf8").on("data", (s: string) => (out += s));
  const turnsBefore = turns;
  const started = performance.now();
  await new Promise((r) => child.once("exit", r));
  spinning = false;
  const answers = JSON.parse(out) as [number | string, number][];
  assert.deepEqual(
    answers.filter(([status]) => status !== 200),
    [],
    "every heartbeat answered 200",
  );
  const slowest = Math.max(...answers.map(([, ms]) => ms));
  t.diagnostic(
    `300 connections in ${turns - turnsBefore} turns of ≥ 20 ms (${(performance.now() - started).toFixed(0)} ms); slowest heartbeat ${slowest.toFixed(0)} ms`,
  );
  return { slowest };
}

test("a burst of new connections is accepted in a few turns of a busy loop, not one connection a turn", async (t) => {
  const dir = tempDir(t);
  chmodSync(dir, 0o755);
  const token = "0123456789abcdef0123456789abcdef0123456789abcdef";
  const file = join(dir, "api-token");
  writeFileSync(file, token + "\n", { mode: 0o600 });
  const d = await startDaemon(t, testConfig(dir, { api: { tcp: { listen: "127.0.0.1:0", token_file: file } } }));
  const engine = sleeper(t);
  assert.equal((await d.api("POST", "/v1/sessions", { id: "burst", engine: { pid: engine.pid } })).status, 201);
  let accepted = 0;
  d.daemon.app.server.on("connection", () => accepted++);

  // The unix socket: each connection screened by the connection limits (root: admitted).
  const unix = await burstOnBusyLoop(t, JSON.stringify({ socketPath: d.socket }), {});
  assert.ok(accepted >= 300, `${accepted} connections accepted on the unix socket`);
  assert.ok(unix.slowest < 2000, `unix socket: the slowest heartbeat waited ${unix.slowest.toFixed(0)} ms`);

  // The loopback TCP listener, with its token.
  const port = d.daemon.tcpAddress?.port as number;
  const tcp = await burstOnBusyLoop(t, JSON.stringify({ host: "127.0.0.1", port }), {
    authorization: `Bearer ${token}`,
  });
  assert.ok(tcp.slowest < 2000, `loopback TCP: the slowest heartbeat waited ${tcp.slowest.toFixed(0)} ms`);
});
