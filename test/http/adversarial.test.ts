/**
 * The adversarial input suite: every request here is hostile or malformed, and each must be
 * answered 4xx with its stable code, signal nothing (the real processes it names are alive
 * afterwards) and delete nothing (the real files it names exist afterwards). Over the real
 * unix socket, as root (an admin: the widest power the API gives), so what is refused here
 * is refused for everyone. Cross-user cases are in test/auth/policy.test.ts, loopback TCP in
 * test/auth/tcp.test.ts.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { chownSync, existsSync, mkdirSync, readdirSync, symlinkSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { join } from "node:path";
import { test } from "node:test";
import { callApi } from "../../src/client/transport.js";
import { ERRORS } from "../../src/errors.js";
import { isKernelThread, readStat } from "../../src/proc/stat.js";
import { isGone, startDaemon, startEngine, tempDir, testConfig } from "../helpers.js";

type Answer = { status: number; body: { error?: { code?: string; message?: string } } };

/** The first kernel thread in /proc (kthreadd is pid 2 on every Linux, but look rather than assume). */
function kernelThread(): number {
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    const st = readStat(Number(name));
    if (st !== null && isKernelThread(st)) return st.pid;
  }
  throw new Error("no kernel thread found in /proc");
}

async function expectRefused(what: string, answer: Promise<Answer>, status: number, code: string) {
  const res = await answer;
  assert.equal(res.status, status, `${what}: ${JSON.stringify(res.body)}`);
  assert.equal(res.body.error?.code, code, `${what}: ${JSON.stringify(res.body)}`);
  assert.ok(code in ERRORS, `${what}: ${code} is a documented code`);
  assert.equal(typeof res.body.error?.message, "string");
}

/** A daemon, a real engine (port + temp dir with a file), a victim dir outside it, and the root. */
async function arena(t: Parameters<typeof tempDir>[0]) {
  const dir = tempDir(t);
  const root = join(dir, "root");
  mkdirSync(root);
  const d = await startDaemon(t, testConfig(dir, { profiles: { default: { allowed_roots: [root] } } }));
  const engine = await startEngine(t, [], join(root, "engine-dir"));
  const victim = join(dir, "victim");
  mkdirSync(victim);
  writeFileSync(join(victim, "precious"), "do not delete");
  const register = (body: Record<string, unknown>) =>
    callApi(d.socket, "POST", "/v1/sessions", { engine: { pid: engine.pid }, heartbeatTimeoutSec: 1, ...body });
  const untouched = async () => {
    assert.equal(isGone(engine.pid), false, "the engine was not signalled");
    assert.ok(existsSync(join(engine.dir as string, "marker")) || existsSync(engine.dir as string), "engine dir kept");
    assert.ok(existsSync(join(victim, "precious")), "the victim file exists");
    const list = await callApi<{ sessions: unknown[] }>(d.socket, "GET", "/v1/sessions");
    assert.deepEqual(list.body.sessions, [], "nothing was registered");
  };
  return { dir, root, d, engine, victim, register, untouched };
}

test("pids: 0, 1, -1, 2^31, the daemon, a kernel thread, non-integers: refused, nothing signalled", async (t) => {
  const { d, register, untouched } = await arena(t);
  const kthread = kernelThread();
  const invalid: [string, unknown][] = [
    ["0", 0],
    ["1", 1],
    ["-1", -1],
    ["2^31", 2 ** 31],
    ["2^53", 2 ** 53],
    ["the daemon", process.pid],
    ["a kernel thread", kthread],
    ["1.5", 1.5],
  ];
  for (const [what, pid] of invalid) {
    await expectRefused(`engine.pid ${what}`, register({ engine: { pid } }) as Promise<Answer>, 400, "SR_INVALID_PID");
    await expectRefused(`ownerPid ${what}`, register({ ownerPid: pid }) as Promise<Answer>, 400, "SR_INVALID_PID");
  }
  await expectRefused(
    "1e400 (Infinity in JSON.parse)",
    callApi(d.socket, "POST", "/v1/sessions", undefined, { rawBody: '{"engine":{"pid":1e400}}' }),
    400,
    "SR_BAD_REQUEST",
  );
  // Strings, blanks, hex, null, booleans, arrays: not numbers at all.
  for (const pid of ["0x10", " 12 ", "", "12", null, true, [12], { pid: 12 }]) {
    await expectRefused(
      `pid ${JSON.stringify(pid)}`,
      register({ engine: { pid } }) as Promise<Answer>,
      400,
      "SR_BAD_REQUEST",
    );
  }
  // A pid no process has.
  const unused = 4194000;
  assert.equal(readStat(unused), null);
  await expectRefused(
    "an unused pid",
    register({ engine: { pid: unused } }) as Promise<Answer>,
    400,
    "SR_PROCESS_NOT_FOUND",
  );
  assert.equal(isGone(kthread), false);
  await untouched();
});

test("paths: /, /etc, .., relative, a symlink, a symlinked parent, another user's dir, a root, a bind mount", async (t) => {
  const { dir, root, register, untouched, victim } = await arena(t);
  const others = join(root, "others");
  mkdirSync(others);
  writeFileSync(join(others, "theirs"), "x");
  chownSync(others, 12345, 12345);
  symlinkSync(victim, join(root, "link"));
  const parentLink = join(root, "parent-link");
  symlinkSync(dir, parentLink);
  // A bind mount of the victim inside the allowed root, and one below a registered path: same
  // file system, same st_dev, so only the mount table tells (rm --one-file-system would not).
  const bind = join(root, "bind");
  const holder = join(root, "holder");
  mkdirSync(bind);
  mkdirSync(join(holder, "inner"), { recursive: true });
  execFileSync("mount", ["--bind", victim, bind]);
  execFileSync("mount", ["--bind", victim, join(holder, "inner")]);

  const cases: [string, string, string][] = [
    ["/", "/", "SR_INVALID_PATH"],
    ["/etc", "/etc", "SR_PATH_OUTSIDE_ROOT"],
    ["..", "..", "SR_INVALID_PATH"],
    ["relative", "engine-dir/x", "SR_INVALID_PATH"],
    ["dot-dot inside", `${root}/../victim`, "SR_INVALID_PATH"],
    ["trailing slash", `${root}/engine-dir/`, "SR_INVALID_PATH"],
    ["a NUL byte", `${root}/a\u0000b`, "SR_INVALID_PATH"],
    ["outside every root", victim, "SR_PATH_OUTSIDE_ROOT"],
    ["a prefix that is not a parent", `${root}x/y`, "SR_PATH_OUTSIDE_ROOT"],
    ["an allowed root itself", root, "SR_INVALID_PATH"],
    ["a symlink", join(root, "link"), "SR_PATH_SYMLINK"],
    ["below a symlink", join(root, "link", "precious"), "SR_PATH_SYMLINK"],
    ["below a symlinked parent", join(parentLink, "victim"), "SR_PATH_SYMLINK"],
    ["another user's dir", others, "SR_PATH_NOT_OWNED"],
    ["a bind mount", bind, "SR_PATH_OTHER_FS"],
    ["inside a bind mount", join(bind, "precious"), "SR_PATH_OTHER_FS"],
    ["a dir with a bind mount below it", holder, "SR_PATH_OTHER_FS"],
    ["/proc", "/proc/1", "SR_PATH_OUTSIDE_ROOT"],
  ];
  for (const [what, path, code] of cases) {
    await expectRefused(`path ${what}`, register({ paths: [path] }) as Promise<Answer>, 400, code);
  }
  await expectRefused(
    "a path too long",
    register({ paths: [`${root}/${"a".repeat(5000)}`] }) as Promise<Answer>,
    400,
    "SR_LIMIT_EXCEEDED",
  );
  await expectRefused("a path not a string", register({ paths: [42] }) as Promise<Answer>, 400, "SR_BAD_REQUEST");
  await untouched();
  assert.ok(existsSync(join(others, "theirs")));
  assert.ok(existsSync(join(bind, "precious")), "the bind mount's content is intact");
});

test("ports: held by another process, out of range, not integers: refused", async (t) => {
  const { root, register, untouched } = await arena(t);
  const outsider = await startEngine(t, [], join(root, "outsider"));
  await expectRefused(
    "a port another process holds",
    register({ ports: [outsider.port] }) as Promise<Answer>,
    400,
    "SR_PORT_NOT_OWNED",
  );
  for (const port of [0, -1, 65536, 1.5, "80", null]) {
    await expectRefused(
      `port ${JSON.stringify(port)}`,
      register({ ports: [port] }) as Promise<Answer>,
      400,
      "SR_BAD_REQUEST",
    );
  }
  const many = Array.from({ length: 65 }, (_, i) => 1024 + i);
  await expectRefused("65 ports", register({ ports: many }) as Promise<Answer>, 400, "SR_LIMIT_EXCEEDED");
  assert.equal(isGone(outsider.pid), false);
  await untouched();
});

test("bodies: oversized, malformed, wrong types, unknown fields, deep JSON, prototype keys, caps", async (t) => {
  const { d, engine, untouched } = await arena(t);
  const raw = (body: string, contentType = "application/json", path = "/v1/sessions", method = "POST") =>
    callApi(d.socket, method, path, undefined, {
      rawBody: body,
      headers: { "content-type": contentType },
    }) as Promise<Answer>;
  const valid = JSON.stringify({ engine: { pid: engine.pid }, heartbeatTimeoutSec: 1 });

  // 16 KiB is the default cap.
  const padded = JSON.stringify({ engine: { pid: engine.pid }, owner: "x", labels: { a: "b".repeat(20_000) } });
  await expectRefused("a 20 KiB body", raw(padded), 413, "SR_BODY_TOO_LARGE");
  await expectRefused("1 MiB of garbage", raw("x".repeat(1 << 20)), 413, "SR_BODY_TOO_LARGE");
  await expectRefused("truncated JSON", raw(valid.slice(0, -3)), 400, "SR_INVALID_JSON");
  await expectRefused("not JSON", raw("engine=1"), 400, "SR_INVALID_JSON");
  await expectRefused("empty body", raw(""), 400, "SR_INVALID_JSON");
  await expectRefused("text/plain", raw(valid, "text/plain"), 415, "SR_UNSUPPORTED_MEDIA_TYPE");
  await expectRefused(
    "a form",
    raw("engine.pid=5", "application/x-www-form-urlencoded"),
    415,
    "SR_UNSUPPORTED_MEDIA_TYPE",
  );
  await expectRefused("multipart", raw(valid, "multipart/form-data; boundary=x"), 415, "SR_UNSUPPORTED_MEDIA_TYPE");
  await expectRefused("a JSON array", raw("[1,2,3]"), 400, "SR_BAD_REQUEST");
  await expectRefused("a JSON string", raw('"engine"'), 400, "SR_BAD_REQUEST");
  await expectRefused("null", raw("null"), 400, "SR_BAD_REQUEST");
  await expectRefused(
    "an unknown field",
    raw(JSON.stringify({ engine: { pid: engine.pid }, command: ["rm", "-rf", "/"] })),
    400,
    "SR_BAD_REQUEST",
  );
  await expectRefused(
    "an unknown nested field",
    raw(JSON.stringify({ engine: { pid: engine.pid, uid: 0 } })),
    400,
    "SR_BAD_REQUEST",
  );
  await expectRefused(
    "a close hook from the API",
    raw(JSON.stringify({ engine: { pid: engine.pid }, closeHook: "/x" })),
    400,
    "SR_BAD_REQUEST",
  );
  const deep = "[".repeat(5000) + "]".repeat(5000);
  await expectRefused(
    "5,000 nested arrays",
    raw(`{"engine":{"pid":${engine.pid}},"labels":{"a":${deep}}}`),
    400,
    "SR_BAD_REQUEST",
  );
  await expectRefused(
    "a __proto__ key",
    raw(`{"engine":{"pid":${engine.pid}},"__proto__":{"admin":true}}`),
    400,
    "SR_INVALID_JSON",
  );
  await expectRefused(
    "a constructor.prototype key",
    raw(`{"engine":{"pid":${engine.pid}},"constructor":{"prototype":{"admin":true}}}`),
    400,
    "SR_INVALID_JSON",
  );
  const labels = Object.fromEntries(Array.from({ length: 65 }, (_, i) => [`k${i}`, "v"]));
  await expectRefused(
    "65 labels",
    raw(JSON.stringify({ engine: { pid: engine.pid }, labels })),
    400,
    "SR_LIMIT_EXCEEDED",
  );
  await expectRefused(
    "a label value too long",
    raw(JSON.stringify({ engine: { pid: engine.pid }, labels: { a: "v".repeat(300) } })),
    400,
    "SR_LIMIT_EXCEEDED",
  );
  await expectRefused(
    "a bad label key",
    raw(JSON.stringify({ engine: { pid: engine.pid }, labels: { "../x": "v" } })),
    400,
    "SR_BAD_REQUEST",
  );
  await expectRefused(
    "an id with a slash",
    raw(JSON.stringify({ id: "../x", engine: { pid: engine.pid } })),
    400,
    "SR_BAD_REQUEST",
  );
  await expectRefused(
    "a negative timeout",
    raw(JSON.stringify({ engine: { pid: engine.pid }, heartbeatTimeoutSec: -5 })),
    400,
    "SR_BAD_REQUEST",
  );
  await expectRefused(
    "a heartbeat with a bad activity",
    raw('{"activity":"asleep"}', "application/json", "/v1/sessions/x/heartbeat"),
    400,
    "SR_BAD_REQUEST",
  );
  await expectRefused(
    "a reap with a body",
    raw('{"reason":"closed"}', "application/json", "/v1/sessions/x/reap"),
    400,
    "SR_BAD_REQUEST",
  );
  await untouched();
});

test("query strings and ids: integers are plain decimals, anything else is refused", async (t) => {
  const { d, untouched } = await arena(t);
  const get = (path: string) => callApi(d.socket, "GET", path) as Promise<Answer>;
  for (const limit of ["0x10", "%2012%20", "1.5", "", "1e3", "-1", "0", "1001", "010", "+5", "5;6", "5&limit=6"]) {
    await expectRefused(`limit=${limit}`, get(`/v1/sessions?limit=${limit}`), 400, "SR_BAD_REQUEST");
  }
  for (const within of ["0x10", "1e3", " 1", "NaN", "Infinity", "-5"]) {
    await expectRefused(
      `withinSec=${within}`,
      get(`/v1/expiring?withinSec=${encodeURIComponent(within)}`),
      400,
      "SR_BAD_REQUEST",
    );
  }
  assert.equal((await get("/v1/sessions?limit=12")).status, 200);
  assert.equal((await get("/v1/expiring?withinSec=30")).status, 200);
  await expectRefused("an unknown query key", get("/v1/sessions?admin=1"), 400, "SR_BAD_REQUEST");
  await expectRefused("a bad cursor", get("/v1/sessions?cursor=AAAA"), 400, "SR_INVALID_CURSOR");
  await expectRefused("an unknown session", get("/v1/sessions/nope"), 404, "SR_SESSION_NOT_FOUND");
  await expectRefused("an id with dots", get("/v1/sessions/..%2F..%2Fetc"), 400, "SR_BAD_REQUEST");
  await expectRefused("an unknown route", get("/v1/admin"), 404, "SR_ROUTE_NOT_FOUND");
  for (const path of ["/v1/sessions/nope/heartbeat", "/v1/sessions/nope/reap"]) {
    await expectRefused(`POST ${path}`, callApi(d.socket, "POST", path), 404, "SR_SESSION_NOT_FOUND");
  }
  await expectRefused("DELETE unknown", callApi(d.socket, "DELETE", "/v1/sessions/nope"), 404, "SR_SESSION_NOT_FOUND");
  await untouched();
});

test("a long run of refused requests leaves the socket, the database and the engine as they were", async (t) => {
  const { d, engine } = await arena(t);
  // The daemon keeps serving after every kind of refusal, and owns no session it refused.
  for (let i = 0; i < 200; i++) {
    const res = await callApi(d.socket, "POST", "/v1/sessions", { engine: { pid: [0, 1, -1, process.pid][i % 4] } });
    assert.equal(res.status, 400);
  }
  assert.equal((await callApi(d.socket, "GET", "/healthz")).status, 200);
  const counts = await callApi<{ counts: Record<string, number> }>(d.socket, "GET", "/v1/daemon");
  assert.deepEqual(counts.body.counts, { live: 0, reaping: 0, reaped: 0 });
  // The same engine registers fine afterwards, and is reaped only by its own session.
  const ok = await callApi(d.socket, "POST", "/v1/sessions", { id: "fine", engine: { pid: engine.pid } });
  assert.equal(ok.status, 201);
  assert.equal(isGone(engine.pid), false);
  assert.equal((await callApi(d.socket, "DELETE", "/v1/sessions/fine")).status, 202);
  await d.reaped("fine");
  assert.equal(isGone(engine.pid), true);
});

test("a bind mount that appears below a registered path after registration: the delete is refused", async (t) => {
  const { d, engine, victim } = await arena(t);
  const res = await callApi(d.socket, "POST", "/v1/sessions", {
    id: "later-mount",
    engine: { pid: engine.pid },
    paths: [engine.dir],
  });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  const inner = join(engine.dir as string, "inner");
  mkdirSync(inner);
  execFileSync("mount", ["--bind", victim, inner]);
  assert.equal((await callApi(d.socket, "DELETE", "/v1/sessions/later-mount")).status, 202);
  const done = await d.reaped("later-mount");
  assert.equal(done.outcome, "partial");
  assert.equal(isGone(engine.pid), true);
  assert.ok(existsSync(join(victim, "precious")), "nothing below the mount was deleted");
  const session = await callApi<{ leftovers: { kind: string; detail: string }[] }>(
    d.socket,
    "GET",
    "/v1/sessions/later-mount",
  );
  assert.ok(
    session.body.leftovers.some((l) => l.kind === "path" && /mount point/.test(l.detail)),
    JSON.stringify(session.body.leftovers),
  );
});

test("found by the fuzzer: inherited profile names, 128-character ids, bad percent-encoding, malformed HTTP", async (t) => {
  const { d, engine, register, untouched } = await arena(t);
  for (const profile of ["__proto__", "constructor", "toString", "hasOwnProperty"]) {
    await expectRefused(`profile ${profile}`, register({ profile }) as Promise<Answer>, 400, "SR_UNKNOWN_PROFILE");
  }
  await expectRefused("%ZZ in the path", callApi(d.socket, "GET", "/v1/sessions/%ZZ"), 400, "SR_BAD_REQUEST");
  const raw = (text: string) =>
    new Promise<string>((resolve) => {
      const sock = connect(d.socket, () => sock.write(text));
      let out = "";
      sock.setEncoding("utf8").on("data", (s: string) => (out += s));
      sock.on("close", () => resolve(out));
      sock.on("error", () => resolve(out));
    });
  for (const request of [
    "FOO / HTTP/1.1\r\nHost: x\r\n\r\n",
    "POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
  ]) {
    const answer = await raw(request);
    assert.match(answer, /^HTTP\/1\.1 400 /, JSON.stringify(request));
    assert.match(answer, /"code":"SR_BAD_REQUEST"/);
  }
  const head = await raw(`GET /v1/sessions HTTP/1.1\r\nHost: x\r\nX-Big: ${"a".repeat(20_000)}\r\n\r\n`);
  assert.match(head, /^HTTP\/1\.1 431 [^]*"code":"SR_HEADERS_TOO_LARGE"/);
  await untouched();
  // The longest id the API accepts is usable in every route.
  const id = "a".repeat(128);
  assert.equal((await callApi(d.socket, "POST", "/v1/sessions", { id, engine: { pid: engine.pid } })).status, 201);
  assert.equal((await callApi(d.socket, "GET", `/v1/sessions/${id}`)).status, 200);
  assert.equal((await callApi(d.socket, "POST", `/v1/sessions/${id}/heartbeat`)).status, 200);
  assert.equal((await callApi(d.socket, "GET", `/v1/sessions/${id}/events`)).status, 200);
});
