import assert from "node:assert/strict";
import { test } from "node:test";
import { Ajv } from "ajv";
import { Daemon } from "../../src/daemon/daemon.js";
import { API_ERROR_CODES } from "../../src/errors.js";
import { registerBody } from "../../src/http/schemas.js";
import { sleeper, startDaemon, tempDir, testConfig } from "../helpers.js";

type Operation = {
  summary?: string;
  parameters?: { name: string; in: string; required: boolean; schema: object }[];
  requestBody?: { required: boolean; content: Record<string, { schema: object }> };
  responses: Record<string, { description?: string; content?: Record<string, { schema: object }>; $ref?: string }>;
};
type OpenApi = {
  openapi: string;
  info: { title: string; version: string };
  paths: Record<string, Record<string, Operation>>;
  components: { schemas: { Error: { properties: { error: { properties: { code: { enum: string[] } } } } } } };
};

/**
 * Every (METHOD, path) fastify serves, read from its own route tree printout, independently
 * of the onRoute collection the document is built from.
 */
function routesOf(tree: string): Set<string> {
  const out = new Set<string>();
  const stack: string[] = [];
  for (const line of tree.split("\n")) {
    const m = /^((?:│ {3}| {4})*)(?:├── |└── )(\S+) \(([^)]*)\)$/.exec(line);
    if (!m) continue;
    const depth = (m[1] as string).length / 4;
    stack.length = depth;
    const path = (stack[depth - 1] ?? "") + (m[2] as string);
    stack.push(path);
    for (const method of (m[3] as string).split(", ")) if (method !== "-") out.add(`${method} ${path}`);
  }
  return out;
}

const toOpenApi = (path: string): string => path.replace(/:(\w+)/g, "{$1}");

async function fetchDoc(d: { api: <T>(m: string, p: string) => Promise<{ status: number; body: T }> }) {
  const res = await d.api<OpenApi>("GET", "/openapi.json");
  assert.equal(res.status, 200);
  return res.body;
}

test("/openapi.json: OpenAPI 3.1.0 with every route fastify serves, by method", async (t) => {
  const d = await startDaemon(t, testConfig(tempDir(t)));
  const doc = await fetchDoc(d);
  assert.equal(doc.openapi, "3.1.0");
  assert.equal(doc.info.title, "session-reaper");
  assert.match(doc.info.version, /^\d+\.\d+\.\d+/);

  const served = routesOf(d.daemon.app.printRoutes({ commonPrefix: false }));
  assert.ok(served.size >= 12, `parsed only ${[...served].join(", ")}`);
  const documented = new Set(
    Object.entries(doc.paths).flatMap(([path, ops]) => Object.keys(ops).map((m) => `${m.toUpperCase()} ${path}`)),
  );
  const expected = new Set(
    [...served]
      .filter((r) => !r.startsWith("HEAD "))
      .map((r) => `${r.split(" ")[0]} ${toOpenApi(r.split(" ")[1] as string)}`),
  );
  assert.deepEqual([...documented].sort(), [...expected].sort());
  // HEAD is fastify's automatic twin of each GET (the document says so once).
  for (const r of served) if (r.startsWith("HEAD ")) assert.ok(served.has(r.replace("HEAD", "GET")), r);
  for (const route of [
    "GET /metrics",
    "GET /openapi.json",
    "GET /v1/expiring",
    "POST /v1/sessions/{id}/heartbeat",
    "DELETE /v1/sessions/{id}",
  ]) {
    assert.ok(documented.has(route), route);
  }
  for (const [path, ops] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      assert.ok(op.summary, `${method} ${path} has no summary`);
      assert.deepEqual(op.responses.default, { $ref: "#/components/responses/Error" });
      const pathParams = (op.parameters ?? []).filter((p) => p.in === "path").map((p) => p.name);
      assert.deepEqual(
        pathParams,
        [...path.matchAll(/\{(\w+)\}/g)].map((m) => m[1]),
        `${method} ${path}`,
      );
    }
  }
});

test("/openapi.json: schemas are the routes' own; the error envelope lists the SR_ codes", async (t) => {
  const d = await startDaemon(t, testConfig(tempDir(t)));
  const doc = await fetchDoc(d);
  const register = doc.paths["/v1/sessions"]?.post;
  assert.deepEqual(register?.requestBody?.content["application/json"]?.schema, registerBody);
  assert.equal(register?.requestBody?.required, true);
  assert.equal(doc.paths["/v1/sessions/{id}/heartbeat"]?.post?.requestBody?.required, false); // bodyless is {}
  assert.deepEqual(doc.paths["/v1/expiring"]?.get?.parameters, [
    {
      name: "withinSec",
      in: "query",
      required: false,
      schema: { type: "integer", minimum: 1, maximum: 31536000, default: 60 },
    },
  ]);
  assert.ok(doc.paths["/metrics"]?.get?.responses["200"]?.content?.["text/plain"]);
  const codes = doc.components.schemas.Error.properties.error.properties.code.enum;
  assert.deepEqual([...codes], [...API_ERROR_CODES]);
  for (const c of ["SR_BAD_REQUEST", "SR_SESSION_FENCED", "SR_SHUTTING_DOWN", "SR_PORT_NOT_OWNED"]) {
    assert.ok(codes.includes(c), c);
  }
  assert.ok(!codes.includes("SR_DAEMON_UNREACHABLE"), "a CLI-only code");
});

test("/openapi.json: real answers match the documented response schemas", async (t) => {
  const d = await startDaemon(t, testConfig(tempDir(t)));
  const doc = await fetchDoc(d);
  const ajv = new Ajv({ strict: true, allowUnionTypes: true });
  ajv.addFormat("date-time", /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/);
  const check = async (method: string, path: string, docPath: string, body?: unknown): Promise<unknown> => {
    const res = await d.api(method, path, body);
    const op = doc.paths[docPath]?.[method.toLowerCase()];
    const documented = op?.responses[String(res.status)]?.content?.["application/json"]?.schema;
    const schema = documented ?? doc.components.schemas.Error;
    const validate = ajv.compile(schema);
    assert.ok(validate(res.body), `${method} ${path} ${res.status}: ${ajv.errorsText(validate.errors)}`);
    return res.body;
  };
  const engine = sleeper(t);
  await check("POST", "/v1/sessions", "/v1/sessions", { id: "doc", engine: { pid: engine.pid }, owner: "o" });
  await check("POST", "/v1/sessions/doc/heartbeat", "/v1/sessions/{id}/heartbeat", { activity: "idle" });
  const one = (await check("GET", "/v1/sessions/doc", "/v1/sessions/{id}")) as { usage: { elapsed: number } };
  assert.ok(one.usage.elapsed >= 0, "engine age from pidusage");
  await check("GET", "/v1/sessions", "/v1/sessions");
  await check("GET", "/v1/expiring?withinSec=3600", "/v1/expiring");
  await check("GET", "/v1/daemon", "/v1/daemon");
  await check("GET", "/healthz", "/healthz");
  await check("GET", "/readyz", "/readyz");
  await check("POST", "/v1/sessions/doc/reap", "/v1/sessions/{id}/reap");
  await d.reaped("doc");
  await check("GET", "/v1/sessions/doc", "/v1/sessions/{id}"); // reaped: steps, reason, outcome
  await check("GET", "/v1/sessions/doc/events", "/v1/sessions/{id}/events");
  await check("POST", "/v1/sessions/doc/heartbeat", "/v1/sessions/{id}/heartbeat"); // 409: the envelope
  await check("GET", "/v1/expiring?withinSec=0", "/v1/expiring"); // 400: the envelope
});

test("/openapi.json: a route added to the app is documented without being listed anywhere", async (t) => {
  const dir = tempDir(t);
  const daemon = new Daemon({ config: testConfig(dir), logStream: { write: () => undefined } });
  t.after(() => daemon.stop());
  daemon.app.get("/v1/added-later", { schema: { summary: "added by the test" } }, () => ({}));
  const res = await daemon.app.inject({ method: "GET", url: "/openapi.json" });
  const doc = res.json<OpenApi>();
  assert.equal(doc.paths["/v1/added-later"]?.get?.summary, "added by the test");
});
