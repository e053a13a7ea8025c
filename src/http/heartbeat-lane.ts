import { STATUS_CODES, type Server } from "node:http";
import type { Socket } from "node:net";
import { BUSY, IDLE, JSON_TYPE, PREFIX, SESSION_ID, SUFFIX, type FastHeartbeat } from "./fast-heartbeat.js";

/** The largest request head node:http accepts here (server.ts MAX_HEADER_BYTES): a longer one is its to refuse (431). */
const MAX_HEAD_BYTES = 16384;
/** Answers queued on a connection whose peer does not read them: past this, the lane stops reading until they drain. */
const MAX_QUEUED_BYTES = 64 * 1024;
const CRLFCRLF = Buffer.from("\r\n\r\n");
const REQUEST_LINE_START = `POST ${PREFIX}`;
const REQUEST_LINE_END = `${SUFFIX} HTTP/1.1`;
/** A header name (RFC 9110 token). */
const HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
/** Request headers that change nothing in a heartbeat's answer; any other header goes to node:http. */
const HARMLESS = new Set(["host", "user-agent", "accept", "accept-encoding"]);

/**
 * A header's value between `from` and `to`, without the blanks around it: visible ASCII, with
 * spaces and tabs inside; null for any other byte (control characters, obs-text), which is
 * node:http's to judge.
 */
function headerValue(head: string, from: number, to: number): string | null {
  let a = from;
  let b = to;
  while (a < b && (head.charCodeAt(a) === 0x20 || head.charCodeAt(a) === 0x09)) a++;
  while (b > a && (head.charCodeAt(b - 1) === 0x20 || head.charCodeAt(b - 1) === 0x09)) b--;
  for (let i = a; i < b; i++) {
    const c = head.charCodeAt(i);
    if ((c < 0x20 && c !== 0x09) || c > 0x7e) return null;
  }
  return head.slice(a, b);
}

export interface HeartbeatLaneOptions {
  /** Makes the heartbeat and its answer (the same call as the fast path's and the route's). */
  fast: Pick<FastHeartbeat, "respond">;
  /** The router's maxParamLength: a longer id is node:http's (then fastify's 400). */
  maxIdLength: number;
  /** api.header_timeout_ms: a new connection that sends nothing for this long is answered 408, as node:http does. */
  headerTimeoutMs: number;
  /** api.keep_alive_timeout_ms: an idle connection is closed after it, as node:http does. */
  keepAliveTimeoutMs: number;
  /** True once the server is closing: every connection is then node:http's (fastify answers 503). */
  closing: () => boolean;
  /** Answers 408 in the API's envelope and closes (server.ts answerClientError). */
  timedOut: (socket: Socket) => void;
  /** Told of each connection the lane answered on (connection limits: the most recently used). */
  used?: (socket: Socket) => void;
}

interface Heartbeat {
  id: string;
  activity: "busy" | "idle";
  /** Where the next request starts in the chunk. */
  next: number;
}

/**
 * The heartbeat lane: connections on the unix socket that carry nothing but plain heartbeats
 * are answered here, from the bytes, without node:http's per-request machinery (parser
 * callbacks, IncomingMessage, ServerResponse, header objects, stream bookkeeping), which costs
 * more than the heartbeat. This is how a gateway's heartbeat loop talks (one kept connection,
 * one request at a time), and how figure 1 measures the daemon.
 *
 * Every connection starts here. Each chunk read is parsed strictly: one or more complete
 * requests, each `POST /v1/sessions/{id}/heartbeat HTTP/1.1` with an id the route would take,
 * CRLF line ends, only harmless headers (Host, User-Agent, Accept, Accept-Encoding,
 * `Connection: keep-alive`), and the bodies the fast path serves: none (no Content-Type,
 * Content-Length absent or 0: busy) or `Content-Type: application/json` with exactly
 * `{"activity":"busy"}` or `{"activity":"idle"}`. Those are answered at once, in order, in one
 * write, with node:http's own status line and headers (Date, Connection: keep-alive,
 * Keep-Alive: timeout=N) and the fast path's status and JSON.
 *
 * At the first byte that is anything else (another route or method, another header, another
 * body, a request cut across two reads, a server closing), the connection is handed to
 * node:http for good, with that byte and everything after it, exactly as if node:http had
 * held it from the start: it parses, times out, limits and answers everything the lane left.
 *
 * The lane keeps node:http's timeouts: a new connection silent for api.header_timeout_ms is
 * answered 408 and closed, an idle one is closed after api.keep_alive_timeout_ms. Answers a
 * peer does not read pause the connection past 64 KiB, as node:http pauses its parser.
 */
export class HeartbeatLane {
  private readonly sockets = new Set<Socket>();
  /** `Date:` as node:http writes it (toUTCString), made once a second. */
  private date = "";
  private dateSecond = -1;
  private readonly keepAlive: string;

  constructor(private readonly opts: HeartbeatLaneOptions) {
    const seconds = Math.floor(opts.keepAliveTimeoutMs / 1000);
    // node:http announces a timeout only when it has one (keepAliveTimeout 0: none).
    this.keepAlive = opts.keepAliveTimeoutMs > 0 ? `Keep-Alive: timeout=${seconds}\r\n` : "";
  }

  /**
   * Puts the lane in front of the server's own connection handling: every connection the
   * server accepts starts in the lane, and is handed to node:http's listener when it must.
   * Attach before anything that wraps the 'connection' listeners (connection limits), so that
   * a connection turned away never reaches the lane.
   */
  attach(server: Server): void {
    const handlers = server.listeners("connection") as ((socket: Socket) => void)[];
    server.removeAllListeners("connection");
    const toHttp = (socket: Socket): void => {
      for (const handler of handlers) handler.call(server, socket);
    };
    server.on("connection", (socket: Socket) => this.take(socket, toHttp));
  }

  /** Closes every connection the lane holds (the server is closing; between two reads they are all idle). */
  closeAll(): void {
    for (const socket of this.sockets) socket.destroy();
    this.sockets.clear();
  }

  /** Connections held by the lane now. */
  get size(): number {
    return this.sockets.size;
  }

  private take(socket: Socket, toHttp: (socket: Socket) => void): void {
    if (this.opts.closing()) return toHttp(socket);
    this.sockets.add(socket);
    let answered = false;
    const onData = (chunk: Buffer): void => {
      let at = 0;
      let out = "";
      while (at < chunk.length && !this.opts.closing()) {
        const hb = this.parse(chunk, at);
        if (hb === null) break;
        out += this.answer(hb, socket);
        at = hb.next;
      }
      if (out !== "") {
        answered = true;
        socket.write(out);
        this.opts.used?.(socket);
        socket.setTimeout(this.opts.keepAliveTimeoutMs);
      }
      if (at < chunk.length) {
        handOver(chunk.subarray(at));
        return;
      }
      if (socket.writableLength > MAX_QUEUED_BYTES) {
        socket.pause();
        socket.once("drain", () => socket.resume());
      }
    };
    const onTimeout = (): void => {
      // Before any request: node:http's headersTimeout (408); after one: its keep-alive timeout.
      if (answered) socket.destroy();
      else this.opts.timedOut(socket);
    };
    const onError = (): void => void socket.destroy();
    const onEnd = (): void => void socket.end();
    const onClose = (): void => void this.sockets.delete(socket);
    const handOver = (rest: Buffer): void => {
      socket.off("data", onData);
      socket.off("timeout", onTimeout);
      socket.off("error", onError);
      socket.off("end", onEnd);
      socket.off("close", onClose);
      socket.setTimeout(0);
      this.sockets.delete(socket);
      toHttp(socket);
      // node:http's own 'data' listener parses what the lane read and left, before any later byte.
      if (rest.length > 0) socket.emit("data", rest);
    };
    socket.on("data", onData);
    socket.on("timeout", onTimeout);
    socket.on("error", onError);
    socket.on("end", onEnd);
    socket.on("close", onClose);
    socket.setTimeout(this.opts.headerTimeoutMs);
  }

  /** The plain heartbeat starting at `at`, complete within the chunk; null for anything else. */
  private parse(chunk: Buffer, at: number): Heartbeat | null {
    const end = chunk.indexOf(CRLFCRLF, at);
    if (end < 0 || end - at > MAX_HEAD_BYTES) return null;
    const head = chunk.toString("latin1", at, end);
    const lineEnd = head.indexOf("\r\n");
    const line = lineEnd < 0 ? head : head.slice(0, lineEnd);
    if (!line.startsWith(REQUEST_LINE_START) || !line.endsWith(REQUEST_LINE_END)) return null;
    const id = line.slice(REQUEST_LINE_START.length, line.length - REQUEST_LINE_END.length);
    // The pattern excludes '/', '?', '%', '#', ';' and blanks: one path segment, taken as is by the router.
    if (id.length > this.opts.maxIdLength || !SESSION_ID.test(id)) return null;
    let type: string | undefined;
    let length: string | undefined;
    let pos = lineEnd < 0 ? head.length : lineEnd + 2;
    while (pos < head.length) {
      let stop = head.indexOf("\r\n", pos);
      if (stop < 0) stop = head.length;
      const colon = head.indexOf(":", pos);
      if (colon <= pos || colon > stop) return null;
      const name = head.slice(pos, colon);
      if (!HEADER_NAME.test(name)) return null;
      const value = headerValue(head, colon + 1, stop);
      if (value === null) return null;
      const key = name.toLowerCase();
      if (key === "content-type") {
        if (type !== undefined) return null;
        type = value;
      } else if (key === "content-length") {
        if (length !== undefined) return null;
        length = value;
      } else if (key === "connection") {
        if (value.toLowerCase() !== "keep-alive") return null;
      } else if (!HARMLESS.has(key)) {
        return null;
      }
      pos = stop + 2;
    }
    const bodyAt = end + 4;
    if (type === undefined) {
      // fastify's rule for a body-less request: Content-Length absent or 0; the route takes it as {} (busy).
      if (length !== undefined && length !== "0") return null;
      return { id, activity: "busy", next: bodyAt };
    }
    if (type !== "application/json" || length !== String(BUSY.length) || bodyAt + BUSY.length > chunk.length) {
      return null;
    }
    const body = chunk.subarray(bodyAt, bodyAt + BUSY.length);
    const activity = body.equals(BUSY) ? "busy" : body.equals(IDLE) ? "idle" : null;
    return activity === null ? null : { id, activity, next: bodyAt + BUSY.length };
  }

  /** The answer's bytes, as node:http writes the fast path's `writeHead` and `end`. */
  private answer(hb: Heartbeat, socket: Socket): string {
    const { status, body } = this.opts.fast.respond(hb.id, hb.activity, socket);
    const second = Math.floor(Date.now() / 1000);
    if (second !== this.dateSecond) {
      this.dateSecond = second;
      this.date = new Date(second * 1000).toUTCString();
    }
    return (
      `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? ""}\r\ncontent-type: ${JSON_TYPE}\r\n` +
      `content-length: ${Buffer.byteLength(body)}\r\nDate: ${this.date}\r\nConnection: keep-alive\r\n${this.keepAlive}\r\n${body}`
    );
  }
}
