/**
 * Fuzzing (issue "Lock the door"): fast-check sends 10,000 generated requests over the real
 * unix socket to a real daemon, across every route of the API (checked against
 * /openapi.json) plus unknown routes and methods. Bodies are mostly well-formed, so they get
 * deep into validation (pids, paths, ports, timeouts, labels drawn from values that matter),
 * and some are malformed (invalid JSON, wrong media types, deep nesting, bodies around and
 * beyond the 16 KiB cap, __proto__ keys, unicode, bad UTF-8). Some registrations succeed and
 * are reaped (short timeouts, forced reaps, closes), so the reap pipeline runs meanwhile.
 *
 * Per request: no 5xx, every 4xx body is `{ error: { code: "SR_...", message } }` with a
 * code of src/errors.ts whose status is the one answered (malformed HTTP, a bad
 * percent-encoding and an over-long id included), and /healthz still answers. After the
 * run: every reap finishes, the daemon's heap is bounded, and the SQLite file passes an
 * integrity check and the store's invariants.
 *
 * SAFETY: the daemon runs as root and can kill processes and delete files. Every profile
 * allows only the uid of a user made for this test (allowed_uids) and a temp dir
 * (allowed_roots), and the engine fixtures run as that user: a generated pid that hits a
 * host process is refused (SR_UID_NOT_ALLOWED, SR_PROCESS_NOT_FOUND, SR_INVALID_PID), and
 * no path outside the temp root can be registered. The test asserts this setup before the
 * first request, and afterwards that root's processes and the victim files outside the
 * allowed root (owned by the test user, so only the root check protects them) are intact.
 *
 * Replay a failure with FUZZ_SEED=<seed printed by fast-check>: the same requests (the
 * daemon's timing, hence some answers, may differ).
 */
import assert from "node:assert/strict";
import { chmodSync, chownSync, existsSync, lchownSync, mkdirSync, symlinkSync, writeFileSync } from "node:fs";
import { Agent, request, type IncomingHttpHeaders } from "node:http";
import { spawn } from "node:child_process";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { test } from "node:test";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import Database from "better-sqlite3";
import fc from "fast-check";
import { API_ERROR_CODES, ERRORS, type ErrorCode } from "../../src/errors.js";
import { isGone, sleeper, startDaemon, startEngine, tempDir, testConfig, testUser, until } from "../helpers.js";

const NUM_RUNS = 10_000;
/**
 * Fixture slots: the first ENGINES run the engine fixture (a port and a dir of its own), the
 * others a plain `sleep` with a dir (cheap to replace). All run as the test user; a reaped
 * one is replaced, up to these totals.
 */
const POOL = 8;
const ENGINES = 2;
const MAX_ENGINES = 10;
const MAX_SLEEPERS = 120;
const BODY_LIMIT = 16384;

/** Every route of the API, as /openapi.json lists them: the test fails if one is added and not fuzzed. */
const ROUTES = [
  "POST /v1/sessions",
  "GET /v1/sessions",
  "GET /v1/sessions/{id}",
  "PATCH /v1/sessions/{id}",
  "DELETE /v1/sessions/{id}",
  "POST /v1/sessions/{id}/heartbeat",
  "POST /v1/sessions/{id}/reap",
  "POST /v1/sessions/{id}/extend",
  "GET /v1/sessions/{id}/events",
  "GET /v1/events",
  "GET /v1/expiring",
  "GET /v1/orphans",
  "GET /v1/daemon",
  "GET /healthz",
  "GET /readyz",
  "GET /metrics",
  "GET /openapi.json",
] as const;

// --- symbolic values, resolved against the live fixtures when the request is sent ----------

/** A value that depends on the run's state (a fixture's pid, a registered id, …). */
interface Ref {
  $: string;
  i?: number;
  s?: string;
}
const ref = ($: string, i?: number, s?: string): Ref => ({
  $,
  ...(i === undefined ? {} : { i }),
  ...(s === undefined ? {} : { s }),
});

type Body =
  | { kind: "json"; json: unknown; mutation: [string, number]; padTo: number | null }
  | { kind: "raw"; text: string }
  | { kind: "bytes"; bytes: number[] };

/** A generated request, before its references are resolved. */
interface RequestSpec {
  route: string;
  method: string;
  /** Path segments: strings as they are, refs resolved then percent-encoded (`rawseg`: not encoded). */
  path: (string | Ref)[];
  /** key=value pairs (values may be refs), or a raw query string. */
  query: [string, unknown][] | string | null;
  body: Body | null;
  /** null: no content-type header. */
  contentType: string | null;
  headers: Record<string, string>;
  /** Malformed at the HTTP level: the daemon may close the connection instead of answering. */
  rough: boolean;
}

interface Wire {
  method: string;
  path: string;
  headers: Record<string, string>;
  body: Buffer | null;
}

interface Answer {
  status: number;
  headers: IncomingHttpHeaders;
  text: string;
}

/** Percent-encodes, also strings encodeURIComponent refuses (lone surrogates): their low bytes, as-is. */
function enc(s: string): string {
  try {
    return encodeURIComponent(s);
  } catch {
    return [...s]
      .map((c) => (/^[A-Za-z0-9]$/.test(c) ? c : `%${(c.charCodeAt(0) & 0xff).toString(16).padStart(2, "0")}`))
      .join("");
  }
}

// --- generators --------------------------------------------------------------------------

/**
 * Any code points, lone surrogates included (fast-check's unit "binary" builds a table of the
 * whole unicode range, a second of CPU).
 */
const binary = fc
  .array(
    fc.oneof(
      fc.integer({ min: 0, max: 0x7f }),
      fc.integer({ min: 0x80, max: 0xffff }),
      fc.integer({ min: 0x10000, max: 0x10ffff }),
    ),
    { maxLength: 24 },
  )
  .map((cps) => cps.map((c) => (c <= 0xffff ? String.fromCharCode(c) : String.fromCodePoint(c))).join(""));

/** An alternative of fc.oneof, drawn `weight` times as often as one of weight 1. */
const often = <T>(arbitrary: fc.Arbitrary<T>, weight: number): fc.WeightedArbitrary<T> => ({ arbitrary, weight });

/** Odd integers for query strings: ajv's coercion would take most of these. */
const oddInt = fc.oneof(
  fc.constantFrom("0x10", " 12 ", "1e3", "", "-1", "0", "01", "1.0", "+1", "1.5", "NaN", "Infinity", "9".repeat(20)),
  fc.constantFrom("1", "60", "100", "1000", "1001", "31536000", "31536001", "%20", "1%00", "１２"),
  fc.integer().map(String),
  fc.string({ maxLength: 6 }),
);

/** A reference to one of the fixture slots' pid, port or dir. */
const slotRef = (kind: "pid" | "port" | "dir") => fc.nat(POOL - 1).map((i) => ref(kind, i));
/** Ids from a small pool, and the ids of the latest registrations: requests hit existing sessions. */
const poolId = fc.nat(11).map((i) => `fz-${i}`);
const recentId = fc.nat(7).map((i) => ref("recent", i));
/** Sent as they are in a path, not percent-encoded. */
const rawSegment = fc
  .constantFrom("%ZZ", "%00", "%2e%2e", "%2F", "%C0%AF", "..%2F..%2Fetc", "%", "é", "a;b", "a?b")
  .map((s) => ref("rawseg", undefined, s));

const sessionId = fc.oneof(
  often(poolId, 6),
  often(recentId, 6),
  often(fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9._:@-]{0,20}$/), 2),
  often(fc.constantFrom("", ".", "..", "-x", "_x", "a/b", "a b", "a%b", "x".repeat(128), "x".repeat(129)), 1),
  often(fc.constantFrom("__proto__", "constructor", "toString", "hasOwnProperty", "0", "null", "undefined"), 1),
  often(binary, 1),
  often(rawSegment, 1),
);

const pid = fc.oneof(
  often(slotRef("pid"), 12),
  often(fc.constantFrom(0, 1, -1, 2 ** 31, 2 ** 22, 2 ** 22 + 1, 1.5, "12", null, true, 1e21, -0, 2 ** 53 + 2), 2),
  often(fc.constantFrom(ref("sleeper"), ref("daemon")), 1),
  often(fc.integer({ min: 2, max: 4194304 }), 2),
  often(fc.oneof(fc.integer(), fc.double()), 1),
);

const port = fc.oneof(
  often(slotRef("port"), 4),
  often(fc.constantFrom(0, 1, 22, 65535, 65536, -1, 1.5, "80", null), 1),
  often(fc.integer({ min: 1, max: 65535 }), 1),
);

const path = fc.oneof(
  often(slotRef("dir"), 8),
  often(
    fc.webSegment().map((s) => ref("under", undefined, s)),
    2,
  ),
  often(
    fc.constantFrom("x", "..", ".", "a/../..", "./x", "x//y", "x/").map((s) => ref("under", undefined, s)),
    1,
  ),
  often(
    fc.constantFrom(
      ref("root"),
      ref("victimDir"),
      ref("victimFile"),
      ref("link"),
      ref("linked"),
      ref("escape"),
      ref("rootsDir"),
    ),
    5,
  ),
  often(
    fc.constantFrom(
      "/",
      "/etc",
      "/etc/passwd",
      "/tmp",
      "..",
      ".",
      "relative/x",
      "",
      "/proc/1",
      "//",
      "/tmp/../etc",
      "\u0000",
      "/tmp/\u0000x",
      "/dev/null",
      "/root",
    ),
    2,
  ),
  often(binary, 1),
  often(
    fc.constantFrom(4095, 4096, 4097, 10000).map((n) => "/" + "a".repeat(n - 1)),
    1,
  ),
);

const timeout = fc.oneof(
  often(fc.constantFrom(1, 2, 3), 6),
  often(fc.constantFrom(0, -1, 4, 60, 1.5, "1", null, 315360000, 315360001, 1e308, -1e308, 2 ** 53), 3),
  often(fc.integer(), 1),
);

const labelKey = fc.oneof(
  often(fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9_./-]{0,10}$/), 4),
  often(
    fc.constantFrom(
      "",
      "-x",
      "a b",
      "é",
      "x".repeat(63),
      "x".repeat(64),
      "constructor",
      "toString",
      "hasOwnProperty",
      "__proto__",
    ),
    1,
  ),
);
const labelValue = fc.oneof(
  often(fc.string({ maxLength: 12 }), 4),
  often(binary, 1),
  often(fc.constantFrom("x".repeat(256), "x".repeat(257), 1, null, ["a"], { a: "b" }), 1),
);
const labels = fc.oneof(
  often(fc.dictionary(labelKey, labelValue, { maxKeys: 4 }), 6),
  often(
    fc.constantFrom(64, 65).map((n) => Object.fromEntries(Array.from({ length: n }, (_, i) => [`k${i}`, "v"]))),
    1,
  ),
  often(fc.constantFrom(null, [], "x", 1), 1),
);

/** Deeply nested JSON, spliced into the body's text in place of this ref. */
const deep = fc
  .tuple(fc.constantFrom("[", "{"), fc.integer({ min: 100, max: 3000 }))
  .map(([k, n]) => ref("deep", n, k));

const ownerArb = fc.oneof(
  often(fc.string({ maxLength: 16 }), 4),
  often(binary, 1),
  often(fc.constantFrom("x".repeat(256), "x".repeat(257), "x".repeat(15000), "x".repeat(17000), 1, null), 1),
);

/** Each field of a registration, from values that matter (refs to fixtures among them). */
const wildFields = {
  id: sessionId,
  profile: fc.oneof(
    often(fc.constantFrom("default", "batch"), 4),
    often(fc.constantFrom("nope", "", "x".repeat(65), "DEFAULT", 1, null), 1),
    // Names every plain object answers to: a profile table looked up with [] finds these.
    often(fc.constantFrom("__proto__", "constructor", "toString", "hasOwnProperty", "valueOf"), 1),
  ),
  owner: ownerArb,
  engine: fc.oneof(
    often(
      pid.map((p) => ({ pid: p })),
      12,
    ),
    often(
      pid.map((p) => ({ pid: p, extra: 1 })),
      1,
    ),
    often(fc.constantFrom({}, null, 5, "x", [], { pid: [1] }, { pid: { pid: 2 } }), 1),
    often(
      deep.map((d) => ({ pid: d })),
      1,
    ),
  ),
  ownerPid: pid,
  ports: fc.oneof(
    often(fc.array(port, { maxLength: 3 }), 6),
    often(
      fc.constantFrom(65, 64).map((n) => Array.from({ length: n }, (_, i) => i + 1)),
      1,
    ),
    often(fc.constantFrom(null, 80, "80", {}, [80, 80]), 1),
    often(
      deep.map((d) => [d, d]),
      1,
    ),
  ),
  paths: fc.oneof(
    often(fc.array(path, { maxLength: 3 }), 6),
    often(
      fc.constantFrom(65, 64).map((n) => Array.from({ length: n }, (_, i) => ref("under", undefined, `p${i}`))),
      1,
    ),
    often(fc.constantFrom(null, "/tmp", {}, [1]), 1),
    often(
      deep.map((d) => [d]),
      1,
    ),
  ),
  heartbeatTimeoutSec: timeout,
  idleTimeoutSec: timeout,
  maxLifetimeSec: timeout,
  labels,
};

/** A field deleted from a registration (see `nearlyValid`). */
const DELETED = "@@deleted@@";

/**
 * A valid registration of one fixture (its pid, dir and port), within the profile's maxima:
 * 201 unless the fixture has died or the id is taken.
 */
const validRegister = fc
  .record({
    slot: fc.nat(POOL - 1),
    id: fc.oneof(
      often(fc.constant(undefined), 4),
      often(poolId, 2),
      often(fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9._:@-]{0,40}$/), 3),
      // Valid (the schema takes 128 characters), yet longer than the router's maxParamLength.
      often(fc.stringMatching(/^[A-Za-z0-9]{101,128}$/), 1),
    ),
    profile: fc.constantFrom(undefined, "default", "batch"),
    owner: fc.option(fc.string({ maxLength: 16 }), { nil: undefined }),
    dir: fc.boolean(),
    port: fc.boolean(),
    ownerPid: fc.option(fc.constantFrom(ref("sleeper"), ref("pid", 0)), { nil: undefined, freq: 2 }),
    heartbeatTimeoutSec: fc.option(fc.constantFrom(1, 2), { nil: undefined }),
    idleTimeoutSec: fc.option(fc.constantFrom(1, 2, 3), { nil: undefined }),
    maxLifetimeSec: fc.option(fc.constantFrom(1, 2, 3, 4), { nil: undefined }),
    labels: fc.option(
      fc.dictionary(fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9_./-]{0,10}$/), fc.string({ maxLength: 12 })),
      {
        nil: undefined,
      },
    ),
  })
  .map(({ slot, dir, port, ...rest }) => ({
    ...rest,
    engine: { pid: ref("pid", slot) },
    paths: dir ? [ref("dir", slot)] : undefined,
    ports: port && slot < ENGINES ? [ref("port", slot)] : undefined,
  }));

/** How often each field is the one replaced: the ones that reach /proc and the file system most. */
const FIELD_WEIGHTS: Record<string, number> = { engine: 3, ownerPid: 2, ports: 2, paths: 4 };

/** A valid registration, or one with a single field replaced by a generated value, or deleted. */
const nearlyValid = fc
  .tuple(
    validRegister,
    fc.option(
      fc.oneof(
        ...Object.entries(wildFields).map(([k, arb]) =>
          often(
            (arb as fc.Arbitrary<unknown>).map((v) => [k, v] as const),
            FIELD_WEIGHTS[k] ?? 1,
          ),
        ),
        fc.constantFrom(...Object.keys(wildFields)).map((k) => [k, DELETED] as const),
      ),
      { freq: 3 },
    ),
  )
  .map(([body, change]): Record<string, unknown> => {
    if (change === null) return body;
    const [k, v] = change;
    const kept: [string, unknown][] = Object.entries(body).filter(([key]) => key !== k);
    return Object.fromEntries(v === DELETED ? kept : [...kept, [k, v]]);
  });

const registerBody = fc.oneof(often(nearlyValid, 3), often(fc.record(wildFields, { requiredKeys: ["engine"] }), 1));

/** What is done to a JSON body's text (or value) before it is sent. */
const mutation = fc.tuple(
  fc.oneof(
    often(fc.constant("none"), 24),
    often(
      fc.constantFrom(
        "proto",
        "protoNested",
        "constructor",
        "truncate",
        "trailing",
        "bom",
        "dupKey",
        "array",
        "null",
        "noEngine",
        "unknownKey",
        "singleQuotes",
        "nan",
        "badUtf8",
      ),
      1,
    ),
  ),
  fc.nat(),
);

/** Sizes around and beyond the body cap (whitespace padding keeps the JSON valid). */
const padTo = fc.oneof(
  often(fc.constant(null), 40),
  often(fc.constantFrom(BODY_LIMIT - 1, BODY_LIMIT, BODY_LIMIT + 1, 20000, 100000), 1),
);

const contentType = fc.oneof(
  often(fc.constant("application/json"), 30),
  often(
    fc.constantFrom(
      "application/json; charset=utf-8",
      "APPLICATION/JSON",
      "application/json;charset=latin1",
      "text/plain",
      "application/x-www-form-urlencoded",
      "multipart/form-data; boundary=x",
      "application/vnd.api+json",
      "application/jsonx",
      "",
      "application/json, text/plain",
      "*/*",
      null,
    ),
    1,
  ),
);

const extraHeaders = fc.oneof(
  often(fc.constant<Record<string, string>>({}), 20),
  often(
    fc.constantFrom<Record<string, string>>(
      { origin: "http://evil.example" },
      { authorization: "Bearer nope" },
      { host: "evil.example" },
      { host: "" },
      { "x-forwarded-for": "10.0.0.1" },
      { expect: "100-continue" },
      { "accept-encoding": "gzip, br" },
      { "content-encoding": "gzip" },
      { accept: "text/html" },
    ),
    1,
  ),
);

/** Query-string noise for routes that take none (or take only some keys). */
const queryNoise = fc.oneof(
  often(fc.constant(null), 10),
  often(
    fc.constantFrom<[string, unknown][]>([["x", "1"]], [["__proto__", "1"]], [["constructor", "x"]], [["", ""]]),
    1,
  ),
  often(fc.constantFrom("&&", "=", "a=b=c", "%ZZ=1", "x", "?", "a[b]=1", "a=%ZZ"), 1),
);

const spec = (s: Partial<RequestSpec> & Pick<RequestSpec, "route" | "method" | "path">): RequestSpec => ({
  query: null,
  body: null,
  contentType: null,
  headers: {},
  rough: false,
  ...s,
});

const jsonBody = (json: unknown, m: [string, number] = ["none", 0], pad: number | null = null): Body => ({
  kind: "json",
  json,
  mutation: m,
  padTo: pad,
});

const register = fc
  .record({ json: registerBody, m: mutation, pad: padTo, ct: contentType, q: queryNoise, h: extraHeaders })
  .map(({ json, m, pad, ct, q, h }) =>
    spec({
      route: "POST /v1/sessions",
      method: "POST",
      path: ["/v1/sessions"],
      query: q,
      body: jsonBody(json, m, pad),
      contentType: ct,
      headers: h,
      rough: pad !== null && pad > BODY_LIMIT,
    }),
  );

/** Bodies of the POST routes whose body is optional (heartbeat, reap). */
const smallBody = (shapes: fc.Arbitrary<unknown>) =>
  fc.oneof(
    often(fc.constant(null), 6),
    often(
      shapes.map((j) => jsonBody(j)),
      6,
    ),
    often(
      fc.constantFrom<Body>({ kind: "raw", text: "{" }, { kind: "raw", text: "" }, { kind: "raw", text: "null" }),
      1,
    ),
    often(
      fc.tuple(shapes, mutation).map(([j, m]) => jsonBody(j, m)),
      1,
    ),
    often(
      deep.map((d) => jsonBody({ activity: d })),
      1,
    ),
  );

/** A session id as a path segment: percent-encoded when sent (a `rawseg` ref stays as it is). */
const segment = (id: string | Ref): Ref => (typeof id === "string" ? ref("lit", undefined, id) : id);

const withId = (route: string, method: string, suffix: string, body: fc.Arbitrary<Body | null>) =>
  fc.record({ id: sessionId, body, ct: contentType, q: queryNoise, h: extraHeaders }).map(({ id, body: b, ct, q, h }) =>
    spec({
      route,
      method,
      path: ["/v1/sessions/", segment(id), ...(suffix ? [suffix] : [])],
      query: q,
      body: b,
      contentType: b === null ? null : ct,
      headers: h,
    }),
  );

const heartbeat = withId(
  "POST /v1/sessions/{id}/heartbeat",
  "POST",
  "/heartbeat",
  smallBody(
    fc.oneof(
      fc.constantFrom({}, { activity: "busy" }, { activity: "idle" }),
      fc.constantFrom(
        { activity: "BUSY" },
        { activity: "" },
        { activity: null },
        { activity: 1 },
        { activity: "busy", x: 1 },
        [],
        "busy",
      ),
    ),
  ),
);
const reap = withId(
  "POST /v1/sessions/{id}/reap",
  "POST",
  "/reap",
  smallBody(fc.constantFrom({}, {}, { x: 1 }, [], { reason: "forced" })),
);
/** Extensions: in the cap (the default 8 h), over it, and every wrong shape. */
const extend = withId(
  "POST /v1/sessions/{id}/extend",
  "POST",
  "/extend",
  smallBody(
    fc.oneof(
      fc.record({ sec: fc.integer({ min: 1, max: 28800 }) }),
      fc.constantFrom(
        { sec: 28801 },
        { sec: 0 },
        { sec: -1 },
        { sec: 1.5 },
        { sec: "2h" },
        { sec: null },
        {},
        { sec: 1, x: 1 },
        [],
        { sec: 1e300 },
      ),
    ),
  ),
);
const close = withId(
  "DELETE /v1/sessions/{id}",
  "DELETE",
  "",
  fc.oneof(often(fc.constant(null), 8), often(fc.constantFrom(jsonBody({}), jsonBody({ x: 1 })), 1)),
);
const getOne = withId("GET /v1/sessions/{id}", "GET", "", fc.constant(null));
/** PATCH: a fixture's port, dir or labels (valid, mostly), or any of the register body's wild values. */
const patchBody = fc.oneof(
  often(
    fc
      .record(
        {
          slot: fc.nat(POOL - 1),
          port: fc.boolean(),
          dir: fc.boolean(),
          labels: fc.dictionary(fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9_./-]{0,10}$/), fc.string({ maxLength: 12 })),
        },
        { requiredKeys: ["slot"] },
      )
      .map(({ slot, port, dir, labels }) => ({
        ...(port && slot < ENGINES ? { ports: [ref("port", slot)] } : {}),
        ...(dir ? { paths: [ref("dir", slot)] } : {}),
        ...(labels === undefined ? {} : { labels }),
      })),
    6,
  ),
  often(
    fc.record({ ports: wildFields.ports, paths: wildFields.paths, labels: wildFields.labels }, { requiredKeys: [] }),
    3,
  ),
  often(fc.constantFrom({}, { engine: { pid: 1 } }, { ports: [] }, [], null, "x", { labels: { "": "x" } }), 1),
);
const patch = withId(
  "PATCH /v1/sessions/{id}",
  "PATCH",
  "",
  fc.tuple(patchBody, mutation).map(([j, m]) => jsonBody(j, m)),
);
const events = withId("GET /v1/sessions/{id}/events", "GET", "/events", fc.constant(null));

const cursor = fc.oneof(
  often(fc.constant(ref("cursor")), 4),
  often(
    fc.nat().map((n) => Buffer.from(String(n), "latin1").toString("base64url")),
    2,
  ),
  often(fc.constantFrom("", "abc", "-1", "0", "MQ==", "LTE", "x".repeat(64), "x".repeat(65), "%%", "9".repeat(30)), 1),
  often(fc.string({ maxLength: 10 }), 1),
);

const list = fc
  .tuple(
    fc.record(
      {
        state: fc.oneof(
          often(fc.constantFrom("live", "reaping", "reaped"), 8),
          often(fc.constantFrom("LIVE", "dead", "", "live,reaped"), 1),
        ),
        profile: fc.oneof(
          often(fc.constantFrom("default", "batch"), 6),
          often(fc.constantFrom("", "nope", "x".repeat(65), "__proto__", "toString"), 1),
        ),
        owner: fc.oneof(often(fc.string({ maxLength: 8 }), 6), often(ownerArb, 1)),
        limit: fc.oneof(often(fc.constantFrom("1", "2", "1000"), 6), often(oddInt, 2)),
        cursor,
      },
      { requiredKeys: [] },
    ),
    fc.oneof(often(fc.constant("none"), 8), often(fc.constantFrom("dup", "unknown"), 1)),
    extraHeaders,
  )
  .map(([q, noise, h]) => {
    const pairs: [string, unknown][] = Object.entries(q);
    // A key twice: fastify's querystring parser makes an array of them.
    if (noise === "dup" && pairs.length > 0) pairs.push(pairs[0] as [string, unknown]);
    if (noise === "unknown") pairs.push(["x", "1"]);
    return spec({ route: "GET /v1/sessions", method: "GET", path: ["/v1/sessions"], query: pairs, headers: h });
  });

const expiring = fc.tuple(fc.option(oddInt, { freq: 5 }), queryNoise, fc.boolean()).map(([within, noise, dup]) => {
  const pairs: [string, unknown][] = within === null ? [] : [["withinSec", within]];
  if (dup && within !== null) pairs.push(["withinSec", "5"]);
  if (Array.isArray(noise)) pairs.push(...noise);
  return spec({ route: "GET /v1/expiring", method: "GET", path: ["/v1/expiring"], query: pairs });
});

/**
 * GET /v1/events, never a stream that stays open (the next request waits on the connection):
 * follow=1 only as HEAD, or duplicated (refused); mostly one session's backlog, now and then
 * the whole table's.
 */
const eventStream = fc
  .tuple(
    fc.record(
      {
        follow: fc.oneof(
          often(fc.constant("0"), 6),
          often(fc.constantFrom("2", "true", "yes", "", "-1", "01", " 1", "1.0", "１"), 2),
        ),
        session: fc.oneof(
          often(poolId, 4),
          often(recentId, 4),
          often(fc.constantFrom("", "..", "a/b", "x".repeat(129), "__proto__", "toString"), 1),
        ),
        since: fc.oneof(often(oddInt, 4), often(fc.constantFrom("0", "999999999999999"), 1)),
      },
      { requiredKeys: [] },
    ),
    fc.oneof(often(fc.constant("none"), 8), often(fc.constantFrom("dup", "unknown", "headFollow", "dupFollow"), 1)),
    extraHeaders,
  )
  .filter(([q]) => q.session !== undefined || q.since !== undefined || q.follow !== undefined)
  .map(([q, noise, h]) => {
    const pairs: [string, unknown][] = Object.entries(q);
    if (noise === "dup" && pairs.length > 0) pairs.push(pairs[0] as [string, unknown]);
    if (noise === "unknown") pairs.push(["x", "1"]);
    if (noise === "dupFollow") pairs.push(["follow", "1"], ["follow", "1"]);
    if (noise === "headFollow") pairs.push(["follow", "1"]);
    const method = noise === "headFollow" ? "HEAD" : "GET";
    return spec({ route: "GET /v1/events", method, path: ["/v1/events"], query: pairs, headers: h });
  });

const simpleGet = (p: string) =>
  fc
    .tuple(queryNoise, fc.boolean(), extraHeaders)
    .map(([q, head, h]) => spec({ route: `GET ${p}`, method: head ? "HEAD" : "GET", path: [p], query: q, headers: h }));

const ALL_METHODS = [
  "GET",
  "POST",
  "PUT",
  "PATCH",
  "DELETE",
  "HEAD",
  "OPTIONS",
  "TRACE",
  "PROPFIND",
  "SEARCH",
  "PURGE",
];

const unknownRoute = fc
  .tuple(
    fc.constantFrom(...ALL_METHODS),
    fc.oneof(
      fc.webPath(),
      fc.constantFrom(
        "/",
        "/v1",
        "/v1/",
        "/v1/sessions/",
        "/v1/sessions//heartbeat",
        "/V1/SESSIONS",
        "/v2/sessions",
        "/healthz/",
        "/%2e%2e/etc/passwd",
        "/v1/sessions/x/y/z",
        "/v1/sessions/%ZZ",
        "/v1/sessions/%ZZ/heartbeat",
        "/v1/sessions/%00",
        "/v1/sessions/%C0%AF",
        "/v1/sessions/a%2Fb/heartbeat",
        "/v1/sessions/x/heartbeat/",
        "*",
        "/metrics/",
        "/openapi.json/x",
        "/v1/expiring/1",
        "/" + "a".repeat(5000),
      ),
    ),
    fc.option(fc.constantFrom(jsonBody({}), jsonBody({ engine: { pid: 2 } }), { kind: "raw", text: "x" } as Body), {
      freq: 3,
    }),
  )
  .map(([method, p, body]) =>
    spec({ route: "unknown", method, path: [p], body, contentType: body === null ? null : "application/json" }),
  );

/** A known route with a method it does not take. */
const wrongMethod = fc
  .tuple(fc.constantFrom(...ROUTES), fc.constantFrom(...ALL_METHODS), sessionId)
  .filter(([r, m]) => !r.startsWith(`${m} `) && !(m === "HEAD" && r.startsWith("GET ")))
  .map(([r, method, id]) => {
    const template = r.split(" ")[1] as string;
    const [before, after] = template.split("{id}") as [string, string | undefined];
    return spec({ route: "wrong method", method, path: after === undefined ? [before] : [before, segment(id), after] });
  });

/** Malformed at the HTTP level, or beyond a limit: the daemon may cut the connection. */
const rough = fc
  .oneof(
    fc
      .constantFrom("FOO", "get", "MKCOL", "LINK", "QUERY")
      .map((method) => spec({ route: "rough: method", method, path: ["/healthz"] })),
    fc
      .tuple(
        fc.constantFrom("GET", "HEAD", "POST"),
        fc.constantFrom("gzip", "chunked, gzip", "identity", "chunked, chunked"),
      )
      .map(([method, te]) =>
        spec({ route: "rough: transfer-encoding", method, path: ["/metrics"], headers: { "transfer-encoding": te } }),
      ),
    fc
      .constantFrom(16000, 17000)
      .map((n) =>
        spec({ route: "rough: header", method: "GET", path: ["/healthz"], headers: { "x-big": "a".repeat(n) } }),
      ),
    fc.constantFrom(15000, 17000).map((n) => spec({ route: "rough: url", method: "GET", path: ["/" + "a".repeat(n)] })),
    fc
      .constantFrom("/v1/sessions/\u00e9", "/v1/sessions/\u00ff\u00fe", "/\u0080")
      .map((p) => spec({ route: "rough: latin1 path", method: "GET", path: [p] })),
    fc.constantFrom(BODY_LIMIT * 4, 1 << 20).map((n) =>
      spec({
        route: "rough: huge body",
        method: "POST",
        path: ["/v1/sessions"],
        body: { kind: "raw", text: " ".repeat(n) },
        contentType: "application/json",
      }),
    ),
    fc.array(fc.integer({ min: 0, max: 255 }), { maxLength: 64 }).map((bytes) =>
      spec({
        route: "rough: bytes",
        method: "POST",
        path: ["/v1/sessions"],
        body: { kind: "bytes", bytes },
        contentType: "application/json",
      }),
    ),
    binary.map((text) =>
      spec({
        route: "rough: text",
        method: "POST",
        path: ["/v1/sessions"],
        body: { kind: "raw", text },
        contentType: "application/json",
      }),
    ),
  )
  .map((s) => ({ ...s, rough: true }));

const requestArb: fc.Arbitrary<RequestSpec> = fc.oneof(
  often(register, 30),
  often(list, 8),
  often(getOne, 6),
  often(patch, 5),
  often(heartbeat, 10),
  often(close, 5),
  often(reap, 5),
  often(extend, 3),
  often(events, 4),
  often(eventStream, 3),
  often(expiring, 4),
  often(simpleGet("/v1/orphans"), 2),
  often(simpleGet("/v1/daemon"), 2),
  often(simpleGet("/healthz"), 2),
  often(simpleGet("/readyz"), 2),
  often(simpleGet("/metrics"), 1),
  often(simpleGet("/openapi.json"), 1),
  often(unknownRoute, 6),
  often(wrongMethod, 4),
  often(rough, 4),
);

// --- the run's state ------------------------------------------------------------------------

/** A fixture process of the test user: what registrations name. */
interface Slot {
  pid: number;
  port: number | null;
  dir: string;
  exited: Promise<void>;
}

interface Places {
  root: string;
  victimDir: string;
  victimFile: string;
  link: string;
  rootsDir: string;
}

class World {
  readonly slots: Slot[] = [];
  readonly recent: string[] = [];
  lastCursor: string | null = null;
  readonly registered = new Set<string>();

  constructor(
    readonly places: Places,
    readonly sleeperPid: number,
  ) {}

  private slot(i: number): Slot {
    return this.slots[i % this.slots.length] as Slot;
  }

  resolve(r: Ref): unknown {
    const { root } = this.places;
    switch (r.$) {
      case "pid":
        return this.slot(r.i ?? 0).pid;
      case "port":
        // A sleeper holds no port: 1, which nobody holds.
        return this.slot(r.i ?? 0).port ?? 1;
      case "dir":
        return this.slot(r.i ?? 0).dir;
      case "sleeper":
        return this.sleeperPid;
      case "daemon":
        return process.pid;
      case "recent":
        return this.recent.at(-1 - ((r.i ?? 0) % Math.max(1, this.recent.length))) ?? "fz-none";
      case "cursor":
        return this.lastCursor ?? "MQ";
      case "root":
        return root;
      case "under":
        return `${root}/${r.s ?? ""}`;
      case "escape":
        return `${root}/../victim-dir`;
      case "linked":
        return `${this.places.link}/keep.txt`;
      case "victimDir":
      case "victimFile":
      case "link":
      case "rootsDir":
        return this.places[r.$];
      case "rawseg":
      case "lit":
        return r.s;
      case "deep":
        return `@@DEEP:${r.i}:${r.s}@@`;
      default:
        throw new Error(`unknown ref ${r.$}`);
    }
  }

  materialize(v: unknown): unknown {
    if (Array.isArray(v)) return v.map((x) => this.materialize(x));
    if (v !== null && typeof v === "object") {
      if ("$" in v) return this.resolve(v as Ref);
      // fromEntries defines own properties: a generated "__proto__" key stays a key.
      return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, this.materialize(x)]));
    }
    return v;
  }

  wire(s: RequestSpec): Wire {
    let p = "";
    for (const part of s.path) {
      if (typeof part === "string") p += part;
      else p += part.$ === "rawseg" ? (part.s ?? "") : enc(String(this.resolve(part)));
    }
    if (typeof s.query === "string") p += `?${s.query}`;
    else if (s.query !== null && s.query.length > 0) {
      p += `?${s.query.map(([k, v]) => `${enc(k)}=${enc(String(this.materialize(v)))}`).join("&")}`;
    }
    const headers: Record<string, string> = { host: "localhost", ...s.headers };
    if (s.contentType !== null) headers["content-type"] = s.contentType;
    let body: Buffer | null = null;
    if (s.body?.kind === "raw") body = Buffer.from(s.body.text, "utf8");
    else if (s.body?.kind === "bytes") body = Buffer.from(s.body.bytes);
    else if (s.body?.kind === "json") body = jsonText(this.materialize(s.body.json), s.body.mutation, s.body.padTo);
    // Always framed by a content-length: node sends GET and DELETE bodies unframed otherwise.
    if (body !== null) headers["content-length"] = String(body.length);
    return { method: s.method, path: p, headers, body };
  }

  observe(s: RequestSpec, w: Wire, a: Answer): void {
    let body: unknown;
    try {
      body = JSON.parse(a.text);
    } catch {
      return;
    }
    // Only a registration answers 201, whatever route the generator meant.
    if (w.method === "POST" && a.status === 201) {
      const id = (body as { id: string }).id;
      assert.ok(!this.registered.has(id), `registered twice: ${id}`);
      this.registered.add(id);
      this.recent.push(id);
      if (this.recent.length > 16) this.recent.shift();
    }
    if (s.route === "GET /v1/sessions" && a.status === 200 && w.method === "GET") {
      this.lastCursor = (body as { next: string | null }).next ?? this.lastCursor;
    }
  }
}

/** The body's text: JSON with the deep placeholders spliced in, then the mutation, then padding. */
function jsonText(value: unknown, [kind, n]: [string, number], padTo: number | null): Buffer {
  let v = value;
  if (kind === "array") v = [v];
  if (kind === "null") v = null;
  if (kind === "noEngine" && v !== null && typeof v === "object") {
    v = Object.fromEntries(Object.entries(v).filter(([k]) => k !== "engine"));
  }
  if (kind === "unknownKey" && v !== null && typeof v === "object") v = { ...v, unknown: n };
  let text = JSON.stringify(v) ?? "null";
  text = text.replace(/"@@DEEP:(\d+):([[{])@@"/g, (_m, depth: string, k: string) => {
    const d = Number(depth);
    return k === "[" ? "[".repeat(d) + "1" + "]".repeat(d) : '{"a":'.repeat(d) + "1" + "}".repeat(d);
  });
  const obj = text.startsWith("{") && text.length > 2;
  switch (kind) {
    case "proto":
      if (obj) text = `{"__proto__":{"engine":{"pid":2}},${text.slice(1)}`;
      break;
    case "protoNested":
      text = text.replace(/"engine":\{/, '"engine":{"__proto__":{"pid":2},');
      break;
    case "constructor":
      if (obj) text = `{"constructor":{"prototype":{"admin":true}},${text.slice(1)}`;
      break;
    case "truncate":
      text = text.slice(0, n % Math.max(1, text.length));
      break;
    case "trailing":
      text += ["}", ",", "x", "{}", "\u0000"][n % 5] as string;
      break;
    case "bom":
      text = `\ufeff${text}`;
      break;
    case "dupKey":
      if (obj) text = `{"engine":{"pid":1},${text.slice(1)}`;
      break;
    case "singleQuotes":
      text = text.replace(/"/g, "'");
      break;
    case "nan":
      text = text.replace(/:(-?\d+(\.\d+)?)/, ":NaN");
      break;
  }
  let buf = Buffer.from(text, "utf8");
  if (kind === "badUtf8")
    buf = Buffer.concat([
      buf.subarray(0, n % Math.max(1, buf.length)),
      Buffer.from([0xff, 0xc0, 0x80, 0xed, 0xa0, 0x80]),
      buf.subarray(n % Math.max(1, buf.length)),
    ]);
  if (padTo !== null && buf.length < padTo) buf = Buffer.concat([buf, Buffer.alloc(padTo - buf.length, 0x20)]);
  return buf;
}

// --- transport ----------------------------------------------------------------------------

function sendOnce(socketPath: string, agent: Agent, w: Wire): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = request(
      { socketPath, agent, method: w.method, path: w.path, headers: w.headers, timeout: 15_000 },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (d: Buffer) => chunks.push(d));
        res.on("end", () =>
          resolve({ status: res.statusCode ?? 0, headers: res.headers, text: Buffer.concat(chunks).toString("utf8") }),
        );
        res.on("error", reject);
      },
    );
    req.on("timeout", () => req.destroy(Object.assign(new Error("no answer within 15 s"), { code: "ETIMEDOUT" })));
    req.on("error", (err: NodeJS.ErrnoException) => reject(Object.assign(err, { reused: req.reusedSocket })));
    req.end(w.body ?? undefined);
  });
}

/**
 * One request on the keep-alive connection. A connection the daemon closed after its last
 * answer may fail on reuse (the close raced the next write): that request is sent again
 * once, on a new connection, as Node's documentation advises.
 */
async function send(socketPath: string, agent: Agent, w: Wire): Promise<Answer> {
  try {
    return await sendOnce(socketPath, agent, w);
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { reused?: boolean };
    if (!e.reused || (e.code !== "ECONNRESET" && e.code !== "EPIPE")) throw err;
    return sendOnce(socketPath, agent, w);
  }
}

const show = (w: Wire): string =>
  `${w.method} ${w.path.length > 200 ? `${w.path.slice(0, 200)}…(${w.path.length})` : w.path} ${JSON.stringify(w.headers).slice(0, 300)} body=${
    w.body === null
      ? "none"
      : w.body.length > 300
        ? `${JSON.stringify(w.body.subarray(0, 300).toString("utf8"))}…(${w.body.length} bytes)`
        : JSON.stringify(w.body.toString("utf8"))
  }`;

// --- the test -----------------------------------------------------------------------------

test("fuzz: 10,000 generated requests: no 5xx, stable error envelopes, healthy daemon and a consistent store", async (t) => {
  // A forced GC for the memory figures (node --test runs without --expose-gc).
  setFlagsFromString("--expose-gc");
  const gc = runInNewContext("gc") as () => void;

  // --- places: an allowed root for the engines, victims outside it ------------------------
  // First of the after-hooks (they run in order), before the user's processes are killed: a
  // fixture that exits then is not replaced.
  let stopping = false;
  t.after(() => {
    stopping = true;
  });
  const user = testUser(t);
  const dir = tempDir(t, "sr-fuzz-");
  chmodSync(dir, 0o755);
  const root = join(dir, "engines");
  mkdirSync(root, { mode: 0o1777 });
  chmodSync(root, 0o1777);
  // Outside the allowed root, yet owned by the engines' user: only allowed_roots protects them.
  const victimDir = join(dir, "victim-dir");
  mkdirSync(victimDir);
  writeFileSync(join(victimDir, "keep.txt"), "keep");
  chownSync(victimDir, user.uid, user.gid);
  chownSync(join(victimDir, "keep.txt"), user.uid, user.gid);
  const victimFile = join(dir, "victim.txt");
  writeFileSync(victimFile, "keep");
  chownSync(victimFile, user.uid, user.gid);
  // Inside the root: a symlink to the victim (the user's), and a dir of root's (not the user's).
  const link = join(root, "link");
  symlinkSync(victimDir, link);
  lchownSync(link, user.uid, user.gid);
  const rootsDir = join(root, "roots-dir");
  mkdirSync(rootsDir);
  writeFileSync(join(rootsDir, "keep.txt"), "keep");
  const rootSleeper = sleeper(t, "sleep", ["600"]);

  const safe = { allowed_roots: [root], allowed_uids: [user.uid] };
  const config = testConfig(dir, {
    reaper: { concurrency: 8 },
    profiles: {
      default: {
        ...safe,
        heartbeat_timeout_sec: 2,
        idle_timeout_sec: 3,
        max_lifetime_sec: 0,
        grace_period_sec: 0.3,
        step_timeout_sec: 5,
      },
      batch: {
        ...safe,
        heartbeat_timeout_sec: 3,
        idle_timeout_sec: 3,
        max_lifetime_sec: 4,
        grace_period_sec: 0.3,
        step_timeout_sec: 5,
      },
    },
  });
  // SAFETY, before anything is sent: every profile is fenced to the test user and the temp root.
  for (const [name, p] of Object.entries(config.profiles)) {
    assert.deepEqual(p.allowedUids, [user.uid], `profile ${name}: allowed_uids`);
    assert.deepEqual(p.allowedRoots, [root], `profile ${name}: allowed_roots`);
    assert.ok(user.uid !== 0 && p.closeHook === null && p.releaseHooks.length === 0, `profile ${name}: no hooks`);
    assert.equal(p.orphans, null, `profile ${name}: no orphan matcher`);
  }
  const d = await startDaemon(t, config);
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  t.after(() => agent.destroy());
  const call = (method: string, p: string, body?: unknown): Promise<Answer> =>
    send(d.socket, agent, {
      method,
      path: p,
      headers: body === undefined ? { host: "localhost" } : { host: "localhost", "content-type": "application/json" },
      body: body === undefined ? null : Buffer.from(JSON.stringify(body)),
    });
  const orphans = JSON.parse((await call("GET", "/v1/orphans")).text) as { enabled: boolean };
  assert.equal(orphans.enabled, false, "the orphan sweep is off: it would act on processes the test did not start");

  // Every route of the API is fuzzed.
  const doc = JSON.parse((await call("GET", "/openapi.json")).text) as {
    paths: Record<string, Record<string, unknown>>;
  };
  const documented = Object.entries(doc.paths).flatMap(([p, ops]) =>
    Object.keys(ops).map((m) => `${m.toUpperCase()} ${p}`),
  );
  assert.deepEqual([...documented].sort(), [...ROUTES].sort());

  // --- the engine fixtures, run as the test user; a reaped one is replaced ----------------
  const world = new World({ root, victimDir, victimFile, link, rootsDir }, rootSleeper.pid);
  let engines = 0;
  let sleepers = 0;
  const pending: Promise<void>[] = [];
  const startInto = async (k: number): Promise<void> => {
    let slot: Slot;
    if (k < ENGINES) {
      const e = await startEngine(t, [], join(root, `engine-${engines++}`), { user });
      slot = { pid: e.pid, port: e.port, dir: e.dir as string, exited: e.exited };
    } else {
      const dir = join(root, `sleeper-${sleepers++}`);
      mkdirSync(dir);
      writeFileSync(join(dir, "data"), "x");
      chownSync(dir, user.uid, user.gid);
      chownSync(join(dir, "data"), user.uid, user.gid);
      const child = spawn("sleep", ["600"], { uid: user.uid, gid: user.gid, stdio: "ignore" });
      t.after(() => void child.kill("SIGKILL"));
      const exited = new Promise<void>((r) => child.once("exit", () => r()));
      child.once("error", () => undefined);
      slot = { pid: child.pid ?? 0, port: null, dir, exited };
    }
    world.slots[k] = slot;
    void slot.exited.then(() => {
      if (stopping || (k < ENGINES ? engines >= MAX_ENGINES : sleepers >= MAX_SLEEPERS)) return;
      pending.push(startInto(k).catch(() => undefined));
    });
  };
  for (let k = 0; k < POOL; k++) await startInto(k);

  // --- the run ------------------------------------------------------------------------------
  const stats = new Map<string, Map<number | string, number>>();
  const tally = (route: string, status: number | string): void => {
    const m = stats.get(route) ?? new Map<number | string, number>();
    m.set(status, (m.get(status) ?? 0) + 1);
    stats.set(route, m);
  };
  let cut = 0;
  gc();
  const before = process.memoryUsage();
  const seed =
    process.env.FUZZ_SEED === undefined
      ? (Date.now() ^ (Math.random() * 0x7fffffff)) | 0
      : Number(process.env.FUZZ_SEED);
  t.diagnostic(`seed ${seed} (replay: FUZZ_SEED=${seed})`);
  const t0 = performance.now();

  await fc.assert(
    fc.asyncProperty(requestArb, async (s) => {
      const w = world.wire(s);
      // Bytes outside printable ASCII in the request target are malformed HTTP too.
      const rough = s.rough || /[^\x21-\x7e]/.test(w.path);
      let a: Answer;
      try {
        a = await send(d.socket, agent, w);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        // A request malformed at the HTTP level may be cut off instead of answered, or answered
        // in a way the client cannot parse (a 400 with a body to a HEAD request).
        const cutOff = code === "ECONNRESET" || code === "EPIPE" || code?.startsWith("HPE_") === true;
        assert.ok(rough && cutOff, `${show(w)} → transport error ${String(err)}`);
        cut++;
        tally(s.route, code);
        a = { status: 0, headers: {}, text: "" };
      }
      if (a.status !== 0) {
        let code: unknown;
        try {
          code = (JSON.parse(a.text) as { error?: { code?: unknown } }).error?.code;
        } catch {
          code = undefined;
        }
        tally(s.route, typeof code === "string" ? `${a.status} ${code}` : a.status);
        const what = `${show(w)} → ${a.status} ${a.text.slice(0, 500)}`;
        assert.ok(a.status >= 200 && a.status < 500, `5xx or odd status: ${what}`);
        if (a.status >= 400 && w.method !== "HEAD") {
          let body: unknown;
          assert.doesNotThrow(() => (body = JSON.parse(a.text)), `error body is not JSON: ${what}`);
          const error = (body as { error?: { code?: unknown; message?: unknown } }).error;
          assert.ok(error !== null && typeof error === "object", `no error envelope: ${what}`);
          assert.ok(API_ERROR_CODES.includes(error.code as ErrorCode), `code not in src/errors.ts: ${what}`);
          assert.equal(ERRORS[error.code as ErrorCode].status, a.status, `status differs from the code's: ${what}`);
          assert.equal(typeof error.message, "string", `no message: ${what}`);
        }
        world.observe(s, w, a);
      }
      const health = await call("GET", "/healthz");
      assert.equal(health.status, 200, `/healthz after ${show(w)}: ${health.status} ${health.text}`);
    }),
    { numRuns: NUM_RUNS, seed, includeErrorInReport: true },
  );
  const seconds = (performance.now() - t0) / 1000;

  // --- drain: reap whatever is live, wait for every reap to finish -----------------------
  stopping = true;
  await Promise.allSettled(pending);
  const counts = async () =>
    (JSON.parse((await call("GET", "/v1/daemon")).text) as { counts: Record<"live" | "reaping" | "reaped", number> })
      .counts;
  await until(
    async () => {
      const page = JSON.parse((await call("GET", "/v1/sessions?state=live&limit=1000")).text) as {
        sessions: { id: string }[];
      };
      for (const s of page.sessions) await call("POST", `/v1/sessions/${enc(s.id)}/reap`);
      const c = await counts();
      return c.live === 0 && c.reaping === 0;
    },
    60_000,
    "every session reaped",
  );
  const final = await counts();
  gc();
  const after = process.memoryUsage();
  const mb = (n: number): string => (n / 1048576).toFixed(1);
  t.diagnostic(
    `${NUM_RUNS} requests in ${seconds.toFixed(1)} s (${((NUM_RUNS * 2) / seconds).toFixed(0)} req/s with the /healthz checks)`,
  );
  t.diagnostic(
    `heapUsed ${mb(before.heapUsed)} → ${mb(after.heapUsed)} MB, rss ${mb(before.rss)} → ${mb(after.rss)} MB (after a forced GC)`,
  );
  t.diagnostic(
    `sessions: ${world.registered.size} registered, ${final.reaped} reaped; fixtures started: ${engines} engines, ${sleepers} sleepers; cut connections: ${cut}`,
  );
  for (const [route, m] of [...stats].sort(([a], [b]) => a.localeCompare(b))) {
    t.diagnostic(`${route}: ${[...m].map(([st, n]) => `${st}×${n}`).join(" ")}`);
  }
  assert.ok(after.heapUsed - before.heapUsed < 150 * 1048576, "heap growth under 150 MB");
  assert.ok(world.registered.size > 0 && final.reaped > 0, "some registrations succeeded and were reaped");
  const errors = d.lines.filter((l) => l.includes("unexpected error in a request") || l.includes("non-error thrown"));
  assert.deepEqual(errors, [], "no unexpected error in a request in the daemon's log");

  // --- the store, read-only, once the daemon has stopped ---------------------------------
  await d.stop();
  const db = new Database(config.store.path, { readonly: true, fileMustExist: true });
  t.after(() => db.close());
  const rows = (sql: string): unknown[] => db.prepare(sql).all();
  assert.deepEqual(rows("PRAGMA integrity_check"), [{ integrity_check: "ok" }]);
  assert.deepEqual(rows("PRAGMA foreign_key_check"), []);
  assert.deepEqual(rows("SELECT id FROM sessions WHERE state <> 'reaped'"), [], "every session reaped, none stuck");
  assert.deepEqual(
    rows("SELECT id FROM sessions WHERE state <> 'live' AND reason IS NULL"),
    [],
    "every non-live session has a reason",
  );
  assert.deepEqual(
    rows(`SELECT id FROM sessions s WHERE state = 'reaped' AND (outcome IS NULL OR reaped_at IS NULL
            OR (SELECT COUNT(*) FROM audit_events e WHERE e.session_id = s.id AND e.event = 'reap.finished') <> 1
            OR NOT EXISTS (SELECT 1 FROM reap_steps r WHERE r.session_id = s.id AND r.name = 'finish'))`),
    [],
    "every reaped session has an outcome, exactly one reap.finished event and a finish step",
  );
  assert.deepEqual(
    rows(`SELECT session_id FROM audit_events e WHERE event = 'session.registered'
            AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = e.session_id)`),
    [],
    "every session.registered event's session exists",
  );
  assert.deepEqual(
    rows(`SELECT id FROM sessions s
            WHERE (SELECT COUNT(*) FROM audit_events e WHERE e.session_id = s.id AND e.event = 'session.registered') <> 1`),
    [],
    "every session was registered exactly once",
  );
  assert.deepEqual(
    rows(
      "SELECT DISTINCT session_id FROM reap_steps r WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = r.session_id)",
    ),
    [],
    "no reap step of an unknown session",
  );
  const stored = (rows("SELECT id FROM sessions") as { id: string }[]).map((r) => r.id).sort();
  assert.deepEqual(stored, [...world.registered].sort(), "the stored sessions are exactly the ones answered 201");

  // --- nothing outside the fence was touched ----------------------------------------------
  assert.ok(existsSync("/proc/1/stat"), "pid 1 is alive");
  assert.equal(isGone(rootSleeper.pid), false, "root's sleeper is alive");
  assert.ok(
    existsSync(join(victimDir, "keep.txt")) && existsSync(victimFile),
    "the victims outside the allowed root exist",
  );
  assert.ok(existsSync(join(rootsDir, "keep.txt")), "root's dir inside the allowed root exists (not the engines' uid)");
});
