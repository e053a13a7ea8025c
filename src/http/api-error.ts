import type { FastifyError } from "fastify";
import type { Logger } from "pino";
import { ReaperError, errorMessage, type ErrorCode } from "../errors.js";
import { isStoreFault } from "../store/store.js";

/** Body caps (maxItems, maxProperties, maxLength) answer SR_LIMIT_EXCEEDED, not a generic 400. */
const LIMIT_KEYWORDS: ReadonlySet<string> = new Set(["maxItems", "maxProperties", "maxLength"]);

/**
 * The validation message, naming the field a schema does not allow: ajv's own text for
 * additionalProperties is "must NOT have additional properties", without the name.
 */
function validationMessage(fe: FastifyError): string {
  const context = fe.validationContext ?? "request";
  const extra = fe.validation?.find((v) => v.keyword === "additionalProperties");
  const name = (extra?.params as { additionalProperty?: unknown } | undefined)?.additionalProperty;
  if (extra !== undefined && typeof name === "string") {
    const where = extra.instancePath === "" ? context : `${context}${extra.instancePath.replaceAll("/", ".")}`;
    return `${where} has an unknown property "${name}" (not in the schema)`;
  }
  // ajv says "must be equal to one of the allowed values" without them: they are named.
  const oneOf = fe.validation?.find((v) => v.keyword === "enum");
  const allowed = (oneOf?.params as { allowedValues?: unknown } | undefined)?.allowedValues;
  if (oneOf !== undefined && Array.isArray(allowed)) {
    const where = `${context}${oneOf.instancePath.replaceAll("/", ".")}`;
    return `${where} must be one of ${allowed.map((v) => JSON.stringify(v)).join(", ")}`;
  }
  return `${context}${fe.message.replace(/^\w+/, "")}`;
}

/** The error envelope: `{ error: { code, message, detail? } }`. */
export function errorBody(code: ErrorCode, message: string, detail?: Record<string, unknown>) {
  return { error: { code, message, ...(detail ? { detail } : {}) } };
}

/**
 * Maps anything thrown in a route to `{ error: { code, message } }` with a stable code: the
 * fastify error handler and the heartbeat fast path (fast-heartbeat.ts) answer through it.
 */
export function toApiError(err: unknown, log: Logger): { status: number; body: object } {
  if (err instanceof ReaperError) return { status: err.status, body: errorBody(err.code, err.message, err.detail) };
  if (!(err instanceof Error)) {
    log.error({ err }, "non-error thrown in a request");
    return { status: 500, body: errorBody("SR_INTERNAL", "unexpected error; see the daemon's log") };
  }
  if (isStoreFault(err)) {
    // A read that met a lock, a full disk or a damaged page: the store's failure, not the caller's.
    log.warn({ err }, "the database failed a request");
    return { status: 503, body: errorBody("SR_STORE_UNAVAILABLE", `the database failed: ${errorMessage(err)}`) };
  }
  const fe = err as FastifyError;
  if (fe.validation) {
    if (fe.validationContext === "body" && fe.validation.some((v) => LIMIT_KEYWORDS.has(v.keyword))) {
      return { status: 400, body: errorBody("SR_LIMIT_EXCEEDED", `body${fe.message.replace(/^\w+/, "")}`) };
    }
    return { status: 400, body: errorBody("SR_BAD_REQUEST", validationMessage(fe)) };
  }
  switch (fe.code) {
    case "FST_ERR_CTP_BODY_TOO_LARGE":
      return { status: 413, body: errorBody("SR_BODY_TOO_LARGE", fe.message) };
    case "FST_ERR_CTP_INVALID_MEDIA_TYPE":
      return { status: 415, body: errorBody("SR_UNSUPPORTED_MEDIA_TYPE", "send the body as application/json") };
    case "FST_ERR_CTP_EMPTY_JSON_BODY":
    case "FST_ERR_CTP_INVALID_JSON_BODY":
      return { status: 400, body: errorBody("SR_INVALID_JSON", fe.message) };
  }
  // Only a body the parser refused (it sets statusCode 400) is the caller's bad JSON: JSON the
  // daemon failed to read itself (a damaged stored value) is its own fault, never the caller's.
  if (fe.statusCode === 400 && (err instanceof SyntaxError || /JSON/i.test(fe.message))) {
    return { status: 400, body: errorBody("SR_INVALID_JSON", err.message) };
  }
  if (fe.statusCode !== undefined && fe.statusCode >= 400 && fe.statusCode < 500) {
    return { status: fe.statusCode, body: errorBody("SR_BAD_REQUEST", fe.message) };
  }
  log.error({ err }, "unexpected error in a request");
  return { status: 500, body: errorBody("SR_INTERNAL", "unexpected error; see the daemon's log") };
}
