/**
 * The heartbeat lane (src/http/heartbeat-lane.ts) answers connections that carry only plain
 * heartbeats from their bytes, and hands a connection to node:http at the first byte that is
 * anything else. Raw bytes on the unix socket, on one kept connection, so that what the lane
 * answers and what node:http answers after it can be told apart and compared.
 */
import assert from "node:assert/strict";
import { connect, type Socket } from "node:net";
import { test } from "node:test";
import { sleeper, startDaemon, tempDir, testConfig } from "../helpers.js";

const BUSY = '{"activity":"busy"}';
const IDLE = '{"activity":"idle"}';

function heartbeat(id: string, body: string | null = BUSY): string {
  return body === null
    ? `POST /v1/sessions/${id}/heartbeat HTTP/1.1\r\nHost: localhost\r\n\r\n`
    : `POST /v1/sessions/${id}/heartbeat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`;
}

const get = (path: string): string => `GET ${path} HTTP/1.1\r\nHost: localhost\r\n\r\n`;

interface Answer {
  status: number;
  /** Header lines as sent (name: value), in order. */
  lines: string[];
  body: Record<string, unknown>;
}

/** A kept connection that reads whole answers (Content-Length framed) in order. */
class Conn {
  private buf = Buffer.alloc(0);
  private waiters: (() => void)[] = [];
  closed = false;
  readonly socket: Socket;

  constructor(path: string) {
    this.socket = connect({ path });
    this.socket.on("data", (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.wake();
    });
    this.socket.on("close", () => {
      this.closed = true;
      this.wake();
    });
    this.socket.on("error", () => undefined);
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  send(bytes: string): void {
    this.socket.write(bytes);
  }

  async answer(timeoutMs = 10_000): Promise<Answer> {
    const until = Date.now() + timeoutMs;
    for (;;) {
      const end = this.buf.indexOf("\r\n\r\n");
      if (end >= 0) {
        const head = this.buf.toString("latin1", 0, end).split("\r\n");
        const lines = head.slice(1);
        const length = Number(lines.find((l) => /^content-length:/i.test(l))?.split(":")[1] ?? 0);
        if (this.buf.length >= end + 4 + length) {
          const text = this.buf.toString("utf8", end + 4, end + 4 + length);
          this.buf = this.buf.subarray(end + 4 + length);
          return { status: Number(head[0]?.split(" ")[1]), lines, body: text ? (JSON.parse(text) as never) : {} };
        }
      }
      if (this.closed) throw new Error("the connection closed");
      if (Date.now() > until) throw new Error("no answer in time");
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 50);
      });
    }
  }

  close(): void {
    this.socket.destroy();
  }
}

async function setup(t: Parameters<typeof tempDir>[0], api: Record<string, unknown> = {}) {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir, { api, store: { flush_interval_ms: 60_000 } }));
  const engine = sleeper(t);
  for (const id of ["a", "b"]) {
    const res = await d.api("POST", "/v1/sessions", { id, engine: { pid: engine.pid } });
    assert.equal(res.status, 201, JSON.stringify(res.body));
  }
  const conn = (): Conn => {
    const c = new Conn(d.socket);
    t.after(() => c.close());
    return c;
  };
  return { d, conn };
}

test("lane: heartbeats on a kept connection, then another route on it: node:http takes over and answers that and every later request, in order", async (t) => {
  const { d, conn } = await setup(t);
  const c = conn();
  for (const [id, body] of [
    ["a", BUSY],
    ["b", IDLE],
    ["a", null],
  ] as const) {
    c.send(heartbeat(id, body));
    const a = await c.answer();
    assert.equal(a.status, 200);
    assert.equal(a.body.id, id);
  }
  c.send(get("/v1/sessions/a"));
  const view = await c.answer();
  assert.equal(view.status, 200);
  assert.equal(view.body.id, "a");
  assert.equal(view.body.state, "live");
  // The same connection, now node:http's: heartbeats and refusals still answer as the route does.
  c.send(heartbeat("b"));
  assert.equal((await c.answer()).status, 200);
  c.send(heartbeat("nope"));
  const missing = await c.answer();
  assert.equal(missing.status, 404);
  assert.equal((missing.body.error as { code: string }).code, "SR_SESSION_NOT_FOUND");
  // An unknown session in the lane is refused the same way.
  const fresh = conn();
  fresh.send(heartbeat("nope"));
  const refused = await fresh.answer();
  assert.equal(refused.status, 404);
  assert.equal((refused.body.error as { code: string }).code, "SR_SESSION_NOT_FOUND");
  assert.equal((await d.api("GET", "/v1/sessions/b")).body.state, "live");
});

test("lane: pipelined requests in one write are answered in order, the lane's and node:http's alike", async (t) => {
  const { conn } = await setup(t);
  const c = conn();
  c.send(heartbeat("a") + heartbeat("b", IDLE) + get("/v1/sessions/a") + heartbeat("b"));
  const answers = [await c.answer(), await c.answer(), await c.answer(), await c.answer()];
  assert.deepEqual(
    answers.map((a) => [a.status, a.body.id]),
    [
      [200, "a"],
      [200, "b"],
      [200, "a"],
      [200, "b"],
    ],
  );
  assert.equal(answers[2]?.body.state, "live");
  assert.ok(!("state" in (answers[3]?.body ?? {})) || answers[3]?.body.state === "live");
});

test("lane: a heartbeat cut across two writes is node:http's, and answered", async (t) => {
  const { conn } = await setup(t);
  const c = conn();
  const bytes = heartbeat("a");
  c.send(bytes.slice(0, 30));
  await new Promise((r) => setTimeout(r, 100));
  c.send(bytes.slice(30));
  const a = await c.answer();
  assert.equal(a.status, 200);
  assert.equal(a.body.id, "a");
});

test("lane: its answer is node:http's, header for header apart from the date", async (t) => {
  const { conn } = await setup(t);
  const lane = conn();
  lane.send(heartbeat("a"));
  const viaLane = await lane.answer();
  // Another connection handed to node:http first (a GET), then the same heartbeat: the fast path's answer.
  const http = conn();
  http.send(get("/v1/sessions/a"));
  await http.answer();
  http.send(heartbeat("a"));
  const viaHttp = await http.answer();
  const shape = (a: Answer) => ({
    status: a.status,
    lines: a.lines.map((l) => (/^date:/i.test(l) ? "Date: *" : l.replace(/"deadline":"[^"]*"/, ""))),
    keys: Object.keys(a.body),
  });
  assert.deepEqual(shape(viaLane), shape(viaHttp));
  assert.ok(viaLane.lines.some((l) => l === "Connection: keep-alive"));
  assert.ok(viaLane.lines.some((l) => /^Keep-Alive: timeout=\d+$/.test(l)));
});

test("lane: a silent new connection is answered 408 after api.header_timeout_ms, an idle kept one closed after api.keep_alive_timeout_ms", async (t) => {
  const { conn } = await setup(t, { header_timeout_ms: 300, keep_alive_timeout_ms: 1000 });
  const silent = conn();
  const t0 = Date.now();
  const timedOut = await silent.answer(5000);
  assert.equal(timedOut.status, 408);
  assert.equal((timedOut.body.error as { code: string }).code, "SR_REQUEST_TIMEOUT");
  assert.ok(Date.now() - t0 >= 250, `answered after ${Date.now() - t0} ms`);

  const kept = conn();
  kept.send(heartbeat("a"));
  assert.equal((await kept.answer()).status, 200);
  const t1 = Date.now();
  // Still open well inside the keep-alive timeout: a heartbeat on it is answered.
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(kept.closed, false);
  kept.send(heartbeat("a"));
  assert.equal((await kept.answer()).status, 200);
  const t2 = Date.now();
  while (!kept.closed && Date.now() - t2 < 5000) await new Promise((r) => setTimeout(r, 50));
  assert.equal(kept.closed, true, "closed once idle past keep_alive_timeout_ms");
  assert.ok(Date.now() - t2 >= 900, `closed after ${Date.now() - t2} ms idle (${t2 - t1} ms after the first)`);
});

test("lane: a stopping daemon closes the lane's idle connections and exits", async (t) => {
  const { d, conn } = await setup(t);
  const c = conn();
  c.send(heartbeat("a"));
  assert.equal((await c.answer()).status, 200);
  const t0 = Date.now();
  await d.stop();
  assert.equal(c.closed || (await new Promise((r) => setTimeout(r, 200)).then(() => c.closed)), true);
  assert.ok(Date.now() - t0 < 10_000, `stopped in ${Date.now() - t0} ms`);
});
