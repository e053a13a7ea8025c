import { Ajv } from "ajv";
import Fastify, { LogController, type FastifyBaseLogger, type FastifyError, type FastifyInstance } from "fastify";
import type { Logger } from "pino";
import { ReaperError, type ErrorCode } from "../errors.js";
import type { Sessions } from "../sessions/sessions.js";
import type { Store } from "../store/store.js";
import { eventJson, sessionJson } from "./present.js";
import {
  emptyBody,
  heartbeatBody,
  listQuery,
  noQuery,
  registerBody,
  sessionIdParams,
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

/** Builds the API without listening (fastify's testing guide): only main.ts listens. */
export function buildServer(deps: ServerDeps): FastifyInstance {
  const { sessions, store } = deps;
  // Typed as fastify's logger, so the instance is the plain FastifyInstance type.
  const loggerInstance: FastifyBaseLogger = deps.log;
  const app = Fastify({
    loggerInstance,
    // No line per request: heartbeats would cost half the throughput (DESIGN.md).
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: deps.bodyLimitBytes,
    return503OnClosing: true,
  });

  // JSON only: without this, fastify would parse text/plain bodies and answer 400, not 415.
  app.removeContentTypeParser("text/plain");
  app.setValidatorCompiler(({ schema, httpPart }) =>
    httpPart === "body" ? bodyAjv.compile(schema) : queryAjv.compile(schema),
  );
  app.setErrorHandler((err, _req, reply) => {
    const { status, body } = toApiError(err, deps.log);
    void reply.status(status).send(body);
  });
  app.setNotFoundHandler((req, reply) => {
    void reply.status(404).send(send("SR_ROUTE_NOT_FOUND", `no route ${req.method} ${req.url.split("?")[0]}`));
  });
  // POST routes whose body is optional: a bodyless request validates as {}.
  const optionalBody = {
    preValidation: (req: { body: unknown }, _: unknown, done: () => void) => ((req.body ??= {}), done()),
  };

  app.post<{ Body: RegisterBody }>(
    "/v1/sessions",
    { schema: { body: registerBody, querystring: noQuery } },
    (req, reply) => reply.status(201).send(sessionJson(sessions.register(req.body))),
  );

  app.get<{ Querystring: ListQuery }>("/v1/sessions", { schema: { querystring: listQuery } }, (req) => {
    const page = sessions.list(req.query);
    return { sessions: page.sessions.map((s) => sessionJson(s)), next: page.next };
  });

  app.get<{ Params: { id: string } }>(
    "/v1/sessions/:id",
    { schema: { params: sessionIdParams, querystring: noQuery } },
    async (req) => {
      const v = await sessions.view(req.params.id);
      return sessionJson(v.session, v.steps, v.usage);
    },
  );

  app.post<{ Params: { id: string }; Body: { activity?: "busy" | "idle" } }>(
    "/v1/sessions/:id/heartbeat",
    { schema: { params: sessionIdParams, body: heartbeatBody, querystring: noQuery }, ...optionalBody },
    (req) => sessions.heartbeat(req.params.id, req.body.activity ?? "busy"),
  );

  app.delete<{ Params: { id: string } }>(
    "/v1/sessions/:id",
    { schema: { params: sessionIdParams, querystring: noQuery } },
    (req, reply) => reply.status(202).send(sessionJson(sessions.end(req.params.id, "closed"))),
  );

  app.post<{ Params: { id: string } }>(
    "/v1/sessions/:id/reap",
    { schema: { params: sessionIdParams, body: emptyBody, querystring: noQuery }, ...optionalBody },
    (req, reply) => reply.status(202).send(sessionJson(sessions.end(req.params.id, "forced"))),
  );

  app.get<{ Params: { id: string } }>(
    "/v1/sessions/:id/events",
    { schema: { params: sessionIdParams, querystring: noQuery } },
    (req) => {
      sessions.get(req.params.id); // 404 for an unknown session
      return { events: store.events(req.params.id).map(eventJson) };
    },
  );

  app.get("/v1/daemon", { schema: { querystring: noQuery } }, () => {
    const { ready: _ready, ...info } = deps.info();
    return { ...info, counts: store.counts() };
  });

  app.get("/healthz", () => ({ status: "ok" }));
  app.get("/readyz", (_req, reply) => {
    const info = deps.info();
    return reply.status(info.ready ? 200 : 503).send({ ready: info.ready, state: info.state });
  });

  return app;
}
