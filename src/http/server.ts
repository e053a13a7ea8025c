import {
  STATUS_CODES,
  createServer,
  type IncomingMessage,
  type Server,
  type ServerOptions,
  type ServerResponse,
} from "node:http";
import type { Duplex } from "node:stream";
import type { Socket } from "node:net";
import { Ajv } from "ajv";
import Fastify, {
  LogController,
  type FastifyBaseLogger,
  type FastifyReply,
  type FastifyInstance,
  type onResponseHookHandler,
} from "fastify";
import type { Logger } from "pino";
import type { AuditTrail } from "../audit/audit.js";
import type { Callers } from "../auth/caller.js";
import { tcpRefusal } from "../auth/tcp.js";
import type { ApiConfig } from "../config/load.js";
import type { Metrics } from "../metrics/metrics.js";
import type { OrphanSweep } from "../orphans/sweep.js";
import type { Sessions } from "../sessions/sessions.js";
import type { Store } from "../store/store.js";
import { errorBody as send, toApiError } from "./api-error.js";
import { acceptBacklog, type AcceptPending } from "./accept-backlog.js";
import type { ConnectionLimits } from "./connection-limits.js";
import { eventStreamRoutes, type EventStreamLimits } from "./events-stream.js";
import { FastHeartbeat } from "./fast-heartbeat.js";
import { HeartbeatLane } from "./heartbeat-lane.js";
import { collectRoutes, openApiDocument } from "./openapi.js";
import { eventJson, expiringJson, orphanJson, sessionJson } from "./present.js";
import {
  daemonResponse,
  emptyBody,
  eventsResponse,
  expiringQuery,
  expiringResponse,
  healthResponse,
  extendBody,
  extendResponse,
  heartbeatBody,
  heartbeatResponse,
  listQuery,
  noQuery,
  orphansResponse,
  readyResponse,
  registerBody,
  sessionIdParams,
  sessionListResponse,
  sessionResponse,
  textResponse,
  updateBody,
} from "./schemas.js";
import type { ExpiringQuery, ListQuery, RegisterBody, UpdateBody } from "../model/requests.js";

export interface DaemonInfo {
  state: "running" | "shutting_down";
  version: string;
  startedAt: string;
  ready: boolean;
  /** The SQLite database's path (store.path). */
  database: string;
  lineage: { available: boolean; why?: string; events: number; lost: number; processes: number };
}

export interface ServerDeps {
  sessions: Sessions;
  store: Store;
  /** The audit trail's emitter: GET /v1/events follows it (src/http/events-stream.ts). */
  audit: Pick<AuditTrail, "events">;
  metrics: Metrics;
  orphans: Pick<OrphanSweep, "current">;
  log: Logger;
  api: Pick<
    ApiConfig,
    "bodyLimitBytes" | "headerTimeoutMs" | "requestTimeoutMs" | "keepAliveTimeoutMs" | "maxConnections"
  >;
  /** Who is asking, per connection (src/auth/caller.ts). */
  callers: Callers;
  /**
   * Per-uid connection limits at accept (src/http/connection-limits.ts); without them, Node's
   * own cap (api.max_connections, for every peer alike) applies.
   */
  connectionLimits?: ConnectionLimits;
  /** The rest of the listen backlog each turn (src/http/accept-backlog.ts); absent: libuv's one a turn. */
  acceptPending?: AcceptPending | undefined;
  info: () => DaemonInfo;
  /** GET /v1/events' keep-alive period and unsent-bytes cut, shortened by tests only (DaemonOptions.eventStreams). */
  eventStreams?: Partial<EventStreamLimits> | undefined;
}

/** The router's cap on a path parameter's length: above the longest session id (128). */
const MAX_PARAM_LENGTH = 256;

/** The largest request head (request line and headers) accepted: 431 above it. */
const MAX_HEADER_BYTES = 16384;

/**
 * Node's HTTP server options shared by the unix socket and the loopback TCP server: a slow or
 * silent client is cut off (headers within headerTimeoutMs, the whole request within
 * requestTimeoutMs), and the check runs often enough for those limits to mean what they say
 * (Node's default checks every 30 s).
 */
function serverOptions(api: ServerDeps["api"]): ServerOptions {
  return {
    maxHeaderSize: MAX_HEADER_BYTES,
    headersTimeout: api.headerTimeoutMs,
    requestTimeout: api.requestTimeoutMs,
    keepAliveTimeout: api.keepAliveTimeoutMs,
    connectionsCheckingInterval: Math.max(50, Math.min(1000, Math.floor(api.headerTimeoutMs / 4))),
  };
}

// Bodies are validated strictly (no coercion, no silent removal of unknown keys: fastify's
// default ajv removes them); query strings and path params are strings on the wire, so
// they are coerced.
const bodyAjv = new Ajv({ allErrors: false, coerceTypes: false, removeAdditional: false, useDefaults: false });
const queryAjv = new Ajv({ allErrors: false, coerceTypes: false, removeAdditional: false, useDefaults: true });

/** A plain decimal integer: no sign games, hex, exponent, blanks, fraction or leading zeros. */
const DECIMAL = /^(0|-?[1-9][0-9]{0,14})$/;

/**
 * Query strings and path params are strings on the wire. ajv's coerceTypes would take "0x10",
 * " 12 ", "1e3" or "" for numbers (it coerces whatever `+x` accepts); here only a plain decimal
 * string becomes an integer, and anything else stays a string, which the schema then refuses.
 */
function strictIntegers(schema: { properties?: Record<string, { type?: unknown }> }, data: unknown): void {
  if (data === null || typeof data !== "object") return;
  const record = data as Record<string, unknown>;
  for (const [key, prop] of Object.entries(schema.properties ?? {})) {
    const v = record[key];
    if (prop.type === "integer" && typeof v === "string" && DECIMAL.test(v)) record[key] = Number(v);
  }
}

/**
 * Errors the HTTP parser raises before any route (malformed request line, bad header bytes,
 * oversized head, a slow client): answered in the API's envelope, then the connection is
 * closed, as fastify's and Node's defaults do, but with a stable code.
 */
export function answerClientError(err: NodeJS.ErrnoException, socket: Duplex): void {
  if (err.code === "ECONNRESET" || socket.destroyed) return;
  const [status, code, message] =
    err.code === "ERR_HTTP_REQUEST_TIMEOUT"
      ? ([408, "SR_REQUEST_TIMEOUT", "the request did not arrive in time"] as const)
      : err.code === "HPE_HEADER_OVERFLOW"
        ? ([431, "SR_HEADERS_TOO_LARGE", "the request line and headers exceed 16 KiB"] as const)
        : ([400, "SR_BAD_REQUEST", "malformed HTTP request"] as const);
  if (socket.writable) {
    const body = JSON.stringify(send(code, message));
    socket.write(
      `HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\nContent-Length: ${Buffer.byteLength(body)}\r\n` +
        `Content-Type: application/json; charset=utf-8\r\nConnection: close\r\n\r\n${body}`,
    );
  }
  socket.destroy();
}

/** POST routes whose body is optional: a bodyless request validates as {}. */
function acceptMissingBody(req: { body: unknown }, _reply: unknown, done: () => void): void {
  req.body ??= {};
  done();
}

/** Each app's heartbeat fast path: loopback TCP serves through it too. */
const fastPaths = new WeakMap<FastifyInstance, FastHeartbeat>();

/** Builds the API without listening (fastify's testing guide): only main.ts listens. */
export function buildServer(deps: ServerDeps): FastifyInstance {
  const { app, fast, routes } = createApp(deps);
  sessionWriteRoutes(app, deps, fast);
  sessionReadRoutes(app, deps);
  eventStreamRoutes(app, deps);
  daemonRoutes(app, deps);
  let openApi: string | undefined;
  app.get(
    "/openapi.json",
    {
      schema: {
        summary: "This document",
        response: { 200: { type: "object", description: "An OpenAPI 3.1 document" } },
      },
    },
    (_req, reply) => {
      // Built once, on first request: every route is registered by then.
      openApi ??= JSON.stringify(openApiDocument(routes, deps.info().version));
      return reply.type("application/json; charset=utf-8").send(openApi);
    },
  );

  return app;
}

/**
 * The fastify instance every route is added to: its server (with the heartbeat fast path in
 * front of the router and the connection limits at accept), validation, serialization, the
 * per-route request counter and the error envelopes. Returns the fast path (the heartbeat
 * route replays what it read) and the route list /openapi.json is made from.
 */
function createApp(deps: ServerDeps): {
  app: FastifyInstance;
  fast: FastHeartbeat;
  routes: ReturnType<typeof collectRoutes>;
} {
  const { sessions, metrics } = deps;
  // Typed as fastify's logger, so the instance is the plain FastifyInstance type.
  const loggerInstance: FastifyBaseLogger = deps.log;
  // The heartbeat fast path sits in front of fastify's router (fast-heartbeat.ts).
  let closing = false;
  const fast = new FastHeartbeat({
    sessions,
    metrics,
    callers: deps.callers,
    log: deps.log,
    maxIdLength: MAX_PARAM_LENGTH,
    closing: () => closing,
  });
  // Connections that carry only plain heartbeats are answered before node:http parses them
  // (heartbeat-lane.ts); the rest are node:http's, then the fast path's or fastify's.
  const limits = deps.connectionLimits;
  const lane = new HeartbeatLane({
    fast,
    maxIdLength: MAX_PARAM_LENGTH,
    headerTimeoutMs: deps.api.headerTimeoutMs,
    keepAliveTimeoutMs: deps.api.keepAliveTimeoutMs,
    closing: () => closing,
    timedOut: (socket) =>
      answerClientError(Object.assign(new Error("timeout"), { code: "ERR_HTTP_REQUEST_TIMEOUT" }), socket),
    ...(limits === undefined ? {} : { used: (socket: Socket) => limits.used(socket) }),
  });
  const app = Fastify({
    // The server fastify would make (the same options and timeouts), with the heartbeat lane
    // at its connections and the fast path in front of its request handler.
    serverFactory: (handler) => {
      const server = createServer(serverOptions(deps.api), (req, res) => fast.serve(req, res, handler));
      server.requestTimeout = deps.api.requestTimeoutMs;
      server.keepAliveTimeout = deps.api.keepAliveTimeoutMs;
      lane.attach(server);
      if (limits === undefined) server.maxConnections = deps.api.maxConnections;
      else limits.attach(server);
      acceptBacklog(server, deps.acceptPending, deps.log); // outermost: what it accepts is screened
      return server;
    },
    // Session ids have up to 128 characters: find-my-way's default cap of 100 would answer 414
    // for a session the API itself accepted. The fast path leaves longer ids to the router.
    routerOptions: { maxParamLength: MAX_PARAM_LENGTH },
    loggerInstance,
    // No line per request: heartbeats would cost half the throughput (measured: docs/benchmarks.md).
    logController: new LogController({ disableRequestLogging: true }),
    // req.log is the daemon's logger itself: fastify's default makes a pino child per request
    // (bindings, redaction setup), a few percent of a heartbeat, for lines never written
    // (request logging is off and routes log through deps.log).
    childLoggerFactory: (logger) => logger,
    bodyLimit: deps.api.bodyLimitBytes,
    return503OnClosing: true,
    // A malformed percent-encoding or an over-long path parameter, before any route.
    frameworkErrors: (err, _req, reply) => {
      void (reply as FastifyReply).status(400).send(send("SR_BAD_REQUEST", err.message));
    },
    clientErrorHandler: answerClientError,
  });
  fastPaths.set(app, fast);
  // fastify's closing flag is set in the same step as its preClose hooks run: from then on
  // every request is fastify's (503 while closing, as return503OnClosing says).
  app.addHook("preClose", (done) => {
    closing = true;
    lane.closeAll();
    done();
  });

  // JSON only: without this, fastify would parse text/plain bodies and answer 400, not 415.
  app.removeContentTypeParser("text/plain");
  app.setValidatorCompiler(({ schema, httpPart }) => {
    if (httpPart === "body") return bodyAjv.compile(schema);
    const validate = queryAjv.compile(schema);
    return (data: unknown) => {
      strictIntegers(schema as Parameters<typeof strictIntegers>[0], data);
      const ok = validate(data);
      return ok
        ? { value: data }
        : { error: Object.assign(new Error(queryAjv.errorsText(validate.errors)), { validation: validate.errors }) };
    };
  });
  // Response schemas are documentation (the OpenAPI document): answers stay plain
  // JSON.stringify, as without them. fastify's default would compile them with
  // fast-json-stringify, which silently drops every field a schema does not list.
  app.setSerializerCompiler(() => (data) => JSON.stringify(data));
  // Before the first route: every route is collected for /openapi.json as it is registered.
  const routes = collectRoutes(app, (pre) => [pre].flat().includes(acceptMissingBody));
  // Route patterns, never raw URLs (ids would make one series per session). Each route's
  // pattern is bound when the route is added: reading req.routeOptions per request builds a
  // dozen-field object each time (a few percent of a heartbeat). Unmatched: the 404 handler.
  app.addHook("onRoute", (route) => {
    const pattern = route.url;
    const count: onResponseHookHandler = (req, reply, done) => {
      metrics.httpRequest(req.method, pattern, reply.statusCode);
      done();
    };
    route.onResponse = [...[route.onResponse ?? []].flat(), count];
  });
  app.setErrorHandler((err, _req, reply) => {
    const { status, body } = toApiError(err, deps.log);
    void reply.status(status).send(body);
  });
  app.setNotFoundHandler((req, reply) => {
    metrics.httpRequest(req.method, "unmatched", 404);
    void reply.status(404).send(send("SR_ROUTE_NOT_FOUND", `no route ${req.method} ${req.url.split("?")[0]}`));
  });
  return { app, fast, routes };
}

/** The routes that change a session: register, heartbeat, update, close, force-reap. */
function sessionWriteRoutes(app: FastifyInstance, deps: ServerDeps, fast: FastHeartbeat): void {
  const { sessions } = deps;
  const callerOf = (req: { raw: IncomingMessage }) => deps.callers.of(req.raw.socket);
  app.post<{ Body: RegisterBody }>(
    "/v1/sessions",
    {
      schema: {
        summary: "Register an engine session",
        body: registerBody,
        querystring: noQuery,
        response: { 201: sessionResponse },
      },
    },
    async (req, reply) => {
      const { warnings, ...session } = await sessions.register(req.body, callerOf(req));
      reply.status(201);
      return { ...sessionJson(session), ...(warnings.length > 0 ? { warnings } : {}) };
    },
  );

  app.post<{ Params: { id: string }; Body: { activity?: "busy" | "idle" } }>(
    "/v1/sessions/:id/heartbeat",
    {
      schema: {
        summary: "Heartbeat (busy, the default, also moves activity); 409 once fenced",
        params: sessionIdParams,
        body: heartbeatBody,
        querystring: noQuery,
        response: { 200: heartbeatResponse },
      },
      // A body the fast path read and handed over is parsed from its bytes.
      preParsing: (req, _reply, payload, done) => done(null, fast.replayed(req.raw, payload)),
      preValidation: acceptMissingBody,
    },
    (req) => sessions.heartbeat(req.params.id, req.body.activity ?? "busy", callerOf(req)),
  );

  app.patch<{ Params: { id: string }; Body: UpdateBody }>(
    "/v1/sessions/:id",
    {
      schema: {
        summary: "Add ports, paths or labels to a live session (ports held by its engine now)",
        params: sessionIdParams,
        body: updateBody,
        querystring: noQuery,
        response: { 200: sessionResponse },
      },
    },
    async (req) => sessionJson(await sessions.update(req.params.id, req.body, callerOf(req))),
  );

  app.post<{ Params: { id: string }; Body: { sec: number } }>(
    "/v1/sessions/:id/extend",
    {
      schema: {
        summary:
          "Keep a live session at least sec seconds from now however idle (up to the profile's max_extend_sec, never past its max lifetime)",
        params: sessionIdParams,
        body: extendBody,
        querystring: noQuery,
        response: { 200: extendResponse },
      },
    },
    (req) => sessions.extend(req.params.id, req.body.sec, callerOf(req)),
  );

  app.delete<{ Params: { id: string } }>(
    "/v1/sessions/:id",
    {
      schema: {
        summary: "Client close: fence now, full cleanup with reason closed",
        params: sessionIdParams,
        querystring: noQuery,
        response: { 202: sessionResponse },
      },
    },
    async (req, reply) => {
      const session = await sessions.end(req.params.id, "closed", callerOf(req));
      reply.status(202);
      return sessionJson(session);
    },
  );

  app.post<{ Params: { id: string } }>(
    "/v1/sessions/:id/reap",
    {
      schema: {
        summary: "Operator force-reap: fence now, full cleanup with reason forced",
        params: sessionIdParams,
        body: emptyBody,
        querystring: noQuery,
        response: { 202: sessionResponse },
      },
      preValidation: acceptMissingBody,
    },
    async (req, reply) => {
      const session = await sessions.end(req.params.id, "forced", callerOf(req));
      reply.status(202);
      return sessionJson(session);
    },
  );
}

/** The routes that read sessions: list, one, its events, and /v1/expiring. */
function sessionReadRoutes(app: FastifyInstance, deps: ServerDeps): void {
  const { sessions, store } = deps;
  app.get<{ Querystring: ListQuery }>(
    "/v1/sessions",
    {
      schema: {
        summary: "List sessions, oldest first, a page at a time",
        querystring: listQuery,
        response: { 200: sessionListResponse },
      },
    },
    (req) => {
      const page = sessions.list(req.query);
      return { sessions: page.sessions.map((s) => sessionJson(s)), next: page.next };
    },
  );

  app.get<{ Params: { id: string } }>(
    "/v1/sessions/:id",
    {
      schema: {
        summary: "One session, with its reap steps and its engine's usage",
        params: sessionIdParams,
        querystring: noQuery,
        response: { 200: sessionResponse },
      },
    },
    async (req) => {
      const v = await sessions.view(req.params.id);
      return sessionJson(v.session, v.steps, v.usage);
    },
  );

  app.get<{ Params: { id: string } }>(
    "/v1/sessions/:id/events",
    {
      schema: {
        summary: "The session's audit events, oldest first",
        params: sessionIdParams,
        querystring: noQuery,
        response: { 200: eventsResponse },
      },
    },
    (req) => {
      sessions.get(req.params.id); // 404 for an unknown session
      return { events: store.events(req.params.id).map(eventJson) };
    },
  );

  app.get<{ Querystring: ExpiringQuery }>(
    "/v1/expiring",
    {
      schema: {
        summary: "Live sessions whose deadline falls within withinSec seconds, soonest first",
        querystring: expiringQuery,
        response: { 200: expiringResponse },
      },
    },
    (req) => ({ sessions: sessions.expiring(req.query.withinSec).map(expiringJson) }),
  );
}

/** The daemon's own routes: orphans, state, health, readiness, metrics. */
function daemonRoutes(app: FastifyInstance, deps: ServerDeps): void {
  const { store, metrics } = deps;
  app.get(
    "/v1/orphans",
    {
      schema: {
        summary: "The orphan sweep's current findings, and what reap mode does or would do with each",
        querystring: noQuery,
        response: { 200: orphansResponse },
      },
    },
    () => {
      const { enabled, sweptAt, findings } = deps.orphans.current();
      return {
        enabled,
        sweptAt: sweptAt === null ? null : new Date(sweptAt).toISOString(),
        findings: findings.map(orphanJson),
      };
    },
  );

  app.get(
    "/v1/daemon",
    {
      schema: {
        summary: "The daemon's state, version and session counts",
        querystring: noQuery,
        response: { 200: daemonResponse },
      },
    },
    () => {
      const { ready: _ready, ...info } = deps.info();
      return { ...info, counts: store.counts() };
    },
  );

  app.get("/healthz", { schema: { summary: "Liveness", response: { 200: healthResponse } } }, () => ({
    status: "ok",
  }));
  app.get(
    "/readyz",
    {
      schema: {
        summary: "Readiness: 503 while shutting down",
        response: { 200: readyResponse, 503: { ...readyResponse, description: "Shutting down" } },
      },
    },
    (_req, reply) => {
      const info = deps.info();
      return reply.status(info.ready ? 200 : 503).send({ ready: info.ready, state: info.state });
    },
  );

  app.get(
    "/metrics",
    {
      schema: {
        summary: "Prometheus metrics, text exposition format",
        response: { 200: textResponse("text/plain", "The metrics (text/plain; version=0.0.4)") },
      },
    },
    async (_req, reply) => {
      const { contentType, body } = await metrics.exposition();
      return reply.type(contentType).send(body);
    },
  );
}

/**
 * A second HTTP server for loopback TCP, serving the app's routes through `app.routing` (behind
 * the same heartbeat fast path as the unix socket) once each request has passed the Origin,
 * Host and token checks (src/auth/tcp.ts), in that order, before anything is parsed. Not listening: listen.ts does that.
 */
export function buildTcpServer(
  app: FastifyInstance,
  deps: Pick<ServerDeps, "api" | "callers" | "metrics" | "acceptPending" | "log">,
  token: Buffer,
): Server {
  const route = (req: IncomingMessage, res: ServerResponse): void => app.routing(req, res);
  const fast = fastPaths.get(app);
  const server = createServer(serverOptions(deps.api), (req: IncomingMessage, res: ServerResponse) => {
    const refusal = tcpRefusal(req.headers, token);
    if (refusal === null) {
      if (fast === undefined) route(req, res);
      else fast.serve(req, res, route);
      return;
    }
    deps.metrics.httpRequest(req.method ?? "", "refused", refusal.status);
    const body = JSON.stringify(send(refusal.code, refusal.message));
    res.writeHead(refusal.status, {
      "content-type": "application/json; charset=utf-8",
      "content-length": Buffer.byteLength(body),
      ...(refusal.status === 401 ? { "www-authenticate": 'Bearer realm="session-reaper"' } : {}),
    });
    res.end(body);
  });
  server.on("clientError", answerClientError);
  server.requestTimeout = deps.api.requestTimeoutMs;
  server.keepAliveTimeout = deps.api.keepAliveTimeoutMs;
  server.maxConnections = deps.api.maxConnections;
  // Marked before any byte is parsed: a TCP peer is a token holder, never a unix peer.
  server.on("connection", (socket: Socket) => deps.callers.markTcp(socket));
  acceptBacklog(server, deps.acceptPending, deps.log);
  return server;
}
