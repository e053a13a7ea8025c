/**
 * A crowded socket (issue 22): one local user holding thousands of idle connections, and
 * reopening each one the daemon closes, must not keep other users' heartbeats out. Real
 * daemon, real unix socket, real uids (the crowd runs as `nobody`, the sessions as a second
 * user, both through setpriv, so SO_PEERCRED tells the daemon who they are), the real
 * reaperctl run and client library at their default intervals.
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { chmodSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import { test, type TestContext } from "node:test";
import type { RecordedAuditEvent } from "../../src/audit/audit.js";
import {
  REAPERCTL,
  startDaemon,
  tempDir,
  testConfig,
  testUser,
  until,
  type TestDaemon,
  type TestUser,
} from "../helpers.js";

const CROWD = fileURLToPath(new URL("../fixtures/crowd.js", import.meta.url));
const SESSIONS = fileURLToPath(new URL("../fixtures/heartbeat_sessions.js", import.meta.url));

const NOBODY = 65534;
/** The crowd: more connections than the daemon's 1,024 slots, many times over. */
const CROWD_CONNECTIONS = 5000;
/** The default heartbeat timeout (30 s) and the detector's margin: a session whose heartbeats stop is reaped by then. */
const CROWD_MS = 36_000;

type Json = Record<string, unknown>;

/**
 * Every child a test starts, killed at the test's end before its after-hooks run: the daemon
 * is stopped by one of those, and a crowd still connecting would keep its server from closing.
 */
const children: ChildProcess[] = [];

interface Lines {
  proc: ChildProcess;
  all: Json[];
  next(pred: (line: Json) => boolean, timeoutMs?: number): Promise<Json>;
}

/** A child process speaking JSON lines on stdout; its stdin is ended (and it is killed) when the test ends. */
function jsonLines(t: { after: (fn: () => void) => void }, argv: string[]): Lines {
  const proc = spawn(argv[0] as string, argv.slice(1), { stdio: ["pipe", "pipe", "inherit"] });
  children.push(proc);
  const all: Json[] = [];
  const waiting: { pred: (line: Json) => boolean; resolve: (line: Json) => void }[] = [];
  let buffered = "";
  proc.stdout?.setEncoding("utf8").on("data", (d: string) => {
    buffered += d;
    let nl;
    while ((nl = buffered.indexOf("\n")) >= 0) {
      const line = JSON.parse(buffered.slice(0, nl)) as Json;
      buffered = buffered.slice(nl + 1);
      all.push(line);
      for (const w of waiting.filter((w) => w.pred(line))) {
        waiting.splice(waiting.indexOf(w), 1);
        w.resolve(line);
      }
    }
  });
  t.after(() => {
    proc.stdin?.end();
    proc.kill("SIGKILL");
  });
  return {
    proc,
    all,
    next: (pred, timeoutMs = 30_000) => {
      const found = all.find(pred);
      if (found !== undefined) return Promise.resolve(found);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(
          () => reject(new Error(`no matching line within ${timeoutMs} ms from ${argv.join(" ")}`)),
          timeoutMs,
        );
        waiting.push({
          pred,
          resolve: (line) => {
            clearTimeout(timer);
            resolve(line);
          },
        });
      });
    },
  };
}

/** setpriv's argv prefix to run as `uid`/`gid` with no supplementary groups. */
const as = (uid: number, gid: number): string[] => [
  "setpriv",
  "--reuid",
  String(uid),
  "--regid",
  String(gid),
  "--clear-groups",
  "--",
];

/** Ends a JSON-lines child's stdin and resolves with its last line (its summary). */
async function finish(l: Lines): Promise<Json> {
  const before = l.all.length;
  l.proc.stdin?.end();
  return l.next((line) => l.all.indexOf(line) >= before && ("latenciesMs" in line || "opened" in line));
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)] ?? Number.NaN;
}

/** `reaperctl run -- sleep 600` as `user`; what it says on stderr is kept in `said`. */
function runAs(
  t: { after: (fn: () => void) => void },
  user: TestUser,
  socket: string,
  id: string,
): ChildProcess & { said: string[] } {
  const proc = spawn(
    "setpriv",
    [
      ...as(user.uid, user.gid).slice(1),
      process.execPath,
      REAPERCTL,
      "run",
      "--socket",
      socket,
      "--id",
      id,
      "--",
      "sleep",
      "600",
    ],
    { cwd: "/", env: { PATH: process.env.PATH, LC_ALL: "C", HOME: "/" }, stdio: ["ignore", "ignore", "pipe"] },
  );
  children.push(proc);
  t.after(() => void proc.kill("SIGKILL"));
  const said: string[] = [];
  proc.stderr?.setEncoding("utf8").on("data", (d: string) => void said.push(d.trim()));
  return Object.assign(proc, { said });
}

test(
  "a local user holding 5,000 connections and reopening each one closed reaps nothing: reaperctl run, the client library and one-connection-per-request clients keep heartbeating",
  { timeout: 180_000 },
  async (t) => {
    const dir = tempDir(t);
    chmodSync(dir, 0o755);
    // Every local user may connect (a member of the socket's group, in production).
    const d = await startDaemon(t, testConfig(dir, { api: { socket_mode: "0666" } }));
    try {
      await crowdedSessions(t, d);
    } finally {
      for (const c of children.splice(0)) c.kill("SIGKILL");
    }
  },
);

async function crowdedSessions(t: TestContext, d: TestDaemon): Promise<void> {
  const events: RecordedAuditEvent[] = [];
  d.daemon.audit.events.on("audit", (e) => events.push(e));
  const user = testUser(t);

  // The sessions, at their defaults: 30 s heartbeat timeout, default intervals.
  const runIds = [1, 2, 3].map((n) => `crowd-run-${n}`);
  const runs = runIds.map((id) => runAs(t, user, d.socket, id));
  const asUser = [...as(user.uid, user.gid), process.execPath, SESSIONS, d.socket];
  const library = jsonLines(t, [...asUser, "library", "3"]);
  const perRequest = jsonLines(t, [...asUser, "per-request", "10"]);
  const probe = jsonLines(t, [...asUser, "probe", "1", "50"]);
  const ids = [...runIds];
  for (const l of [library, perRequest, probe]) {
    ids.push(...((await l.next((line) => "registered" in line)).registered as string[]));
  }
  await until(() => runIds.every((id) => d.daemon.registry.get(id) !== undefined), 30_000, "reaperctl run registered");
  assert.equal(ids.length, 3 + 3 + 10 + 1);

  // The crowd, as another user: more fds than connections.
  const crowd = jsonLines(t, [
    "prlimit",
    `--nofile=${CROWD_CONNECTIONS + 256}`,
    "--",
    ...as(NOBODY, NOBODY),
    process.execPath,
    CROWD,
    d.socket,
    String(CROWD_CONNECTIONS),
  ]);
  await crowd.next((line) => "tried" in line, 60_000);
  const crowdStart = performance.now();

  // An admin's request gets through the crowd (asserted below, after the reaps).
  const adminAnswer = await d.api("GET", "/v1/daemon").then(
    (r) => r.status,
    (err: unknown) => String(err),
  );

  await new Promise((r) => setTimeout(r, CROWD_MS));
  const crowdEnd = performance.now();
  // What happened until now: finishing the fixtures below kills their engines (engine_gone).
  const eventsInCrowd = events.length;
  const lastBeats = new Map(ids.map((id) => [id, d.daemon.registry.get(id)?.heartbeatMono]));
  const metrics = (await d.daemon.metrics.exposition()).body;
  const crowdStats = await finish(crowd);
  const latencies = ((await finish(probe)).latenciesMs as number[]).sort((a, b) => a - b);
  t.diagnostic(`crowd (${Math.round((crowdEnd - crowdStart) / 1000)} s): ${JSON.stringify(crowdStats)}`);
  t.diagnostic(
    `probe heartbeats (every 50 ms, kept connection, ${latencies.length}): p50 ${percentile(latencies, 50).toFixed(2)} ms, p99 ${percentile(latencies, 99).toFixed(2)} ms, max ${(latencies.at(-1) ?? Number.NaN).toFixed(2)} ms`,
  );
  const failures = [library, perRequest, probe].flatMap((l) => l.all.filter((line) => "failed" in line));
  t.diagnostic(`heartbeats that failed and were retried: ${JSON.stringify(failures)}`);
  t.diagnostic(`reaperctl run said: ${JSON.stringify(runs.flatMap((r) => r.said))}`);

  // Nothing was reaped, and every session's heartbeats got through during the crowd.
  const ended = events
    .slice(0, eventsInCrowd)
    .filter(
      (e) =>
        (e.event === "session.expired" || e.event === "reap.started") &&
        e.sessionId !== undefined &&
        ids.includes(e.sessionId),
    );
  assert.deepEqual(
    ended.map((e) => `${e.event} ${e.sessionId} ${e.reason}`),
    [],
    "no session was reaped",
  );
  for (const id of ids) {
    const last = lastBeats.get(id);
    assert.ok(last !== undefined, `${id} is live`);
    assert.ok(
      last > crowdStart + 15_000,
      `${id} heartbeated during the crowd (last ${Math.round((last - crowdStart) / 1000)} s into it)`,
    );
  }
  assert.equal(adminAnswer, 200, "root's connection is never turned away");
  // The per-uid limit kept the crowd out, not the crowding rule: nobody else was turned away.
  assert.deepEqual(
    events.filter((e) => e.event === "daemon.stalled" && e.detail?.cause === "crowded").map((e) => e.detail),
    [],
    "no connection within its uid's limit was turned away",
  );
  const metric = (name: string): number => Number(new RegExp(`^${name} (\\d+)`, "m").exec(metrics)?.[1] ?? -1);
  const refused = metric('session_reaper_connections_refused_total\\{limit="uid"\\}');
  const evicted = metric('session_reaper_connections_evicted_total\\{limit="uid"\\}');
  const open = metric('session_reaper_connections\\{peer="user"\\}');
  t.diagnostic(
    `at the uid limit: ${refused} connections refused, ${evicted} idle ones closed; non-admin connections open at the end: ${open}`,
  );
  assert.ok(refused + evicted > CROWD_CONNECTIONS, "the crowd was held to its uid's limit");
  // The crowd's 128 and the sessions' own (3 reaperctl run, 2 fixtures, one in flight).
  assert.ok(open <= 128 + 8, `the crowd held no more than its uid's limit (${open} open)`);
}
