import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, readFileSync, statSync, symlinkSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { callApi } from "../../src/client/transport.js";
import { LISTEN_BACKLOG } from "../../src/http/listen.js";
import {
  foreignPort,
  startDaemon,
  startEngine,
  tempDir,
  testConfig,
  unusedPort,
  type Engine,
  type TestDaemon,
} from "../helpers.js";

type ErrorBody = { error: { code: string; message: string } };

async function expectError(
  d: TestDaemon,
  method: string,
  path: string,
  body: unknown,
  status: number,
  code: string,
): Promise<void> {
  const res = await d.api<ErrorBody>(method, path, body);
  assert.equal(res.status, status, `${method} ${path} ${JSON.stringify(body)} → ${JSON.stringify(res.body)}`);
  assert.equal(res.body.error.code, code, JSON.stringify(res.body));
  assert.equal(typeof res.body.error.message, "string");
}

async function setup(t: Parameters<typeof startDaemon>[0]) {
  const dir = tempDir(t);
  const d = await startDaemon(
    t,
    testConfig(dir, {
      profiles: {
        default: { heartbeat_timeout_sec: 60, idle_timeout_sec: 600, max_lifetime_sec: 3600 },
        batch: { heartbeat_timeout_sec: 120 },
      },
    }),
  );
  const engine = await startEngine(t);
  return { dir, d, engine };
}

test("register: 201 with the session; defaults from the profile; generated id", async (t) => {
  const { d, engine } = await setup(t);
  const res = await d.api<Record<string, unknown>>("POST", "/v1/sessions", {
    engine: { pid: engine.pid },
    ports: [engine.port],
    owner: "alice",
    labels: { app: "notebook" },
  });
  assert.equal(res.status, 201);
  const s = res.body;
  assert.match(s.id as string, /^[0-9a-f-]{36}$/);
  assert.equal(s.profile, "default");
  assert.equal(s.state, "live");
  assert.equal(s.heartbeatTimeoutSec, 60);
  assert.equal(s.maxLifetimeSec, 3600);
  assert.deepEqual(s.labels, { app: "notebook" });
  assert.deepEqual(s.ports, [engine.port]);
  const eng = s.engine as { pid: number; startTime: number; bootId: string; uid: number };
  assert.equal(eng.pid, engine.pid);
  assert.ok(eng.startTime > 0 && eng.bootId.length === 36 && eng.uid === process.getuid?.());
  assert.equal(new Date(s.deadline as string).getTime() - new Date(s.createdAt as string).getTime(), 60_000);

  const inherited = await d.api<Record<string, unknown>>("POST", "/v1/sessions", {
    profile: "batch",
    engine: { pid: engine.pid },
  });
  assert.equal(inherited.body.heartbeatTimeoutSec, 120);
  assert.equal(inherited.body.idleTimeoutSec, 600); // from [profiles.default]
});

test("register: every bad input gets a 4xx with a stable code and changes nothing", async (t) => {
  const { dir, d, engine } = await setup(t);
  mkdirSync(join(dir, "real"));
  symlinkSync(join(dir, "real"), join(dir, "link"));
  const pid = engine.pid;
  const foreign = await foreignPort(t);
  const unused = await unusedPort();
  const cases: [unknown, number, string][] = [
    [{ engine: { pid: 0 } }, 400, "SR_INVALID_PID"],
    [{ engine: { pid: 1 } }, 400, "SR_INVALID_PID"],
    [{ engine: { pid: -4 } }, 400, "SR_INVALID_PID"],
    [{ engine: { pid: 1.5 } }, 400, "SR_INVALID_PID"],
    [{ engine: { pid: process.pid } }, 400, "SR_INVALID_PID"], // the daemon itself
    [{ engine: { pid: 2 } }, 400, "SR_INVALID_PID"], // kthreadd, a kernel thread
    [{ engine: { pid: 4_194_303 } }, 400, "SR_PROCESS_NOT_FOUND"],
    [{ engine: { pid }, ownerPid: 1 }, 400, "SR_INVALID_PID"],
    [{ engine: { pid: "12" } }, 400, "SR_BAD_REQUEST"],
    [{ engine: {} }, 400, "SR_BAD_REQUEST"],
    [{}, 400, "SR_BAD_REQUEST"],
    [{ engine: { pid }, extra: true }, 400, "SR_BAD_REQUEST"],
    [{ engine: { pid, extra: true } }, 400, "SR_BAD_REQUEST"],
    [{ engine: { pid }, ports: [0] }, 400, "SR_BAD_REQUEST"],
    [{ engine: { pid }, ports: [65536] }, 400, "SR_BAD_REQUEST"],
    [{ engine: { pid }, ports: ["80"] }, 400, "SR_BAD_REQUEST"],
    [{ engine: { pid }, ports: [80, 80] }, 400, "SR_BAD_REQUEST"],
    [{ engine: { pid }, id: "../etc" }, 400, "SR_BAD_REQUEST"],
    [{ engine: { pid }, labels: { ok: 5 } }, 400, "SR_BAD_REQUEST"],
    [{ engine: { pid }, profile: "nope" }, 400, "SR_UNKNOWN_PROFILE"],
    [{ engine: { pid }, paths: ["relative/dir"] }, 400, "SR_INVALID_PATH"],
    [{ engine: { pid }, paths: [`${dir}/a/../b`] }, 400, "SR_INVALID_PATH"],
    [{ engine: { pid }, paths: [dir] }, 400, "SR_INVALID_PATH"], // the root itself
    [{ engine: { pid }, paths: ["/"] }, 400, "SR_INVALID_PATH"],
    [{ engine: { pid }, paths: ["/etc"] }, 400, "SR_PATH_OUTSIDE_ROOT"],
    [{ engine: { pid }, paths: [`${dir}-evil/x`] }, 400, "SR_PATH_OUTSIDE_ROOT"],
    [{ engine: { pid }, paths: [`${dir}/link/x`] }, 400, "SR_PATH_SYMLINK"],
    [{ engine: { pid }, heartbeatTimeoutSec: 61 }, 400, "SR_TIMEOUT_ABOVE_MAX"],
    [{ engine: { pid }, idleTimeoutSec: 601 }, 400, "SR_TIMEOUT_ABOVE_MAX"],
    [{ engine: { pid }, maxLifetimeSec: 0 }, 400, "SR_TIMEOUT_ABOVE_MAX"], // "no limit" above a limit
    [{ engine: { pid }, heartbeatTimeoutSec: 0 }, 400, "SR_BAD_REQUEST"],
    // Ports must be held by the engine's tree at registration.
    [{ engine: { pid }, ports: [foreign] }, 400, "SR_PORT_NOT_OWNED"], // another process's
    [{ engine: { pid }, ports: [unused] }, 400, "SR_PORT_NOT_OWNED"], // nobody's
    [{ engine: { pid }, ports: [engine.port, foreign] }, 400, "SR_PORT_NOT_OWNED"], // one of two
  ];
  for (const [body, status, code] of cases) await expectError(d, "POST", "/v1/sessions", body, status, code);

  // Wire-level errors.
  const sock = d.socket;
  const invalidJson = await callApi<ErrorBody>(sock, "POST", "/v1/sessions", undefined, { rawBody: "{nope" });
  assert.deepEqual([invalidJson.status, invalidJson.body.error.code], [400, "SR_INVALID_JSON"]);
  const tooLarge = await callApi<ErrorBody>(sock, "POST", "/v1/sessions", undefined, {
    rawBody: JSON.stringify({ engine: { pid }, owner: "x".repeat(70_000) }),
  });
  assert.deepEqual([tooLarge.status, tooLarge.body.error.code], [413, "SR_BODY_TOO_LARGE"]);
  const text = await callApi<ErrorBody>(sock, "POST", "/v1/sessions", undefined, {
    rawBody: "pid=5",
    headers: { "content-type": "text/plain" },
  });
  assert.deepEqual([text.status, text.body.error.code], [415, "SR_UNSUPPORTED_MEDIA_TYPE"]);
  await expectError(d, "GET", "/v2/nothing", undefined, 404, "SR_ROUTE_NOT_FOUND");
  await expectError(d, "GET", "/v1/sessions?bogus=1", undefined, 400, "SR_BAD_REQUEST");

  // Nothing changed: no session, no event.
  const daemon = await d.api<{ counts: Record<string, number> }>("GET", "/v1/daemon");
  assert.deepEqual(daemon.body.counts, { live: 0, reaping: 0, reaped: 0 });
  assert.equal(
    (
      d.daemon.store.db.prepare("SELECT COUNT(*) AS n FROM audit_events WHERE session_id IS NOT NULL").get() as {
        n: number;
      }
    ).n,
    0,
  );
});

test("register: SR_PORT_NOT_OWNED names the port, and whether someone else holds it", async (t) => {
  const { d, engine } = await setup(t);
  const foreign = await foreignPort(t);
  const unused = await unusedPort();
  const taken = await d.api<ErrorBody>("POST", "/v1/sessions", {
    engine: { pid: engine.pid },
    ports: [engine.port, foreign],
  });
  assert.equal(taken.body.error.code, "SR_PORT_NOT_OWNED");
  assert.match(taken.body.error.message, new RegExp(`^ports\\[1\\]: port ${foreign} .*another process holds it`));
  const free = await d.api<ErrorBody>("POST", "/v1/sessions", { engine: { pid: engine.pid }, ports: [unused] });
  assert.match(free.body.error.message, new RegExp(`^ports\\[0\\]: port ${unused} .*no process listens on it`));
});

test("register: ports held by the engine's children, and bound UDP ports, are the engine's", async (t) => {
  const { d } = await setup(t);
  const engine = (await startEngine(t, ["--fork", "2", "--child-listen", "--udp"])) as Engine & {
    childPorts: number[];
    udpPort: number;
  };
  assert.equal(engine.childPorts.length, 2);
  const ports = [engine.port, ...engine.childPorts, engine.udpPort];
  const res = await d.api<{ ports: number[] }>("POST", "/v1/sessions", { engine: { pid: engine.pid }, ports });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  assert.deepEqual(res.body.ports, ports);
  // Another engine may not claim it.
  const other = await startEngine(t);
  await expectError(
    d,
    "POST",
    "/v1/sessions",
    { engine: { pid: other.pid }, ports: [engine.childPorts[0]] },
    400,
    "SR_PORT_NOT_OWNED",
  );
});

test("register: a duplicate id is a 409", async (t) => {
  const { d, engine } = await setup(t);
  assert.equal((await d.api("POST", "/v1/sessions", { id: "dup", engine: { pid: engine.pid } })).status, 201);
  await expectError(d, "POST", "/v1/sessions", { id: "dup", engine: { pid: engine.pid } }, 409, "SR_SESSION_EXISTS");
});

test("heartbeat: 200 with the new deadline, 404 unknown, 409 once fenced, 400 bad activity", async (t) => {
  const { d, engine } = await setup(t);
  await d.api("POST", "/v1/sessions", { id: "hb", engine: { pid: engine.pid } });
  const ok = await d.api<{ deadline: string; expiresBy: string; state: string }>("POST", "/v1/sessions/hb/heartbeat", {
    activity: "busy",
  });
  assert.equal(ok.status, 200);
  assert.equal(ok.body.state, "live");
  assert.equal(ok.body.expiresBy, "heartbeat_timeout");
  assert.ok(Date.parse(ok.body.deadline) > Date.now() + 55_000);
  assert.equal((await d.api("POST", "/v1/sessions/hb/heartbeat")).status, 200); // no body
  assert.equal((await d.api("POST", "/v1/sessions/hb/heartbeat", {})).status, 200);
  await expectError(d, "POST", "/v1/sessions/hb/heartbeat", { activity: "sleepy" }, 400, "SR_BAD_REQUEST");
  // The message names the values that would do (ajv alone says "one of the allowed values").
  const sleepy = await d.api<ErrorBody>("POST", "/v1/sessions/hb/heartbeat", { activity: "sleepy" });
  assert.equal(sleepy.body.error.message, 'body.activity must be one of "busy", "idle"');
  const badState = await d.api<ErrorBody>("GET", "/v1/sessions?state=alive");
  assert.equal(badState.status, 400);
  assert.match(badState.body.error.message, /state must be one of "live", "reaping", "reaped"/);
  await expectError(d, "POST", "/v1/sessions/nope/heartbeat", {}, 404, "SR_SESSION_NOT_FOUND");

  assert.equal((await d.api("POST", "/v1/sessions/hb/reap")).status, 202);
  // Fenced the moment the 202 is sent, long before the reap finishes.
  await expectError(d, "POST", "/v1/sessions/hb/heartbeat", {}, 409, "SR_SESSION_FENCED");
  await d.reaped("hb");
  await expectError(d, "POST", "/v1/sessions/hb/heartbeat", {}, 409, "SR_SESSION_FENCED");
  await expectError(d, "POST", "/v1/sessions/hb/reap", {}, 409, "SR_SESSION_NOT_LIVE");
  await expectError(d, "DELETE", "/v1/sessions/hb", undefined, 409, "SR_SESSION_NOT_LIVE");
  await expectError(d, "DELETE", "/v1/sessions/nope", undefined, 404, "SR_SESSION_NOT_FOUND");
  await expectError(d, "GET", "/v1/sessions/nope", undefined, 404, "SR_SESSION_NOT_FOUND");
  await expectError(d, "GET", "/v1/sessions/nope/events", undefined, 404, "SR_SESSION_NOT_FOUND");
});

test("a heartbeat is visible at once, before it is flushed to SQLite", async (t) => {
  const { d, engine } = await setup(t);
  await d.api("POST", "/v1/sessions", { id: "fresh", engine: { pid: engine.pid } });
  await new Promise((r) => setTimeout(r, 20));
  const hb = await d.api<{ deadline: string }>("POST", "/v1/sessions/fresh/heartbeat");
  const s = await d.api<{ deadline: string; lastHeartbeatAt: string; usage: { memory: number } | null }>(
    "GET",
    "/v1/sessions/fresh",
  );
  assert.equal(s.body.deadline, hb.body.deadline);
  assert.ok(s.body.usage !== null && s.body.usage.memory > 0, "usage of a live engine");
});

test("list: filters and cursor pagination", async (t) => {
  const { d, engine } = await setup(t);
  for (let i = 0; i < 5; i++) {
    await d.api("POST", "/v1/sessions", {
      id: `s${i}`,
      engine: { pid: engine.pid },
      owner: i % 2 ? "odd" : "even",
      ...(i === 4 ? { profile: "batch" } : {}),
    });
  }
  const seen: string[] = [];
  let cursor: string | null = null;
  do {
    const q: string = cursor ? `&cursor=${cursor}` : "";
    const page: { body: { sessions: { id: string }[]; next: string | null } } = await d.api(
      "GET",
      `/v1/sessions?limit=2${q}`,
    );
    seen.push(...page.body.sessions.map((s) => s.id));
    cursor = page.body.next;
  } while (cursor);
  assert.deepEqual(seen, ["s0", "s1", "s2", "s3", "s4"]);
  const odd = await d.api<{ sessions: { id: string }[] }>("GET", "/v1/sessions?owner=odd");
  assert.deepEqual(
    odd.body.sessions.map((s) => s.id),
    ["s1", "s3"],
  );
  const batch = await d.api<{ sessions: { id: string }[] }>("GET", "/v1/sessions?profile=batch&state=live");
  assert.deepEqual(
    batch.body.sessions.map((s) => s.id),
    ["s4"],
  );
  await expectError(d, "GET", "/v1/sessions?cursor=!!", undefined, 400, "SR_INVALID_CURSOR");
  await expectError(d, "GET", "/v1/sessions?limit=0", undefined, 400, "SR_BAD_REQUEST");
  await expectError(d, "GET", "/v1/sessions?state=zombie", undefined, 400, "SR_BAD_REQUEST");
});

test("daemon, health and readiness; the socket is mode 0660, its listen backlog the socket unit's", async (t) => {
  const { d } = await setup(t);
  const info = await d.api<{ state: string; version: string; startedAt: string; counts: object }>("GET", "/v1/daemon");
  assert.equal(info.status, 200);
  assert.equal(info.body.state, "running");
  assert.match(info.body.version, /^\d+\.\d+\.\d+/);
  assert.ok(!Number.isNaN(Date.parse(info.body.startedAt)));
  assert.equal((await d.api("GET", "/healthz")).status, 200);
  assert.equal((await d.api("GET", "/readyz")).status, 200);
  assert.equal(statSync(d.socket).mode & 0o777, 0o660);
  // ss shows a listening socket's backlog as Send-Q (capped by net.core.somaxconn).
  const somaxconn = Number(readFileSync("/proc/sys/net/core/somaxconn", "latin1"));
  const line = execFileSync("ss", ["-xlnH"], { encoding: "latin1" })
    .split("\n")
    .find((l) => l.includes(` ${d.socket} `));
  assert.ok(line !== undefined, `the daemon's socket in ss -xl: ${d.socket}`);
  assert.equal(Number(line.trim().split(/\s+/)[3]), Math.min(LISTEN_BACKLOG, somaxconn), line);
  const unit = readFileSync(new URL("../../../systemd/session-reaper.socket", import.meta.url), "latin1");
  assert.match(unit, new RegExp(`^Backlog=${LISTEN_BACKLOG}$`, "m"));
});
