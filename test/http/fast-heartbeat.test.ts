/**
 * The heartbeat fast path (src/http/fast-heartbeat.ts) serves the plain heartbeat in front of
 * fastify's router and hands everything else to fastify. Every variant of the request must
 * answer exactly what the route answered before the fast path existed: the statuses and codes
 * below are the daemon's answers without it. Raw bytes on the unix socket, so the exact head
 * (query string, content type, chunked transfer, lengths) is what the test says.
 */
import assert from "node:assert/strict";
import { chmodSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { request } from "node:http";
import { join } from "node:path";
import { test } from "node:test";
import { apiAs, sleeper, startDaemon, tempDir, testConfig, testUser, type TestDaemon } from "../helpers.js";

interface RawAnswer {
  status: number;
  headers: Record<string, string>;
  body: Record<string, unknown> & { error?: { code: string; message: string } };
}

/** One request as raw bytes on a fresh connection; the answer parsed (Content-Length bodies only). */
function raw(socket: string, bytes: string): Promise<RawAnswer> {
  return new Promise((resolve, reject) => {
    const c = connect({ path: socket });
    let buf = Buffer.alloc(0);
    c.on("data", (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      const end = buf.indexOf("\r\n\r\n");
      if (end < 0) return;
      const lines = buf.toString("latin1", 0, end).split("\r\n");
      const headers: Record<string, string> = {};
      for (const l of lines.slice(1)) {
        const i = l.indexOf(":");
        headers[l.slice(0, i).toLowerCase()] = l.slice(i + 1).trim();
      }
      const length = Number(headers["content-length"] ?? 0);
      if (buf.length < end + 4 + length) return;
      const text = buf.toString("utf8", end + 4, end + 4 + length);
      c.destroy();
      resolve({ status: Number(lines[0]?.split(" ")[1]), headers, body: text ? (JSON.parse(text) as never) : {} });
    });
    c.on("error", reject);
    c.write(bytes);
  });
}

/** A POST to `path` with these extra header lines and this body (Content-Length added unless chunked). */
function post(path: string, headers: string[], body = ""): string {
  const framed = headers.some((h) => /^(transfer-encoding|content-length):/i.test(h));
  const length = framed || body === "" ? [] : [`Content-Length: ${Buffer.byteLength(body)}`];
  return `POST ${path} HTTP/1.1\r\nHost: localhost\r\n${[...headers, ...length].map((h) => h + "\r\n").join("")}\r\n${body}`;
}

const JSON_TYPE = "Content-Type: application/json";
const BUSY = '{"activity":"busy"}';
const IDLE = '{"activity":"idle"}';

async function setup(t: Parameters<typeof tempDir>[0], doc: Record<string, unknown> = {}) {
  const dir = tempDir(t);
  chmodSync(dir, 0o755);
  const d = await startDaemon(
    t,
    testConfig(dir, {
      ...doc,
      api: { socket_mode: "0666", ...(doc.api as object) },
      store: { flush_interval_ms: 60_000 },
    }),
  );
  const engine = sleeper(t);
  const register = async (id: string): Promise<void> => {
    const res = await d.api("POST", "/v1/sessions", { id, engine: { pid: engine.pid } });
    assert.equal(res.status, 201, JSON.stringify(res.body));
  };
  return { dir, d, engine, register };
}

async function metric(d: TestDaemon, series: string): Promise<number> {
  const text = (await d.api<string>("GET", "/metrics")).body;
  const line = text.split("\n").find((l) => l.startsWith(series + " "));
  return line === undefined ? 0 : Number(line.slice(series.length + 1));
}

const HB_200 = 'session_reaper_http_requests_total{method="POST",route="/v1/sessions/:id/heartbeat",status="200"}';
const HB_400 = 'session_reaper_http_requests_total{method="POST",route="/v1/sessions/:id/heartbeat",status="400"}';
const ACCEPTED = "session_reaper_heartbeats_total";

test("fast path: every heartbeat variant answers the route's status and code", async (t) => {
  const { d, register } = await setup(t);
  await register("hb");
  const path = "/v1/sessions/hb/heartbeat";
  const longId = "a".repeat(128);
  const tooLong = "a".repeat(257);
  const cases: [string, string, number, string | null][] = [
    ["no body", post(path, []), 200, null],
    ["Content-Length: 0, no type", post(path, ["Content-Length: 0"]), 200, null],
    ["busy", post(path, [JSON_TYPE], BUSY), 200, null],
    ["idle", post(path, [JSON_TYPE], IDLE), 200, null],
    ["{} (another length)", post(path, [JSON_TYPE], "{}"), 200, null],
    ["busy with a charset", post(path, ["Content-Type: application/json; charset=utf-8"], BUSY), 200, null],
    ["busy, chunked", post(path, [JSON_TYPE, "Transfer-Encoding: chunked"], `13\r\n${BUSY}\r\n0\r\n\r\n`), 200, null],
    ["an empty query string", post(`${path}?`, [JSON_TYPE], BUSY), 200, null],
    ["a percent-encoded id", post("/v1/sessions/h%62/heartbeat", [JSON_TYPE], BUSY), 200, null],
    ["a bad activity, 19 bytes", post(path, [JSON_TYPE], '{"activity":"zzzz"}'), 400, "SR_BAD_REQUEST"],
    ["a bad activity", post(path, [JSON_TYPE], '{"activity":"sleepy"}'), 400, "SR_BAD_REQUEST"],
    ["activity of another type, 19 bytes", post(path, [JSON_TYPE], '{"activity":123456}'), 400, "SR_BAD_REQUEST"],
    ["an extra key", post(path, [JSON_TYPE], '{"activity":"busy","x":1}'), 400, "SR_BAD_REQUEST"],
    ["other keys, 19 bytes", post(path, [JSON_TYPE], '{"y":"busy","z":12}'), 400, "SR_BAD_REQUEST"],
    ["an array, 19 bytes", post(path, [JSON_TYPE], '["activity","busy"]'), 400, "SR_BAD_REQUEST"],
    ["a query string", post(`${path}?x=1`, [JSON_TYPE], BUSY), 400, "SR_BAD_REQUEST"],
    ["a query string, no body", post(`${path}?activity=idle`, []), 400, "SR_BAD_REQUEST"],
    ["text/plain", post(path, ["Content-Type: text/plain"], BUSY), 415, "SR_UNSUPPORTED_MEDIA_TYPE"],
    ["a body without a type", post(path, [], BUSY), 415, "SR_UNSUPPORTED_MEDIA_TYPE"],
    ["invalid JSON, 19 bytes", post(path, [JSON_TYPE], '{"activity":busy"}}'), 400, "SR_INVALID_JSON"],
    [
      "invalid JSON, chunked",
      post(path, [JSON_TYPE, "Transfer-Encoding: chunked"], '3\r\n{"a\r\n0\r\n\r\n'),
      400,
      "SR_INVALID_JSON",
    ],
    ["a __proto__ key, 19 bytes", post(path, [JSON_TYPE], '{"__proto__":"bus"}'), 400, "SR_INVALID_JSON"],
    ["a __proto__ key", post(path, [JSON_TYPE], '{"__proto__":{"activity":"busy"}}'), 400, "SR_INVALID_JSON"],
    ["constructor.prototype", post(path, [JSON_TYPE], '{"constructor":{"prototype":{}}}'), 400, "SR_INVALID_JSON"],
    ["JSON type, empty body", post(path, [JSON_TYPE, "Content-Length: 0"]), 400, "SR_INVALID_JSON"],
    ["a body over the cap", post(path, [JSON_TYPE], `{"activity":"${"x".repeat(17_000)}"}`), 413, "SR_BODY_TOO_LARGE"],
    ["an unknown session", post("/v1/sessions/nope/heartbeat", [JSON_TYPE], BUSY), 404, "SR_SESSION_NOT_FOUND"],
    ["an unknown session, no body", post("/v1/sessions/nope/heartbeat", []), 404, "SR_SESSION_NOT_FOUND"],
    ["an id the pattern refuses", post("/v1/sessions/-x/heartbeat", [JSON_TYPE], BUSY), 400, "SR_BAD_REQUEST"],
    ["a trailing slash", post(`${path}/`, [JSON_TYPE], BUSY), 404, "SR_ROUTE_NOT_FOUND"],
    ["another case", post("/v1/sessions/hb/Heartbeat", [JSON_TYPE], BUSY), 404, "SR_ROUTE_NOT_FOUND"],
    ["PUT", post(path, [JSON_TYPE], BUSY).replace(/^POST/, "PUT"), 404, "SR_ROUTE_NOT_FOUND"],
    // The longest id the API accepts is served; one over the router's maxParamLength (256) is
    // refused in the API's envelope (frameworkErrors).
    ["a 128-character id", post(`/v1/sessions/${longId}/heartbeat`, [JSON_TYPE], BUSY), 404, "SR_SESSION_NOT_FOUND"],
    ["an id over 256 characters", post(`/v1/sessions/${tooLong}/heartbeat`, [JSON_TYPE], BUSY), 400, "SR_BAD_REQUEST"],
  ];
  for (const [what, bytes, status, code] of cases) {
    const res = await raw(d.socket, bytes);
    assert.equal(res.status, status, `${what}: ${JSON.stringify(res.body)}`);
    // Always the SR_* envelope.
    const got = typeof res.body.error === "object" ? res.body.error.code : null;
    assert.equal(got, code, `${what}: ${JSON.stringify(res.body)}`);
    if (status === 200) {
      assert.deepEqual(Object.keys(res.body), ["id", "state", "deadline", "expiresBy", "warning"], what);
      assert.equal(res.body.warning, null, what);
      assert.equal(res.body.id, "hb", what);
    }
    if (status < 500) assert.match(res.headers["content-type"] ?? "", /^application\/json/, what);
  }
  // The session is still live and answers: none of the refused requests changed anything.
  assert.equal((await d.api("GET", "/v1/sessions/hb")).body.state, "live");

  // Fenced: 409, served by the fast path and by fastify alike.
  assert.equal((await d.api("DELETE", "/v1/sessions/hb")).status, 202);
  for (const bytes of [post(path, [JSON_TYPE], BUSY), post(path, []), post(path, [JSON_TYPE], "{}")]) {
    const res = await raw(d.socket, bytes);
    assert.equal(res.status, 409);
    assert.equal(res.body.error?.code, "SR_SESSION_FENCED");
  }
});

test("fast path: its answer is fastify's, byte for byte apart from the time; busy moves activity, idle does not", async (t) => {
  const { d, register } = await setup(t);
  await register("same");
  const path = "/v1/sessions/same/heartbeat";
  // `{}` goes to fastify (another length); BUSY is served by the fast path.
  const viaFastify = await raw(d.socket, post(path, [JSON_TYPE], "{}"));
  const viaFast = await raw(d.socket, post(path, [JSON_TYPE], BUSY));
  const strip = (a: RawAnswer) => ({
    status: a.status,
    headers: Object.keys(a.headers).filter((h) => h !== "date"),
    type: a.headers["content-type"],
    body: { ...a.body, deadline: typeof a.body.deadline },
  });
  assert.deepEqual(strip(viaFast), strip(viaFastify));
  assert.equal(Number(viaFast.headers["content-length"]), JSON.stringify(viaFast.body).length);
  assert.equal(new Date(viaFast.body.deadline as string).toISOString(), viaFast.body.deadline);

  const view = async () =>
    (await d.api<{ lastHeartbeatAt: string; lastActivityAt: string }>("GET", "/v1/sessions/same")).body;
  const before = await view();
  await new Promise((r) => setTimeout(r, 20));
  assert.equal((await raw(d.socket, post(path, [JSON_TYPE], IDLE))).status, 200);
  const afterIdle = await view();
  assert.ok(afterIdle.lastHeartbeatAt > before.lastHeartbeatAt, "idle: a heartbeat");
  assert.equal(afterIdle.lastActivityAt, before.lastActivityAt, "idle: no activity");
  await new Promise((r) => setTimeout(r, 20));
  assert.equal((await raw(d.socket, post(path, []))).status, 200);
  const afterBusy = await view();
  assert.ok(afterBusy.lastActivityAt > afterIdle.lastActivityAt, "no body: busy");
});

test("fast path: a warning standing is in its answer as in fastify's, field for field", async (t) => {
  const { d, register } = await setup(t, {
    profiles: { default: { heartbeat_timeout_sec: 60, idle_timeout_sec: 4, warn_before_sec: 3 } },
  });
  await register("warned");
  const path = "/v1/sessions/warned/heartbeat";
  await d.waitFor((e) => e.event === "session.warning" && e.sessionId === "warned", 10_000);
  // IDLE is served by the fast path; the same body spaced out (another length) by fastify.
  const viaFast = await raw(d.socket, post(path, [JSON_TYPE], IDLE));
  const viaFastify = await raw(d.socket, post(path, [JSON_TYPE], '{"activity": "idle"}'));
  assert.equal(viaFast.status, 200, JSON.stringify(viaFast.body));
  assert.deepEqual(viaFast.body, viaFastify.body);
  assert.equal(Number(viaFast.headers["content-length"]), JSON.stringify(viaFast.body).length);
  const shown = (await d.api<{ warning: unknown }>("GET", "/v1/sessions/warned")).body.warning;
  assert.deepEqual(viaFast.body.warning, shown);
  assert.equal((viaFast.body.warning as { reason: string }).reason, "idle_timeout");
  // A busy beat voids it: null in the answer of the beat itself.
  const busy = await raw(d.socket, post(path, [JSON_TYPE], BUSY));
  assert.equal(busy.body.warning, null);
});

test("fast path: heartbeats and refusals are counted as the route's", async (t) => {
  const { d, register } = await setup(t);
  await register("m");
  const path = "/v1/sessions/m/heartbeat";
  const ok0 = await metric(d, HB_200);
  const bad0 = await metric(d, HB_400);
  const accepted0 = await metric(d, ACCEPTED);
  for (let i = 0; i < 5; i++) assert.equal((await raw(d.socket, post(path, [JSON_TYPE], BUSY))).status, 200);
  for (let i = 0; i < 3; i++) assert.equal((await raw(d.socket, post(path, []))).status, 200);
  assert.equal((await raw(d.socket, post(path, [JSON_TYPE], '{"activity":"zzzz"}'))).status, 400);
  assert.equal(await metric(d, HB_200), ok0 + 8);
  assert.equal(await metric(d, HB_400), bad0 + 1);
  assert.equal(await metric(d, ACCEPTED), accepted0 + 8);
});

test("fast path: only the registering uid or an admin may heartbeat (SO_PEERCRED, per connection)", async (t) => {
  const { d, register } = await setup(t);
  await register("roots"); // registered by root: an admin
  const owner = testUser(t);
  const other = testUser(t);
  const ownerClient = apiAs(t, owner, d.socket);
  const otherClient = apiAs(t, other, d.socket);
  const engine = sleeper(t, "setpriv", [
    "--reuid",
    String(owner.uid),
    "--regid",
    String(owner.gid),
    "--clear-groups",
    "sleep",
    "30",
  ]);
  await new Promise((r) => setTimeout(r, 100)); // let setpriv exec sleep as the owner
  const reg = await ownerClient.call("POST", "/v1/sessions", { id: "users", engine: { pid: engine.pid } });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));

  const code = (b: unknown): unknown => (b as { error?: { code?: string } }).error?.code;
  // The client library sends `{"activity":"busy"}` as application/json (the fast path) and no
  // body without a type (the fast path too); `{}` goes to fastify.
  for (const body of [{ activity: "busy" }, { activity: "idle" }, undefined, {}]) {
    const refused = await otherClient.call("POST", "/v1/sessions/roots/heartbeat", body);
    assert.equal(refused.status, 403, JSON.stringify(body));
    assert.equal(code(refused.body), "SR_NOT_SESSION_OWNER");
    const notHis = await otherClient.call("POST", "/v1/sessions/users/heartbeat", body);
    assert.equal(notHis.status, 403, JSON.stringify(body));
    assert.equal(code(notHis.body), "SR_NOT_SESSION_OWNER");
    const own = await ownerClient.call("POST", "/v1/sessions/users/heartbeat", body);
    assert.equal(own.status, 200, JSON.stringify(own.body));
    const admin = await d.api("POST", "/v1/sessions/users/heartbeat", body);
    assert.equal(admin.status, 200, JSON.stringify(admin.body));
  }
  // A refused body is refused before the owner check, as by the route.
  const bad = await otherClient.call("POST", "/v1/sessions/roots/heartbeat", { activity: "zzzz" });
  assert.equal(bad.status, 400);
  assert.equal(code(bad.body), "SR_BAD_REQUEST");
  // Unknown sessions stay unknown to everyone.
  const unknown = await otherClient.call("POST", "/v1/sessions/nope/heartbeat", { activity: "busy" });
  assert.equal(unknown.status, 404);
  assert.equal(code(unknown.body), "SR_SESSION_NOT_FOUND");
});

test("fast path on loopback TCP: only after the token, Host and Origin checks", async (t) => {
  const token = "0123456789abcdef0123456789abcdef0123456789abcdef";
  const dir = tempDir(t);
  const file = join(dir, "api-token");
  writeFileSync(file, token + "\n", { mode: 0o600 });
  chmodSync(file, 0o600);
  const { d, register } = await setup(t, { api: { tcp: { listen: "127.0.0.1:0", token_file: file } } });
  await register("tcp");
  const port = d.daemon.tcpAddress?.port as number;
  const call = (headers: Record<string, string>, body: string) =>
    new Promise<{ status: number; code: unknown }>((resolve, reject) => {
      const req = request(
        { host: "127.0.0.1", port, method: "POST", path: "/v1/sessions/tcp/heartbeat", setHost: false, headers },
        (res) => {
          let text = "";
          res.setEncoding("utf8").on("data", (c: string) => (text += c));
          res.on("end", () =>
            resolve({
              status: res.statusCode ?? 0,
              code: (JSON.parse(text) as { error?: { code: string } }).error?.code,
            }),
          );
        },
      );
      req.on("error", reject);
      req.end(body);
    });
  const host = `127.0.0.1:${port}`;
  const json = { "content-type": "application/json" };
  assert.deepEqual(await call({ host, ...json }, BUSY), { status: 401, code: "SR_UNAUTHORIZED" });
  assert.deepEqual(await call({ host: "evil.example", authorization: `Bearer ${token}`, ...json }, BUSY), {
    status: 403,
    code: "SR_HOST_REFUSED",
  });
  assert.deepEqual(await call({ host, origin: "http://x", authorization: `Bearer ${token}`, ...json }, BUSY), {
    status: 403,
    code: "SR_ORIGIN_REFUSED",
  });
  assert.deepEqual(await call({ host, authorization: `Bearer ${token}`, ...json }, BUSY), {
    status: 200,
    code: undefined,
  });
  assert.deepEqual(await call({ host, authorization: `Bearer ${token}`, ...json }, '{"activity":"zzzz"}'), {
    status: 400,
    code: "SR_BAD_REQUEST",
  });
});
