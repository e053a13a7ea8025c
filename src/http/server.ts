import { Ajv } from "ajv";
import Fastify, {
  LogController,
  type FastifyBaseLogger,
  type FastifyError,
  type FastifyInstance,
  type onResponseHookHandler,
} from "fastify";
import type { Logger } from "pino";
import { ReaperError, type ErrorCode } from "../errors.js";
import type { Metrics } from "../metrics/metrics.js";
import type { Sessions } from "../sessions/sessions.js";
import type { Store } from "../store/store.js";
import { collectRoutes, openApiDocument } from "./openapi.js";
import { eventJson, expiringJson, sessionJson } from "./present.js";
import {
  daemonResponse,
  emptyBody,
  eventsResponse,
  expiringQuery,
  expiringResponse,
  healthResponse,
  heartbeatBody,
  heartbeatResponse,
  listQuery,
  noQuery,
  readyResponse,
  registerBody,
  sessionIdParams,
  sessionListResponse,
  sessionResponse,
  textResponse,
  type ExpiringQuery,
  type ListQuery,
  type RegisterBody,
} from "./schemas.js";

export interface DaemonInfo {
  state: "running" | "shutting_down";
  version: string;
  startedAt: string;
  ready: boolean;
}

export interface ServerDeps {
  sessions: Sessions;
  store: Store;
  metrics: Metrics;
  log: Logger;
  bodyLimitBytes: number;
  info: () => DaemonInfo;
}

// Bodies are validated strictly (no coercion, no silent removal of unknown keys: fastify's
// default ajv removes them); query strings and path params are strings on the wire, so
// they are coerced.
const bodyAjv = new Ajv({ allErrors: false, coerceTypes: false, removeAdditional: false, useDefaults: false });
const queryAjv = new Ajv({ allErrors: false, coerceTypes: true, removeAdditional: false, useDefaults: true });

function send(code: ErrorCode, message: string, detail?: Record<string, unknown>) {
  return { error: { code, message, ...(detail ? { detail } : {}) } };
}

/** Maps anything thrown in a route to `{ error: { code, message } }` with a stable code. */
function toApiError(err: unknown, log: Logger): { status: number; body: object } {
  if (err instanceof ReaperError) return { status: err.status, body: send(err.code, err.message, err.detail) };
  if (!(err instanceof Error)) {
    log.error({ err }, "non-error thrown in a request");
    return { status: 500, body: send("SR_INTERNAL", "unexpected error; see the daemon's log") };
  }
  const fe = err as FastifyError;
  if (fe.validation) {
    return {
      status: 400,
      body: send("SR_BAD_REQUEST", `${fe.validationContext ?? "request"}${fe.message.replace(/^\w+/, "")}`),
    };
  }
  switch (fe.code) {
    case "FST_ERR_CTP_BODY_TOO_LARGE":
      return { status: 413, body: send("SR_BODY_TOO_LARGE", fe.message) };
    case "FST_ERR_CTP_INVALID_MEDIA_TYPE":
      return { status: 415, body: send("SR_UNSUPPORTED_MEDIA_TYPE", "send the body as application/json") };
    case "FST_ERR_CTP_EMPTY_JSON_BODY":
    case "FST_ERR_CTP_INVALID_JSON_BODY":
      return { status: 400, body: send("SR_INVALID_JSON", fe.message) };
  }
  if (err instanceof SyntaxError || (fe.statusCode === 400 && /JSON/i.test(fe.message))) {
    return { status: 400, body: send("SR_INVALID_JSON", err.message) };
  }
  if (fe.statusCode !== undefined && fe.statusCode >= 400 && fe.statusCode < 500) {
    return { status: fe.statusCode, body: send("SR_BAD_REQUEST", fe.message) };
  }
  log.error({ err }, "unexpected error in a request");
  return { status: 500, body: send("SR_INTERNAL", "unexpected error; see the daemon's log") };
}

/** POST routes whose body is optional: a bodyless request validates as {}. */
function acceptMissingBody(req: { body: unknown }, _reply: unknown, done: () => void): void {
  req.body ??= {};
  done();
}

/** Builds the API without listening (fastify's testing guide): only main.ts listens. */
export function buildServer(deps: ServerDeps): FastifyInstance {
  const { sessions, store, metrics } = deps;
  // Typed as fastify's logger, so the instance is the plain FastifyInstance type.
  const loggerInstance: FastifyBaseLogger = deps.log;
  const app = Fastify({
    loggerInstance,
    // No line per request: heartbeats would cost half the throughput (DESIGN.md).
    logController: new LogController({ disableRequestLogging: true }),
    // req.log is the daemon's logger itself: fastify's default makes a pino child per request
    // (bindings, redaction setup), a few percent of a heartbeat, for lines never written
    // (request logging is off and routes log through deps.log).
    childLoggerFactory: (logger) => logger,
    bodyLimit: deps.bodyLimitBytes,
    return503OnClosing: true,
  });

  // JSON only: without this, fastify would parse text/plain bodies and answer 400, not 415.
  app.removeContentTypeParser("text/plain");
  app.setValidatorCompiler(({ schema, httpPart }) =>
    httpPart === "body" ? bodyAjv.compile(schema) : queryAjv.compile(schema),
  );
  // Response schemas are documentation (the OpenAPI document): answers stay plain
  // JSON.stringify, as without them. fastify's default would compile them with
  // fast-json-stringify, which silently drops every field a schema does not list.
  app.setSerializerCompiler(() => (data) => JSON.stringify(data));
  // Before the first route: every route is collected for /openapi.json as it is registered.
  const routes = collectRoutes(app, (pre) => [pre].flat().includes(acceptMissingBody));
  let openApi: string | undefined;
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
    (req, reply) => reply.status(201).send(sessionJson(sessions.register(req.body))),
  );

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
      preValidation: acceptMissingBody,
    },
    (req) => sessions.heartbeat(req.params.id, req.body.activity ?? "busy"),
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
    (req, reply) => reply.status(202).send(sessionJson(sessions.end(req.params.id, "closed"))),
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
    (req, reply) => reply.status(202).send(sessionJson(sessions.end(req.params.id, "forced"))),
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
