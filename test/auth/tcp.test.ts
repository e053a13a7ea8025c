/**
 * Loopback TCP (api.tcp): every request needs the bearer token, a loopback Host and no
 * Origin; a refused request reaches no route and changes nothing. The token file itself is
 * checked at start. Real TCP on 127.0.0.1, a port picked by the kernel.
 */
import assert from "node:assert/strict";
import { chmodSync, writeFileSync } from "node:fs";
import { request } from "node:http";
import { connect } from "node:net";
import { join } from "node:path";
import { test } from "node:test";
import { Daemon } from "../../src/daemon/daemon.js";
import { ReaperError } from "../../src/errors.js";
import { isGone, sleeper, startDaemon, tempDir, testConfig } from "../helpers.js";

const TOKEN = "0123456789abcdef0123456789abcdef0123456789abcdef";

function tokenFile(dir: string, text = TOKEN, mode = 0o600): string {
  const file = join(dir, "api-token");
  writeFileSync(file, text + "\n", { mode });
  chmodSync(file, mode);
  return file;
}

function tcpCall(
  port: number,
  method: string,
  path: string,
  headers: Record<string, string>,
  body?: unknown,
): Promise<{
  status: number;
  headers: Record<string, unknown>;
  body: { error?: { code: string } } & Record<string, unknown>;
}> {
  const payload = body === undefined ? undefined : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = request(
      {
        host: "127.0.0.1",
        port,
        method,
        path,
        setHost: false,
        headers: { ...(payload ? { "content-type": "application/json" } : {}), ...headers },
        timeout: 5000,
      },
      (res) => {
        let text = "";
        res.setEncoding("utf8").on("data", (d: string) => (text += d));
        res.on("end", () =>
          resolve({
            status: res.statusCode ?? 0,
            headers: res.headers,
            body: /json/.test(String(res.headers["content-type"])) ? (JSON.parse(text) as never) : {},
          }),
        );
      },
    );
    req.on("error", reject);
    req.end(payload);
  });
}

async function tcpDaemon(t: Parameters<typeof tempDir>[0]) {
  const dir = tempDir(t);
  const config = testConfig(dir, { api: { tcp: { listen: "127.0.0.1:0", token_file: tokenFile(dir) } } });
  const d = await startDaemon(t, config);
  const port = d.daemon.tcpAddress?.port;
  assert.ok(port !== undefined && port > 0);
  return { d, port };
}

test("loopback TCP: no token, a wrong token, a foreign Host or an Origin are refused before any route", async (t) => {
  const { d, port } = await tcpDaemon(t);
  const victim = sleeper(t);
  const register = { id: "via-tcp", engine: { pid: victim.pid }, heartbeatTimeoutSec: 1 };
  const good = { host: `127.0.0.1:${port}`, authorization: `Bearer ${TOKEN}` };
  const cases: [Record<string, string>, number, string][] = [
    [{ host: `127.0.0.1:${port}` }, 401, "SR_UNAUTHORIZED"],
    [{ host: `127.0.0.1:${port}`, authorization: `Bearer ${TOKEN.slice(0, -1)}x` }, 401, "SR_UNAUTHORIZED"],
    [{ host: `127.0.0.1:${port}`, authorization: `Bearer ${TOKEN}${TOKEN}` }, 401, "SR_UNAUTHORIZED"],
    [{ host: `127.0.0.1:${port}`, authorization: TOKEN }, 401, "SR_UNAUTHORIZED"],
    [{ ...good, host: `evil.example:${port}` }, 403, "SR_HOST_REFUSED"],
    [{ ...good, host: `127.0.0.1.nip.io:${port}` }, 403, "SR_HOST_REFUSED"],
    [{ ...good, origin: "http://127.0.0.1" }, 403, "SR_ORIGIN_REFUSED"],
    [{ ...good, origin: "null" }, 403, "SR_ORIGIN_REFUSED"],
  ];
  for (const [headers, status, errCode] of cases) {
    const res = await tcpCall(port, "POST", "/v1/sessions", headers, register);
    assert.equal(res.status, status, JSON.stringify(headers));
    assert.equal(res.body.error?.code, errCode, JSON.stringify(headers));
    if (status === 401) assert.match(String(res.headers["www-authenticate"]), /^Bearer /);
  }
  // Nothing registered, nothing signalled.
  assert.equal((await d.api("GET", "/v1/sessions/via-tcp")).status, 404);
  assert.equal(isGone(victim.pid), false);

  // With all three right: the same routes as the unix socket, as an admin.
  for (const host of [`127.0.0.1:${port}`, `localhost:${port}`, "localhost"]) {
    assert.equal((await tcpCall(port, "GET", "/v1/daemon", { ...good, host })).status, 200, host);
  }
  const ok = await tcpCall(port, "POST", "/v1/sessions", good, { ...register, heartbeatTimeoutSec: 30 });
  assert.equal(ok.status, 201, JSON.stringify(ok.body));
  assert.deepEqual(ok.body.registeredBy, { uid: null, admin: true, via: "tcp" });
  const metrics = await tcpCall(port, "GET", "/metrics", good);
  assert.equal(metrics.status, 200);
});

test("loopback TCP: the token file must be private, long enough, and the address a loopback literal", (t) => {
  const dir = tempDir(t);
  const daemonWith = (file: string, listen = "127.0.0.1:0") =>
    new Daemon({ config: testConfig(dir, { api: { tcp: { listen, token_file: file } } }) });
  const expectConfigError = (fn: () => unknown, pattern: RegExp) =>
    assert.throws(
      fn,
      (err: unknown) => err instanceof ReaperError && err.code === "SR_CONFIG_INVALID" && pattern.test(err.message),
    );

  expectConfigError(() => daemonWith(tokenFile(dir, TOKEN, 0o644)), /mode 0644 lets others read it/);
  expectConfigError(() => daemonWith(tokenFile(dir, TOKEN, 0o640)), /mode 0640/);
  expectConfigError(() => daemonWith(tokenFile(dir, "short")), /at least 32 characters/);
  expectConfigError(() => daemonWith(join(dir, "missing")), /cannot open/);
  for (const listen of [
    "0.0.0.0:7787",
    "localhost:7787",
    "192.168.1.1:80",
    "[::]:7787",
    "127.0.0.1",
    "127.0.0.1:65536",
  ]) {
    expectConfigError(() => daemonWith(tokenFile(dir), listen), /literal loopback address/);
  }
});

test("a client that never finishes its headers is cut off after api.header_timeout_ms", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir, { api: { header_timeout_ms: 300, request_timeout_ms: 600 } }));
  const started = Date.now();
  const closed = await new Promise<boolean>((resolve) => {
    const sock = connect(d.socket, () => sock.write("POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nX-Slow: "));
    let answer = "";
    sock.setEncoding("utf8").on("data", (s: string) => (answer += s)); // flowing, so the FIN is read
    sock.on("close", () => resolve(answer.startsWith("HTTP/1.1 408")));
    sock.on("error", () => undefined);
    setTimeout(() => (sock.destroy(), resolve(false)), 10_000).unref();
  });
  assert.equal(closed, true, "the daemon answered 408 and closed the slow connection");
  t.diagnostic(`slow client cut off after ${Date.now() - started} ms (header_timeout_ms 300)`);
  assert.equal((await d.api("GET", "/healthz")).status, 200);
});
