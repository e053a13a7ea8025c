import type { FastifyInstance, FastifySchema } from "fastify";
import { API_ERROR_CODES, ERRORS } from "../errors.js";

declare module "fastify" {
  interface FastifySchema {
    /** One line naming what the route does, for the OpenAPI document (@fastify/swagger's key). */
    summary?: string;
    description?: string;
  }
}

/** A route as fastify registered it: what the OpenAPI document is built from. */
export interface RouteDoc {
  readonly method: string;
  /** fastify's pattern: `/v1/sessions/:id`. */
  readonly url: string;
  readonly schema: FastifySchema;
  /** A bodyless request is accepted as `{}`. */
  readonly bodyOptional: boolean;
}

/**
 * Collects every route as it is registered (fastify's onRoute hook), so the document cannot
 * miss one: call before the first route. HEAD routes fastify adds for each GET are left out
 * (the document says so once). `isBodyOptional` tells, from the route's options, whether a
 * bodyless request is accepted.
 */
export function collectRoutes(
  app: FastifyInstance,
  isBodyOptional: (preValidation: unknown) => boolean,
): readonly RouteDoc[] {
  const routes: RouteDoc[] = [];
  app.addHook("onRoute", (r) => {
    for (const method of [r.method].flat()) {
      if (method === "HEAD") continue;
      routes.push({ method, url: r.url, schema: r.schema ?? {}, bodyOptional: isBodyOptional(r.preValidation) });
    }
  });
  return routes;
}

const errorEnvelope = {
  type: "object",
  additionalProperties: false,
  required: ["error"],
  properties: {
    error: {
      type: "object",
      additionalProperties: false,
      required: ["code", "message"],
      properties: {
        code: {
          enum: API_ERROR_CODES,
          description: `Stable codes (match on them, not on the message):\n\n${API_ERROR_CODES.map(
            (c) => `- \`${c}\` (${ERRORS[c].status}): ${ERRORS[c].summary}`,
          ).join("\n")}`,
        },
        message: { type: "string", description: "for humans; may change between versions" },
        detail: { type: "object", description: "machine-readable context for some codes" },
      },
    },
  },
} as const;

const STATUS_TEXT: Record<string, string> = { "200": "OK", "201": "Created", "202": "Accepted", "503": "Unavailable" };

type JsonObject = Record<string, unknown>;

/** `/v1/sessions/:id` → `/v1/sessions/{id}` */
const openApiPath = (url: string): string => url.replace(/:([A-Za-z0-9_]+)/g, "{$1}");

/** An object schema's properties as OpenAPI parameters. */
function parameters(schema: unknown, where: "path" | "query"): JsonObject[] {
  const s = schema as { properties?: Record<string, JsonObject>; required?: readonly string[] } | undefined;
  return Object.entries(s?.properties ?? {}).map(([name, prop]) => ({
    name,
    in: where,
    required: where === "path" || (s?.required ?? []).includes(name),
    schema: prop,
  }));
}

function responses(schema: FastifySchema): JsonObject {
  const out: JsonObject = {};
  for (const [status, res] of Object.entries((schema.response ?? {}) as Record<string, JsonObject>)) {
    // fastify's two forms: a JSON schema, or { description?, content: { mediaType: { schema } } }.
    if ("content" in res) {
      out[status] = { description: STATUS_TEXT[status] ?? status, ...res };
    } else {
      const { description, ...json } = res as { description?: string } & JsonObject;
      out[status] = {
        description: description ?? STATUS_TEXT[status] ?? status,
        content: { "application/json": { schema: json } },
      };
    }
  }
  if (Object.keys(out).length === 0) out["200"] = { description: "OK" };
  out.default = { $ref: "#/components/responses/Error" };
  return out;
}

/** The API's OpenAPI 3.1 document, from the routes as registered and their schemas. */
export function openApiDocument(routes: readonly RouteDoc[], version: string): JsonObject {
  const paths: Record<string, JsonObject> = {};
  for (const r of routes) {
    const params = [...parameters(r.schema.params, "path"), ...parameters(r.schema.querystring, "query")];
    const operation: JsonObject = {
      ...(r.schema.summary === undefined ? {} : { summary: r.schema.summary }),
      ...(r.schema.description === undefined ? {} : { description: r.schema.description }),
      ...(params.length > 0 ? { parameters: params } : {}),
      ...(r.schema.body === undefined
        ? {}
        : {
            requestBody: {
              required: !r.bodyOptional,
              content: { "application/json": { schema: r.schema.body } },
            },
          }),
      responses: responses(r.schema),
    };
    const path = openApiPath(r.url);
    paths[path] = { ...paths[path], [r.method.toLowerCase()]: operation };
  }
  return {
    openapi: "3.1.0",
    info: {
      title: "session-reaper",
      version,
      description:
        "The session-reaper daemon's local API, JSON over a unix socket (`curl --unix-socket reaper.sock http://localhost/...`). " +
        "Every GET route answers HEAD too. Errors are `{ error: { code, message } }` with a stable `SR_` code. " +
        "Generated from the schemas the routes validate with.",
    },
    servers: [{ url: "http://localhost", description: "the daemon's unix socket" }],
    paths,
    components: {
      schemas: { Error: errorEnvelope },
      responses: {
        Error: {
          description: "An error, with a stable code",
          content: { "application/json": { schema: { $ref: "#/components/schemas/Error" } } },
        },
      },
    },
  };
}
