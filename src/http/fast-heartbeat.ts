import type { IncomingMessage, ServerResponse } from "node:http";
import type { Socket } from "node:net";
import { PassThrough } from "node:stream";
import type { Logger } from "pino";
import type { Callers } from "../auth/caller.js";
import type { HttpCount, Metrics } from "../metrics/metrics.js";
import type { Sessions } from "../sessions/sessions.js";
import { toApiError } from "./api-error.js";
import { SESSION_ID_PATTERN } from "./schemas.js";

/** The heartbeat route's pattern, as fastify registers it (and as the request counter names it). */
export const HEARTBEAT_ROUTE = "/v1/sessions/:id/heartbeat";

export const PREFIX = "/v1/sessions/";
export const SUFFIX = "/heartbeat";
export const SESSION_ID = new RegExp(SESSION_ID_PATTERN);
/** The two bodies the fast path answers itself; both are 19 bytes long. */
export const BUSY = Buffer.from('{"activity":"busy"}');
export const IDLE = Buffer.from('{"activity":"idle"}');
const BODY_LENGTH = "19";
export const JSON_TYPE = "application/json; charset=utf-8";

export interface FastHeartbeatDeps {
  sessions: Pick<Sessions, "heartbeat">;
  metrics: Pick<Metrics, "httpCount">;
  callers: Callers;
  log: Logger;
  /** The router's maxParamLength: a longer id is left to fastify (400 SR_BAD_REQUEST via frameworkErrors). */
  maxIdLength: number;
  /** True once fastify is closing: every request is then fastify's (503 with return503OnClosing). */
  closing: () => boolean;
}

type Handler = (req: IncomingMessage, res: ServerResponse) => void;

/**
 * `JSON.stringify` of the heartbeat's answer, field for field and in the same order, written
 * out (a tenth of the cost): nothing in it needs escaping, since the id matched
 * SESSION_ID_PATTERN (ASCII letters, digits and `._:@-`), the deadline is an ISO time and
 * `state`, `expiresBy` and a warning's `reason` are fixed words. test/http/fast-heartbeat.test.ts compares it with
 * fastify's answer to the same heartbeat.
 */
function answerJson(a: ReturnType<Sessions["heartbeat"]>): string {
  const w = a.warning;
  const warning = w === null ? "null" : `{"reason":"${w.reason}","deadline":"${w.deadline}","at":"${w.at}"}`;
  return `{"id":"${a.id}","state":"${a.state}","deadline":"${a.deadline}","expiresBy":"${a.expiresBy}","warning":${warning}}`;
}

/**
 * `POST /v1/sessions/{id}/heartbeat` in front of fastify's router: the daemon's hottest
 * request, served without fastify's per-request machinery (request and reply objects, hook
 * runners, content-type parser, validators), which costs more than the heartbeat itself.
 *
 * Only the plain common case is served here, and it is decided from the request head alone:
 * POST, that exact path with a session id fastify would route (the id pattern, no query
 * string, no percent-encoding, no longer than the router's maxParamLength), no
 * Transfer-Encoding or Expect, and either no body at all (no Content-Type, Content-Length
 * absent or 0) or `Content-Type: application/json` with `Content-Length: 19`. Everything else
 * goes to fastify untouched, before a byte of its body is read.
 *
 * A 19-byte body is read; if it is exactly `{"activity":"busy"}` or `{"activity":"idle"}` it
 * is served here, otherwise the request goes to fastify with those bytes replayed (the
 * route's preParsing hook, `replayed`), so fastify parses and validates it and answers as
 * it always does (SR_INVALID_JSON, SR_BAD_REQUEST, …).
 *
 * Served here, a heartbeat makes the same call as the route (`sessions.heartbeat` with the
 * caller from the same per-connection `Callers` cache, so SR_CALLER_UNKNOWN and
 * SR_NOT_SESSION_OWNER apply), answers the same status, headers and JSON (errors through
 * the same `toApiError`), and is counted under the same route pattern.
 */
export class FastHeartbeat {
  /** Bodies read here that were not one of the two forms: fastify's route replays them. */
  private readonly bodies = new WeakMap<IncomingMessage, Buffer>();

  /** This route's request counter, found once. */
  private readonly counted: HttpCount;

  constructor(private readonly deps: FastHeartbeatDeps) {
    this.counted = deps.metrics.httpCount("POST", HEARTBEAT_ROUTE);
  }

  /** Serves `req` if it is the plain heartbeat; hands it to `next` (fastify's router) otherwise. */
  serve(req: IncomingMessage, res: ServerResponse, next: Handler): void {
    const id = this.idOf(req);
    if (id === null) return next(req, res);
    const headers = req.headers;
    const type = headers["content-type"];
    const length = headers["content-length"];
    if (type === undefined) {
      // fastify's rule for a body-less request: no Content-Type, no Transfer-Encoding, and
      // Content-Length absent or 0. The route then takes it as {} (activity busy).
      if (length !== undefined && length !== "0") return next(req, res);
      return this.answer(req, res, id, "busy");
    }
    if (type !== "application/json" || length !== BODY_LENGTH) return next(req, res);
    const chunks: Buffer[] = [];
    req.on("data", (chunk: Buffer) => void chunks.push(chunk));
    // Node checks Content-Length: 'end' comes after exactly 19 bytes, or never (the
    // connection is then destroyed, as for fastify's own body reader).
    req.on("end", () => {
      const body = chunks.length === 1 ? (chunks[0] as Buffer) : Buffer.concat(chunks);
      if (body.equals(BUSY)) this.answer(req, res, id, "busy");
      else if (body.equals(IDLE)) this.answer(req, res, id, "idle");
      else {
        this.bodies.set(req, Buffer.from(body)); // a copy: never a view of the socket's buffer
        next(req, res);
      }
    });
  }

  /**
   * The heartbeat route's preParsing hook: the body this class read before handing the
   * request over, as a fresh stream for fastify's body parser; otherwise the request itself.
   */
  replayed<T>(req: IncomingMessage, payload: T): T | PassThrough {
    const body = this.bodies.get(req);
    if (body === undefined) return payload;
    this.bodies.delete(req);
    const stream = new PassThrough();
    stream.end(body);
    return stream;
  }

  /** The session id if the request head is the plain heartbeat, else null. */
  private idOf(req: IncomingMessage): string | null {
    if (req.method !== "POST" || this.deps.closing()) return null;
    const url = req.url;
    if (url === undefined || !url.startsWith(PREFIX) || !url.endsWith(SUFFIX)) return null;
    const id = url.slice(PREFIX.length, url.length - SUFFIX.length);
    // The pattern excludes '/', '?', '%', '#' and ';': one path segment, taken as is by the router.
    if (id.length > this.deps.maxIdLength || !SESSION_ID.test(id)) return null;
    const headers = req.headers;
    if (headers["transfer-encoding"] !== undefined || headers.expect !== undefined) return null;
    return id;
  }

  private answer(req: IncomingMessage, res: ServerResponse, id: string, activity: "busy" | "idle"): void {
    const { status, body } = this.respond(id, activity, req.socket);
    res.writeHead(status, { "content-type": JSON_TYPE, "content-length": Buffer.byteLength(body) });
    res.end(body);
  }

  /**
   * The heartbeat itself, as the route makes it: the caller from the connection's per-socket
   * cache (SR_CALLER_UNKNOWN, SR_NOT_SESSION_OWNER), the answer's status and JSON (errors
   * through the same `toApiError`), counted under the route's pattern. Shared by the fast
   * path and the heartbeat lane (heartbeat-lane.ts).
   */
  respond(id: string, activity: "busy" | "idle", socket: Socket): { status: number; body: string } {
    const { sessions, callers, log } = this.deps;
    let status = 200;
    let body: string;
    try {
      body = answerJson(sessions.heartbeat(id, activity, callers.of(socket)));
    } catch (err) {
      const e = toApiError(err, log);
      status = e.status;
      body = JSON.stringify(e.body);
    }
    this.counted.add(status);
    return { status, body };
  }
}
