/**
 * GET /v1/events (src/http/events-stream.ts) over the real unix socket of a real daemon, with
 * real sessions (real processes, registered, expired, closed and reaped): the backlog, then
 * live events; the handoff between them; the session filter; a reader cut off and resuming
 * with since; what a non-admin (a real second user, SO_PEERCRED) may see; bad parameters; a
 * since below what retention purged; the daemon's stop ending a follower; the client
 * library's iterator across a daemon restart. Every stream is checked line by line against
 * the audit_events table itself: each event exactly once, in seq order, no gap.
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { chmodSync } from "node:fs";
import { request, type ClientRequest, type IncomingHttpHeaders } from "node:http";
import { connect, type Socket } from "node:net";
import { performance } from "node:perf_hooks";
import { test } from "node:test";
import { setTimeout as delay } from "node:timers/promises";
import { streamEvents, type AuditEventLine, type RetryInfo } from "../../src/client/index.js";
import type { eventJson } from "../../src/http/present.js";
import {
  apiAs,
  sleeper,
  startDaemon,
  tempDir,
  testConfig,
  testUser,
  until,
  type TestDaemon,
  type TestUser,
} from "../helpers.js";

type Line = AuditEventLine & { seq: number };
type ErrorBody = { error: { code: string; message: string; detail?: Record<string, unknown> } };

interface Row {
  seq: number;
  at: number;
  event: string;
  session_id: string | null;
  reason: string | null;
  step: string | null;
  outcome: string | null;
  duration_ms: number | null;
  detail: string | null;
}

/** What the table holds, as a line of the stream would show it (read with the daemon's own connection). */
function table(d: TestDaemon, where = "1 = 1", ...params: unknown[]): Line[] {
  const rows = d.daemon.store.db.prepare(`SELECT * FROM audit_events WHERE ${where} ORDER BY seq`).all(...params);
  return (rows as Row[]).map((r) => ({
    seq: r.seq,
    time: new Date(r.at).toISOString(),
    event: r.event,
    sessionId: r.session_id,
    reason: r.reason,
    step: r.step,
    outcome: r.outcome,
    durationMs: r.duration_ms,
    detail: r.detail === null ? null : (JSON.parse(r.detail) as Record<string, unknown>),
  }));
}

/** A response read line by line as it arrives, over its own connection. */
class Reader {
  status = 0;
  headers: IncomingHttpHeaders = {};
  readonly raw: string[] = [];
  /** When each raw line arrived (performance.now()). */
  readonly arrived: number[] = [];
  /** "end": the daemon ended the body; "cut": the connection broke first. */
  readonly done: Promise<"end" | "cut">;
  private rest = "";
  private readonly parsed: Line[] = [];
  private parsedUpTo = 0;
  private changed: () => void = () => undefined;

  private constructor(
    private readonly req: ClientRequest,
    done: Promise<"end" | "cut">,
  ) {
    this.done = done;
  }

  static open(socketPath: string, path: string, method = "GET"): Promise<Reader> {
    return new Promise((resolve, reject) => {
      let finish: (how: "end" | "cut") => void = () => undefined;
      const done = new Promise<"end" | "cut">((r) => (finish = r));
      const req = request({ socketPath, path, method, agent: false, headers: { host: "localhost" } }, (res) => {
        reader.status = res.statusCode ?? 0;
        reader.headers = res.headers;
        res.setEncoding("utf8");
        res.on("data", (chunk: string) => reader.take(chunk));
        res.on("end", () => finish("end"));
        res.on("error", () => finish("cut"));
        res.on("close", () => finish(res.complete ? "end" : "cut"));
        resolve(reader);
      });
      const reader = new Reader(req, done);
      req.on("error", (err) => {
        finish("cut");
        reject(err);
      });
      req.end();
    });
  }

  private take(chunk: string): void {
    this.rest += chunk;
    const now = performance.now();
    for (let nl = this.rest.indexOf("\n"); nl >= 0; nl = this.rest.indexOf("\n")) {
      this.raw.push(this.rest.slice(0, nl));
      this.arrived.push(now);
      this.rest = this.rest.slice(nl + 1);
    }
    this.changed();
  }

  /** The events so far (keep-alive lines skipped): each raw line is parsed once. */
  get lines(): Line[] {
    for (; this.parsedUpTo < this.raw.length; this.parsedUpTo++) {
      const l = this.raw[this.parsedUpTo]!;
      if (l !== "") this.parsed.push(JSON.parse(l) as Line);
    }
    return this.parsed.slice();
  }

  /** Resolves once the lines read satisfy `pred` (woken by each chunk); rejects after `timeoutMs`, or if the stream ends first. */
  async until(pred: (lines: Line[]) => boolean, what: string, timeoutMs = 30_000): Promise<Line[]> {
    await this.untilRaw(() => pred(this.lines), what, timeoutMs);
    return this.lines;
  }

  /** As `until`, on the raw lines (keep-alives included). */
  async untilRaw(pred: (raw: readonly string[]) => boolean, what: string, timeoutMs = 30_000): Promise<void> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      if (pred(this.raw)) return;
      const left = end - Date.now();
      if (left <= 0) throw new Error(`${what}: not within ${timeoutMs} ms; read:\n${this.raw.join("\n")}`);
      const ended = await new Promise<boolean>((resolve) => {
        const timer = setTimeout(() => resolve(false), left);
        this.changed = () => {
          clearTimeout(timer);
          resolve(false);
        };
        void this.done.then(() => {
          clearTimeout(timer);
          resolve(true);
        });
      });
      if (ended && !pred(this.raw)) throw new Error(`${what}: the stream ended first; read:\n${this.raw.join("\n")}`);
    }
  }

  close(): void {
    this.req.destroy();
  }
}

async function open(d: TestDaemon, path: string, t: { after: (fn: () => void) => void }): Promise<Reader> {
  const r = await Reader.open(d.socket, path);
  t.after(() => r.close());
  return r;
}

const has = (event: string, sessionId: string) => (lines: Line[]) =>
  lines.some((l) => l.event === event && l.sessionId === sessionId);

/** Seqs strictly rising: no event twice, none out of order. */
function rising(lines: readonly Line[]): void {
  for (let i = 1; i < lines.length; i++) {
    assert.ok(lines[i]!.seq > lines[i - 1]!.seq, `seq ${lines[i]!.seq} after ${lines[i - 1]!.seq}`);
  }
}

/** A real process registered as a session; its id. */
async function session(d: TestDaemon, t: Parameters<typeof sleeper>[0], id: string, extra = {}): Promise<string> {
  const res = await d.api("POST", "/v1/sessions", { id, engine: { pid: sleeper(t).pid }, ...extra });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return id;
}

/** A response read over a raw socket: its head, then nothing until `drain()`; the kernel's buffers fill, then the daemon's. */
class Stalled {
  private readonly chunks: Buffer[] = [];
  private headRead = false;
  readonly closed: Promise<void>;

  private constructor(private readonly socket: Socket) {
    this.closed = new Promise((r) => socket.once("close", () => r()));
  }

  static open(socketPath: string, path: string, t: { after: (fn: () => void) => void }): Promise<Stalled> {
    return new Promise((resolve, reject) => {
      const socket = connect(socketPath);
      t.after(() => void socket.destroy());
      const s = new Stalled(socket);
      socket.on("error", reject);
      socket.on("data", (b: Buffer) => {
        s.chunks.push(b);
        if (s.headRead || !Buffer.concat(s.chunks).includes("\r\n\r\n")) return;
        s.headRead = true;
        socket.pause();
        resolve(s);
      });
      socket.write(`GET ${path} HTTP/1.1\r\nHost: localhost\r\n\r\n`);
    });
  }

  /** Reads what the kernel kept, to the end of the connection: every byte received. */
  async drain(): Promise<Buffer> {
    this.socket.resume();
    await this.closed;
    return Buffer.concat(this.chunks);
  }
}

/** A chunked HTTP/1.1 response: its head, its body's bytes as received, and whether its last chunk (size 0) came. */
function dechunk(raw: Buffer): { head: string; body: string; complete: boolean } {
  const headEnd = raw.indexOf("\r\n\r\n");
  assert.ok(headEnd > 0, "a response head");
  const head = raw.subarray(0, headEnd).toString("latin1");
  assert.match(head, /^transfer-encoding: chunked\r?$/im);
  const parts: Buffer[] = [];
  const result = (complete: boolean) => ({ head, body: Buffer.concat(parts).toString("utf8"), complete });
  for (let at = headEnd + 4; ;) {
    const eol = raw.indexOf("\r\n", at);
    if (eol < 0) return result(false);
    const size = Number.parseInt(raw.subarray(at, eol).toString("latin1"), 16);
    assert.ok(Number.isSafeInteger(size), `a chunk size at byte ${at}`);
    if (size === 0) return result(true);
    const data = raw.subarray(eol + 2, eol + 2 + size);
    parts.push(data);
    at = eol + 2 + size + 2;
    if (data.length < size || at > raw.length) return result(false);
    assert.equal(raw.subarray(at - 2, at).toString("latin1"), "\r\n", "a chunk's end");
  }
}

/** `name{labels}` (as printed) → value, from GET /metrics. */
async function scrape(d: TestDaemon): Promise<Map<string, number>> {
  const res = await d.api<string>("GET", "/metrics");
  assert.equal(res.status, 200);
  const out = new Map<string, number>();
  for (const line of res.body.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const at = line.lastIndexOf(" ");
    out.set(line.slice(0, at), Number(line.slice(at + 1)));
  }
  return out;
}

const STREAMS = "session_reaper_event_streams";
const CUT = "session_reaper_event_streams_cut_total";

/** Short server timeouts: a follower must outlive them while it waits, idle. */
const SHORT_TIMEOUTS = { header_timeout_ms: 1000, request_timeout_ms: 1000, keep_alive_timeout_ms: 1000 };

test("the client's AuditEventLine is what the route writes", () => {
  // Compile-time: a stored event as the server presents it (its time is never null: `at` is
  // NOT NULL) is a line of the client's type.
  const toClient = (e: Omit<ReturnType<typeof eventJson>, "time"> & { time: string }): AuditEventLine => e;
  assert.equal(typeof toClient, "function");
});

test("GET /v1/events: the backlog as NDJSON, then live events as they commit, each as the table holds it; a follower outlives the server's timeouts", async (t) => {
  const d = await startDaemon(t, testConfig(tempDir(t), { api: SHORT_TIMEOUTS }));
  await session(d, t, "s1");
  await session(d, t, "s2", { labels: { team: "data" } });

  // Without follow: everything kept, oldest first, then the end.
  const all = await open(d, "/v1/events", t);
  assert.equal(all.status, 200);
  assert.equal(all.headers["content-type"], "application/x-ndjson");
  assert.equal(all.headers["reaper-events-after"], "0");
  assert.equal(await all.done, "end");
  assert.deepEqual(all.lines, table(d, "seq <= ?", all.lines.at(-1)?.seq));
  assert.ok(has("session.registered", "s2")(all.lines) && all.lines.some((l) => l.event === "daemon.started"));

  // Following without since: from now. The session that expires by itself makes the follower
  // wait idle longer than the server's header, request and keep-alive timeouts.
  await session(d, t, "hb", { heartbeatTimeoutSec: 2 });
  const registered = await d.waitFor((e) => e.event === "session.registered" && e.sessionId === "hb");
  const live = await open(d, "/v1/events?follow=1", t);
  assert.equal(live.status, 200);
  assert.equal(live.headers.connection, "close");
  const start = Number(live.headers["reaper-events-after"]);
  assert.ok(start >= (registered.seq as number), "a follower without since starts at the newest event");
  // A backlog and live at once: from the start.
  const both = await open(d, "/v1/events?follow=1&since=0", t);
  // Nothing happens until hb expires, 2 s after its registration: both followers wait idle.
  await live.until(has("reap.finished", "hb"), "hb's expiry");
  await both.until(has("reap.finished", "hb"), "hb's expiry, after the backlog");
  // Then sessions register and end, several at once.
  await d.api("DELETE", "/v1/sessions/s1");
  const more = await Promise.all(["m1", "m2", "m3"].map((id) => session(d, t, id)));
  await Promise.all(more.map((id) => d.api("POST", `/v1/sessions/${id}/reap`)));

  const seen = await live.until(
    (l) =>
      has("reap.finished", "hb")(l) && has("reap.finished", "s1")(l) && more.every((id) => has("reap.finished", id)(l)),
    "the expiry and the reaps, live",
  );
  assert.ok(has("session.expired", "hb")(seen));
  assert.ok(seen.every((l) => l.seq > start));
  rising(seen);
  assert.deepEqual(seen, table(d, "seq > ? AND seq <= ?", start, seen.at(-1)?.seq));

  const whole = await both.until((l) => more.every((id) => has("reap.finished", id)(l)), "the backlog then live");
  rising(whole);
  assert.deepEqual(whole, table(d, "seq <= ?", whole.at(-1)?.seq));

  // HEAD: the headers a GET would have, and no stream left open.
  const head = await Reader.open(d.socket, "/v1/events?follow=1", "HEAD");
  assert.equal(head.status, 200);
  assert.equal(head.headers["content-type"], "application/x-ndjson");
  assert.equal(await head.done, "end");
});

test("GET /v1/events?session=ID: only that session's events, backlog and live; 404 and 410 as for its other routes", async (t) => {
  const d = await startDaemon(t, testConfig(tempDir(t)));
  await session(d, t, "a");
  await session(d, t, "b");
  const followA = await open(d, "/v1/events?session=a&follow=1&since=0", t);
  await d.api("DELETE", "/v1/sessions/b");
  await d.api("DELETE", "/v1/sessions/a");
  await d.reaped("b");
  const lines = await followA.until(has("reap.finished", "a"), "a's reap");
  assert.ok(lines.every((l) => l.sessionId === "a"));
  assert.deepEqual(lines, table(d, "session_id = 'a' AND seq <= ?", lines.at(-1)?.seq));

  const onlyB = await open(d, "/v1/events?session=b", t);
  assert.equal(await onlyB.done, "end");
  assert.deepEqual(onlyB.lines, table(d, "session_id = 'b'"));
  const sinceB = table(d, "session_id = 'b'")[1]!.seq;
  const afterB = await open(d, `/v1/events?session=b&since=${sinceB}`, t);
  await afterB.done;
  assert.deepEqual(afterB.lines, table(d, "session_id = 'b' AND seq > ?", sinceB));

  const unknown = await d.api<ErrorBody>("GET", "/v1/events?session=nope");
  assert.equal(unknown.status, 404);
  assert.equal(unknown.body.error.code, "SR_SESSION_NOT_FOUND");
});

test("GET /v1/events: a reader cut off mid-stream resumes with since, and every event arrives exactly once", async (t) => {
  const d = await startDaemon(t, testConfig(tempDir(t)));
  const first = await open(d, "/v1/events?follow=1", t);
  const start = Number(first.headers["reaper-events-after"]);
  // Sessions register and end throughout, while the reader is cut and comes back.
  const ids = Array.from({ length: 24 }, (_, i) => `r${i}`);
  const churn = (async () => {
    for (const id of ids) {
      await session(d, t, id);
      await d.api("DELETE", `/v1/sessions/${id}`);
    }
  })();
  const before = await first.until((l) => l.length >= 20, "the first events");
  first.close();
  assert.equal(await first.done, "cut");
  const last = before.at(-1)!.seq;
  const second = await open(d, `/v1/events?follow=1&since=${last}`, t);
  assert.equal(second.headers["reaper-events-after"], String(last));
  await churn;
  const after = await second.until(
    (l) => ids.every((id) => has("reap.finished", id)([...before, ...l])),
    "every reap",
    60_000,
  );
  const got = [...before, ...after];
  rising(got);
  assert.deepEqual(got, table(d, "seq > ? AND seq <= ?", start, got.at(-1)?.seq));
  for (const id of ids) assert.ok(has("reap.finished", id)(got), id);
});

/** A stream read by a process running as `user`: the daemon sees that uid (SO_PEERCRED). */
function readerAs(t: { after: (fn: () => void) => void }, user: TestUser, socket: string, path: string) {
  const script = `const http = require("node:http");
const [socketPath, path] = process.argv.slice(1);
http.get({ socketPath, path, headers: { host: "localhost" } }, (res) => {
  process.stdout.write(JSON.stringify({ status: res.statusCode }) + "\\n");
  res.pipe(process.stdout);
}).on("error", (e) => process.stdout.write(JSON.stringify({ error: String(e) }) + "\\n"));`;
  const child: ChildProcess = spawn(
    "setpriv",
    [
      "--reuid",
      String(user.uid),
      "--regid",
      String(user.gid),
      "--init-groups",
      "--",
      process.execPath,
      "-e",
      script,
      socket,
      path,
    ],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  t.after(() => void child.kill("SIGKILL"));
  let out = "";
  child.stdout?.setEncoding("utf8").on("data", (d: string) => (out += d));
  const parsed = (): Record<string, unknown>[] =>
    out
      .split("\n")
      .slice(0, -1)
      .filter((l) => l !== "")
      .map((l) => JSON.parse(l) as Record<string, unknown>);
  return {
    head: () => parsed()[0],
    lines: () => parsed().slice(1) as unknown as Line[],
  };
}

test("a non-admin follows only the sessions it registered; never the daemon's events nor another user's", async (t) => {
  const dir = tempDir(t);
  chmodSync(dir, 0o755);
  const d = await startDaemon(t, testConfig(dir, { api: { socket_mode: "0666" } }));
  const user = testUser(t);
  const other = testUser(t);
  const asUser = apiAs(t, user, d.socket);
  const asOther = apiAs(t, other, d.socket);
  const ownProcess = (): number => {
    const child = spawn("sleep", ["600"], { uid: user.uid, gid: user.gid, stdio: "ignore" });
    t.after(() => void child.kill("SIGKILL"));
    return child.pid as number;
  };
  await session(d, t, "root-1");
  let res = await asUser.call("POST", "/v1/sessions", { id: "mine-1", engine: { pid: ownProcess() } });
  assert.equal(res.status, 201, JSON.stringify(res.body));

  const follower = readerAs(t, user, d.socket, "/v1/events?follow=1&since=0");
  await until(() => follower.lines().length >= 1, 15_000, "the user's backlog");
  assert.equal(follower.head()?.status, 200);
  // Registered after the follower started: its uid comes from its session.registered.
  res = await asUser.call("POST", "/v1/sessions", { id: "mine-2", engine: { pid: ownProcess() } });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  // root's session ends first: its events are published before the user's reaps end.
  await d.api("POST", "/v1/sessions/root-1/reap");
  await d.reaped("root-1");
  await d.api("POST", "/v1/sessions/mine-1/reap");
  await d.api("POST", "/v1/sessions/mine-2/reap");
  await until(
    () => has("reap.finished", "mine-1")(follower.lines()) && has("reap.finished", "mine-2")(follower.lines()),
    30_000,
    "the user's reaps, live",
  );
  const lines = follower.lines();
  assert.deepEqual(
    lines,
    table(d, "session_id IN ('mine-1', 'mine-2') AND seq <= ?", lines.at(-1)?.seq),
    "its own sessions' events, each once, and nothing else",
  );

  // Another session's stream is refused; the user's own is not; the other user sees nothing of them.
  const refused = await asUser.call<ErrorBody>("GET", "/v1/events?session=root-1");
  assert.equal(refused.status, 403);
  assert.equal(refused.body.error.code, "SR_NOT_SESSION_OWNER");
  assert.equal((await asUser.call("GET", "/v1/events?session=mine-1")).status, 200);
  const nothing = await asOther.call<unknown>("GET", "/v1/events");
  assert.equal(nothing.status, 200);
  assert.equal(nothing.body, null, "an empty body: no event is the other user's");
});

test("GET /v1/events: bad parameters answer 400 with a stable code and open nothing", async (t) => {
  const d = await startDaemon(t, testConfig(tempDir(t)));
  await session(d, t, "x");
  // The daemon's own events (a stall on a loaded host) may come any time; the sessions' may not.
  const before = table(d, "event NOT LIKE 'daemon.%'").length;
  const last = d.daemon.store.lastEventSeq();
  for (const q of [
    "follow=2",
    "follow=true",
    "follow=",
    "follow=01",
    "follow=1&follow=1",
    "since=-1",
    "since=abc",
    "since=1.5",
    "since=0x10",
    "since=1e3",
    `since=${last + 1_000_000}`,
    "since=9999999999999999",
    "session=",
    "session=..%2Fx",
    "sessionId=x",
    "limit=10",
  ]) {
    const res = await d.api<ErrorBody>("GET", `/v1/events?${q}`);
    assert.equal(res.status, 400, `${q}: ${JSON.stringify(res.body)}`);
    assert.equal(res.body.error.code, "SR_BAD_REQUEST", q);
    assert.equal(typeof res.body.error.message, "string");
  }
  const past = await d.api<ErrorBody>("GET", `/v1/events?since=${last + 1_000_000}`);
  assert.match(past.body.error.message, /past the newest event/);
  assert.equal(table(d, "event NOT LIKE 'daemon.%'").length, before, "nothing recorded");
  // The same connection still answers: nothing was left streaming on it.
  assert.equal((await d.api("GET", "/v1/daemon")).status, 200);
});

test("a non-admin uid may hold 8 event streams open: the 9th answers 429 SR_TOO_MANY_STREAMS; an admin is not counted", async (t) => {
  const dir = tempDir(t);
  chmodSync(dir, 0o755);
  const d = await startDaemon(t, testConfig(dir, { api: { socket_mode: "0666" } }));
  const user = testUser(t);
  const open = Array.from({ length: 8 }, () => readerAs(t, user, d.socket, "/v1/events?follow=1"));
  for (const r of open) await until(() => r.head() !== undefined, 15_000, "a stream's head");
  assert.deepEqual(
    open.map((r) => r.head()?.status),
    Array.from({ length: 8 }, () => 200),
  );
  const ninth = readerAs(t, user, d.socket, "/v1/events?follow=1");
  await until(() => ninth.head() !== undefined, 15_000, "the ninth's answer");
  assert.equal(ninth.head()?.status, 429);
  // The root test process is an admin: its streams are not counted against anyone.
  const mine = await new Promise<number>((resolve, reject) => {
    const req = request(
      { socketPath: d.socket, path: "/v1/events?follow=1", headers: { host: "localhost" } },
      (res) => {
        resolve(res.statusCode ?? 0);
        res.destroy();
      },
    );
    req.on("error", reject);
    req.end();
  });
  assert.equal(mine, 200);
});

test("GET /v1/events: a since below what retention purged answers 410 SR_EVENTS_PURGED, naming where to resume", async (t) => {
  const d = await startDaemon(t, testConfig(tempDir(t), { store: { retain_reaped_sec: 1 } }));
  await session(d, t, "old");
  await d.api("POST", "/v1/sessions/old/reap");
  const finished = await d.reaped("old");
  await session(d, t, "kept");
  const purge = await d.waitFor((e) => e.event === "store.purged" && (e.detail?.sessions as number) >= 1, 30_000);
  // No pass after this one: with a retention of a second, each pass purges the one before's store.purged.
  await d.daemon.retention.stop();
  const through = purge.detail?.throughSeq as number;
  assert.ok(through >= (finished.seq as number), `throughSeq ${through} covers old's reap.finished`);

  const gap = await d.api<ErrorBody>("GET", "/v1/events?since=0");
  assert.equal(gap.status, 410);
  assert.equal(gap.body.error.code, "SR_EVENTS_PURGED");
  const purgedThrough = gap.body.error.detail?.purgedThrough as number;
  assert.ok(purgedThrough >= through);
  const resumed = await open(d, `/v1/events?since=${purgedThrough}`, t);
  assert.equal(resumed.status, 200);
  await resumed.done;
  assert.deepEqual(resumed.lines, table(d, "seq > ?", purgedThrough));
  // Without since: what is kept, the purged session's events gone with it.
  const kept = await open(d, "/v1/events", t);
  await kept.done;
  assert.ok(!kept.lines.some((l) => l.sessionId === "old"));
  assert.ok(has("session.registered", "kept")(kept.lines));
  const gone = await d.api<ErrorBody>("GET", "/v1/events?session=old");
  assert.equal(gone.status, 410);
  assert.equal(gone.body.error.code, "SR_SESSION_GONE");
});

test("GET /v1/events: a quiet follower gets an empty line every keep-alive period, and none while events are written", async (t) => {
  // The period shortened from 15 s (a test-only option of the daemon: clients rely on 15 s).
  const PERIOD = 1200;
  // Tolerances for a loaded 2-core host: a line read late (this process reads what it serves)
  // makes the next gap look shorter; a late timer, longer. Both stay clear of a period.
  const EARLY = 150;
  const LATE = 700;
  const d = await startDaemon(t, testConfig(tempDir(t)), undefined, { eventStreams: { keepAliveMs: PERIOD } });
  await session(d, t, "ka");
  const follower = await open(d, "/v1/events?follow=1", t);
  const opened = performance.now();
  // Busy: an event (a PATCH: session.updated) every quarter of a period, for three periods.
  const busy = 12;
  for (let i = 0; i < busy; i++) {
    const res = await d.api("PATCH", "/v1/sessions/ka", { labels: { n: String(i) } });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    await delay(PERIOD / 4);
  }
  await follower.until((l) => l.filter((e) => e.event === "session.updated").length === busy, "the updates");
  // Quiet: three keep-alives after the last event.
  const trailingEmpty = (raw: readonly string[]): number => raw.length - 1 - raw.findLastIndex((l) => l !== "");
  await follower.untilRaw((raw) => trailingEmpty(raw) >= 3, "three keep-alives", 10 * PERIOD);

  const raw = follower.raw.slice();
  const arrived = follower.arrived.slice(0, raw.length);
  const gap = (i: number): number => arrived[i]! - (i === 0 ? opened : arrived[i - 1]!);
  // An empty line only after a period with nothing written: never between events a quarter period apart.
  for (let i = 0; i < raw.length; i++) {
    if (raw[i] !== "") continue;
    assert.ok(gap(i) >= PERIOD - EARLY, `keep-alive ${i} came ${Math.round(gap(i))} ms after the line before it`);
  }
  const updates = raw.flatMap((l, i) => (l !== "" && (JSON.parse(l) as Line).event === "session.updated" ? [i] : []));
  const busyGaps = updates.slice(1).map((i) => gap(i));
  assert.ok(
    busyGaps.filter((g) => g < PERIOD / 2).length >= busyGaps.length / 2,
    `the events came faster than the period: ${busyGaps.map(Math.round).join(", ")} ms apart`,
  );
  // Between two events less than a period apart, nothing but events.
  for (let k = 1; k < updates.length; k++) {
    const [a, b] = [updates[k - 1]!, updates[k]!];
    if (arrived[b]! - arrived[a]! >= PERIOD - EARLY) continue;
    assert.deepEqual(
      raw.slice(a, b + 1).filter((l) => l === ""),
      [],
      `a keep-alive between events ${Math.round(arrived[b]! - arrived[a]!)} ms apart`,
    );
  }
  // While quiet: one every period (checked every third of it: up to a third later).
  const last = raw.findLastIndex((l) => l !== "");
  const quiet = raw.slice(last + 1).map((_, k) => gap(last + 1 + k));
  assert.ok(quiet.length >= 3);
  for (const g of quiet) {
    assert.ok(
      g >= PERIOD - EARLY && g <= (PERIOD * 4) / 3 + LATE,
      `keep-alives ${quiet.map(Math.round).join(", ")} ms apart`,
    );
  }
});

test("GET /v1/events: a follower that stops reading is cut once its unsent bytes pass the limit, after whole lines; another follower gets every event", async (t) => {
  // Shortened from 4 MiB (a test-only option of the daemon).
  const MAX = 256 * 1024;
  const d = await startDaemon(t, testConfig(tempDir(t)), undefined, { eventStreams: { maxUnsentBytes: MAX } });
  const ids = await Promise.all(["big-1", "big-2", "big-3"].map((id) => session(d, t, id)));
  const since = d.daemon.store.lastEventSeq();
  const healthy = await open(d, `/v1/events?follow=1&since=${since}`, t);
  const stalled = await Stalled.open(d.socket, `/v1/events?follow=1&since=${since}`, t);
  let m = await scrape(d);
  assert.equal(m.get(`${STREAMS}{kind="follow"}`), 2);
  assert.equal(m.get(`${STREAMS}{kind="backlog"}`), 0);
  assert.equal(m.get(`${CUT}{reason="slow_reader"}`), 0);

  // Events of about 10 KiB each (PATCHes of 40 labels: session.updated), until the daemon cuts
  // the reader that stopped: its kernel buffers take a few hundred KiB first, then the daemon's.
  const cutLog = (): Record<string, unknown> | undefined =>
    d.lines
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .find((l) => typeof l.msg === "string" && l.msg.startsWith("an event stream's reader fell behind"));
  let patches = 0;
  while (cutLog() === undefined && patches < 1000) {
    const labels = Object.fromEntries(
      Array.from({ length: 40 }, (_, k) => [`k${k}`, `${patches}.${k}:`.padEnd(240, "x")]),
    );
    const res = await d.api("PATCH", `/v1/sessions/${ids[patches % ids.length]}`, { labels });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    patches++;
  }
  const log = cutLog();
  assert.ok(log !== undefined, `no cut after ${patches} events of 10 KiB`);
  assert.equal(log.level, "warn");
  assert.equal(log.uid, 0, "the reader's uid (root: the test)");
  const unsent = log.unsentBytes as number;
  const longest = Math.max(...healthy.raw.map((l) => Buffer.byteLength(l) + 1));
  assert.ok(
    unsent > MAX && unsent <= MAX + longest + 16,
    `cut at ${unsent} bytes unsent: over ${MAX}, by one line at most`,
  );
  m = await scrape(d);
  assert.equal(m.get(`${CUT}{reason="slow_reader"}`), 1);
  assert.equal(m.get(`${STREAMS}{kind="follow"}`), 1, "the cut stream is gone; the other follows");

  // Sessions end after the cut (real processes, reaped): the other follower gets every event.
  await Promise.all(ids.map((id) => d.api("DELETE", `/v1/sessions/${id}`)));
  const lines = await healthy.until((l) => ids.every((id) => has("reap.finished", id)(l)), "the reaps, live");
  rising(lines);
  assert.deepEqual(lines, table(d, "seq > ? AND seq <= ?", since, lines.at(-1)?.seq));
  assert.equal(lines.filter((l) => l.event === "session.updated").length, patches);

  // What the cut reader gets, reading at last: the lines the other got, in order, whole but
  // the last one perhaps (the kernel takes part of a write), and a broken response, never its end.
  const got = dechunk(await stalled.drain());
  assert.match(got.head, /^HTTP\/1\.1 200 /);
  assert.equal(got.complete, false, "cut, not ended");
  const all = healthy.raw.map((l) => l + "\n").join("");
  assert.ok(all.startsWith(got.body), "a prefix of the stream the other follower read");
  const whole = got.body.split("\n").slice(0, -1);
  assert.ok(whole.length >= 1 && whole.length < lines.length, `${whole.length} whole lines of ${lines.length}`);
  assert.deepEqual(
    whole.map((l) => JSON.parse(l) as Line),
    lines.slice(0, whole.length),
  );

  // A reader of the backlog only that stops reading is never cut: its backlog waits for it.
  const backlog = await Stalled.open(d.socket, `/v1/events?since=${since}`, t);
  await delay(200); // time enough to write it all, had it not waited
  m = await scrape(d);
  assert.equal(m.get(`${STREAMS}{kind="backlog"}`), 1);
  const read = dechunk(await backlog.drain());
  assert.equal(read.complete, true);
  assert.deepEqual(
    read.body
      .split("\n")
      .slice(0, -1)
      .map((l) => JSON.parse(l) as Line)
      .slice(0, lines.length),
    lines,
  );
  m = await scrape(d);
  assert.equal(m.get(`${STREAMS}{kind="backlog"}`), 0);
  assert.equal(m.get(`${CUT}{reason="slow_reader"}`), 1);
});

test("the daemon's stop ends a follower's stream at once, after its last events", async (t) => {
  const d = await startDaemon(t, testConfig(tempDir(t)));
  await session(d, t, "live-1");
  const follower = await open(d, "/v1/events?follow=1", t);
  const backlog = await open(d, "/v1/events?follow=1&since=0", t);
  await backlog.until((l) => has("session.registered", "live-1")(l), "the backlog");
  assert.equal((await scrape(d)).get(`${STREAMS}{kind="follow"}`), 2);
  await d.stop();
  assert.equal(await follower.done, "end");
  assert.equal(await backlog.done, "end");
  // Ended by the stop: counted (the API is closed: read from the daemon's registry).
  const after = await d.daemon.metrics.registry.getSingleMetricAsString(CUT);
  assert.match(after, new RegExp(`^${CUT}\\{reason="shutdown"\\} 2$`, "m"));
  assert.match(after, new RegExp(`^${CUT}\\{reason="slow_reader"\\} 0$`, "m"));
  assert.ok(follower.lines.some((l) => l.event === "daemon.stopping"));
  assert.ok(backlog.lines.some((l) => l.event === "daemon.stopping"));
});

test("client.events(): a follower resumes across a daemon restart with no event lost or repeated", async (t) => {
  const dir = tempDir(t);
  const config = testConfig(dir);
  const d1 = await startDaemon(t, config);
  await session(d1, t, "before");
  const retries: (RetryInfo & { since: number | null })[] = [];
  const got: AuditEventLine[] = [];
  const ac = new AbortController();
  t.after(() => ac.abort());
  const reading = (async () => {
    for await (const e of streamEvents(d1.socket, {
      follow: true,
      since: 0,
      signal: ac.signal,
      retries: 40,
      backoff: { maxMs: 500 },
      onRetry: (info) => retries.push(info),
    })) {
      got.push(e);
    }
  })();
  const seen = (event: string, id: string) => () => got.some((e) => e.event === event && e.sessionId === id);
  await until(seen("session.registered", "before"), 15_000, "the backlog");
  await d1.stop();
  const d2 = await startDaemon(t, config);
  await session(d2, t, "after");
  await d2.api("DELETE", "/v1/sessions/after");
  await until(seen("reap.finished", "after"), 30_000, "the new daemon's events");
  ac.abort();
  await reading;
  assert.ok(retries.length >= 1, "it reconnected");
  assert.ok(retries.every((r) => r.since !== null && r.since > 0));
  const lines = got as Line[];
  rising(lines);
  assert.deepEqual(lines, table(d2, "seq <= ?", lines.at(-1)?.seq));
  // Written once the old daemon's API had closed: read by the resumed stream.
  assert.ok(lines.some((l) => l.event === "daemon.stopped"));
  assert.ok(lines.filter((l) => l.event === "daemon.started").length >= 2, "both daemons' starts");
});
