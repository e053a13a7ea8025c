/**
 * Caller identity and policy, with real users: the daemon reads each connection's peer
 * credentials (SO_PEERCRED), and these tests call it from processes running as second users
 * created with useradd. Every refusal must answer its stable code, signal nothing (the target
 * processes are alive afterwards) and delete nothing (the files exist afterwards).
 */
import assert from "node:assert/strict";
import { chmodSync, existsSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import pino from "pino";
import { addon } from "../../src/native/addon.js";
import { identify } from "../../src/proc/identity.js";
import { ownCgroup } from "../../src/proc/cgroup.js";
import { signalProcess } from "../../src/proc/signal.js";
import {
  apiAs,
  isGone,
  sleeper,
  startDaemon,
  startEngine,
  tempDir,
  testConfig,
  testGroup,
  testUser,
  type TestUser,
} from "../helpers.js";

type Json = Record<string, unknown>;
const code = (body: unknown): unknown => (body as { error?: { code?: string } }).error?.code;

/** A daemon whose socket and allowed root every test user can reach. */
async function setup(t: Parameters<typeof tempDir>[0], doc: Record<string, unknown> = {}) {
  const dir = tempDir(t);
  chmodSync(dir, 0o755);
  const root = join(dir, "engines");
  mkdirSync(root, { mode: 0o1777 });
  chmodSync(root, 0o1777);
  const config = testConfig(dir, {
    ...doc,
    api: { socket_mode: "0666", ...(doc.api as object) },
    profiles: { default: { allowed_roots: [root] }, ...(doc.profiles as object) },
  });
  const d = await startDaemon(t, config);
  return { dir, root, d };
}

/** An engine fixture running as `user`, with a port and a temp dir of its own under `root`. */
async function engineOf(t: Parameters<typeof tempDir>[0], user: TestUser, root: string) {
  const dir = join(root, `${user.name}-${Math.random().toString(36).slice(2, 8)}`);
  const engine = await startEngine(t, [], dir, { user });
  return { ...engine, dir };
}

test("the daemon sees the connecting process's uid (SO_PEERCRED) and records who registered", async (t) => {
  assert.ok(addon, "the native addon is built by npm ci");
  const user = testUser(t);
  const { d } = await setup(t);
  const client = apiAs(t, user, d.socket);
  const engine = await engineOf(t, user, join(d.socket, "..", "engines"));
  const res = await client.call("POST", "/v1/sessions", { id: "mine", engine: { pid: engine.pid } });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  assert.deepEqual(res.body.registeredBy, { uid: user.uid, admin: false, via: "unix" });
  const ev = await d.waitFor((e) => e.event === "session.registered" && e.sessionId === "mine");
  assert.equal((ev.detail as Json).callerPid !== null, true);
  // Root's own requests are an admin's.
  const own = await d.api("GET", "/v1/sessions/mine");
  assert.equal(own.status, 200);
});

test("a non-admin may register only its own processes, paths and ports", async (t) => {
  const user = testUser(t);
  const { root, d } = await setup(t);
  const client = apiAs(t, user, d.socket);
  const mine = await engineOf(t, user, root);
  const rootsProcess = sleeper(t);
  const rootsEngine = await startEngine(t, [], join(root, "roots-engine"));

  // Another user's process as the engine, or as the owner.
  let res = await client.call("POST", "/v1/sessions", { engine: { pid: rootsProcess.pid }, heartbeatTimeoutSec: 1 });
  assert.equal(res.status, 403);
  assert.equal(code(res.body), "SR_PROCESS_NOT_OWNED");
  res = await client.call("POST", "/v1/sessions", {
    engine: { pid: mine.pid },
    ownerPid: rootsProcess.pid,
    heartbeatTimeoutSec: 1,
  });
  assert.equal(res.status, 403);
  assert.equal(code(res.body), "SR_PROCESS_NOT_OWNED");

  // A path of another user (root's engine dir), below the allowed root.
  res = await client.call("POST", "/v1/sessions", {
    engine: { pid: mine.pid },
    paths: [rootsEngine.dir],
    heartbeatTimeoutSec: 1,
  });
  assert.equal(res.status, 400);
  assert.equal(code(res.body), "SR_PATH_NOT_OWNED");

  // A port another process holds.
  res = await client.call("POST", "/v1/sessions", {
    engine: { pid: mine.pid },
    ports: [rootsEngine.port],
    heartbeatTimeoutSec: 1,
  });
  assert.equal(res.status, 400);
  assert.equal(code(res.body), "SR_PORT_NOT_OWNED");

  // Nothing was registered, signalled or deleted.
  const list = await d.api("GET", "/v1/sessions");
  assert.deepEqual((list.body as { sessions: unknown[] }).sessions, []);
  assert.equal(isGone(rootsProcess.pid), false);
  assert.equal(isGone(rootsEngine.pid), false);
  assert.equal(isGone(mine.pid), false);
  assert.ok(existsSync(rootsEngine.dir as string));

  // Its own engine, port and dir: accepted.
  res = await client.call("POST", "/v1/sessions", {
    id: "own",
    engine: { pid: mine.pid },
    ports: [mine.port],
    paths: [mine.dir],
  });
  assert.equal(res.status, 201, JSON.stringify(res.body));
});

test("only the registering uid or an admin may heartbeat, close or reap a session", async (t) => {
  const alice = testUser(t);
  const bob = testUser(t);
  const { root, d } = await setup(t);
  const asAlice = apiAs(t, alice, d.socket);
  const asBob = apiAs(t, bob, d.socket);
  const engine = await engineOf(t, alice, root);
  const reg = await asAlice.call("POST", "/v1/sessions", {
    id: "alices",
    engine: { pid: engine.pid },
    paths: [engine.dir],
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));

  for (const [method, path] of [
    ["POST", "/v1/sessions/alices/heartbeat"],
    ["DELETE", "/v1/sessions/alices"],
    ["POST", "/v1/sessions/alices/reap"],
  ] as const) {
    const res = await asBob.call(method, path);
    assert.equal(res.status, 403, `${method} ${path}`);
    assert.equal(code(res.body), "SR_NOT_SESSION_OWNER");
  }
  // Still live, nothing signalled, nothing deleted; reads are open.
  const seen = await asBob.call("GET", "/v1/sessions/alices");
  assert.equal(seen.status, 200);
  assert.equal(seen.body.state, "live");
  assert.equal(isGone(engine.pid), false);
  assert.ok(existsSync(engine.dir));

  assert.equal((await asAlice.call("POST", "/v1/sessions/alices/heartbeat", { activity: "idle" })).status, 200);
  assert.equal((await asAlice.call("DELETE", "/v1/sessions/alices")).status, 202);
  const done = await d.reaped("alices");
  assert.equal(done.outcome, "clean");
  assert.equal(isGone(engine.pid), true);
  assert.equal(existsSync(engine.dir), false);
  const closed = await d.waitFor((e) => e.event === "session.closed" && e.sessionId === "alices");
  assert.deepEqual((closed.detail as Json).by, {
    uid: alice.uid,
    pid: (closed.detail as { by: Json }).by.pid,
    via: "unix",
    admin: false,
  });
});

test("root force-reaps any session, and registers another user's process", async (t) => {
  const alice = testUser(t);
  const { root, d } = await setup(t);
  const engine = await engineOf(t, alice, root);
  const reg = await d.api("POST", "/v1/sessions", {
    id: "for-alice",
    engine: { pid: engine.pid },
    paths: [engine.dir],
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  assert.deepEqual((reg.body as Json).registeredBy, { uid: 0, admin: true, via: "unix" });
  const other = await engineOf(t, alice, root);
  const asAlice = apiAs(t, alice, d.socket);
  const hers = await asAlice.call("POST", "/v1/sessions", { id: "hers", engine: { pid: other.pid } });
  assert.equal(hers.status, 201);
  // Alice may heartbeat and close the one she registered, not the one root registered for her.
  assert.equal(code((await asAlice.call("POST", "/v1/sessions/for-alice/heartbeat")).body), "SR_NOT_SESSION_OWNER");
  assert.equal((await d.api("POST", "/v1/sessions/hers/reap")).status, 202);
  assert.equal((await d.reaped("hers")).reason, "forced");
  assert.equal(isGone(other.pid), true);
});

test("members of api.admin_group are admins; allowed_uids binds admins too", async (t) => {
  const admins = testGroup(t);
  const alice = testUser(t);
  const carol = testUser(t, [admins.name]);
  const { root, d } = await setup(t, {
    api: { admin_group: admins.name },
    profiles: { strict: { allowed_uids: [carol.uid] } },
  });
  const engine = await engineOf(t, alice, root);
  const asCarol = apiAs(t, carol, d.socket);
  const res = await asCarol.call("POST", "/v1/sessions", { id: "by-carol", engine: { pid: engine.pid } });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  assert.deepEqual(res.body.registeredBy, { uid: carol.uid, admin: true, via: "unix" });

  // The strict profile manages carol's engines only: not alice's, even for root.
  const refused = await d.api("POST", "/v1/sessions", { profile: "strict", engine: { pid: engine.pid } });
  assert.equal(refused.status, 403);
  assert.equal(code(refused.body), "SR_UID_NOT_ALLOWED");
  assert.equal(isGone(engine.pid), false);
});

test("api.max_sessions_per_uid: 429 past the cap, counted per registering uid, admins exempt", async (t) => {
  const alice = testUser(t);
  const { root, d } = await setup(t, { api: { max_sessions_per_uid: 2 } });
  const asAlice = apiAs(t, alice, d.socket);
  const engine = await engineOf(t, alice, root);
  for (const id of ["a1", "a2"]) {
    assert.equal((await asAlice.call("POST", "/v1/sessions", { id, engine: { pid: engine.pid } })).status, 201);
  }
  const third = await asAlice.call("POST", "/v1/sessions", { id: "a3", engine: { pid: engine.pid } });
  assert.equal(third.status, 429);
  assert.equal(code(third.body), "SR_TOO_MANY_SESSIONS");
  assert.equal((await d.api("GET", "/v1/sessions/a3")).status, 404);
  // Root is not capped; a closed session frees a slot.
  assert.equal((await d.api("POST", "/v1/sessions", { id: "r1", engine: { pid: engine.pid } })).status, 201);
  assert.equal((await asAlice.call("DELETE", "/v1/sessions/a1")).status, 202);
  await d.reaped("a1"); // which ends the shared engine: the next session needs another
  const next = await engineOf(t, alice, root);
  assert.equal((await asAlice.call("POST", "/v1/sessions", { id: "a4", engine: { pid: next.pid } })).status, 201);
});

test("the signal path refuses a process of another uid when the policy names one", (t) => {
  const log = pino({ level: "silent" });
  const victim = sleeper(t);
  const target = identify(victim.pid, "pid", process.pid);
  assert.equal(target.uid, 0);
  assert.equal(signalProcess(target, "SIGKILL", log, process.pid, { onlyUid: 12345 }), "refused");
  assert.equal(isGone(victim.pid), false);
  // The same process with its own uid allowed: signalled.
  assert.equal(signalProcess(target, "SIGKILL", log, process.pid, { onlyUid: 0 }), "sent");
});

test("cgroup.kill is not used for a non-admin session when the cgroup holds another uid's process", (t) => {
  const victim = sleeper(t);
  const st = identify(victim.pid, "pid", process.pid);
  // The test's own cgroup holds root's processes: whatever else it says, a uid filter refuses it.
  const verdict = ownCgroup(st.pid, 0, 12345);
  assert.equal(verdict.usable, false);
});

test("a file the engine's user does not own is never deleted on its behalf", async (t) => {
  const alice = testUser(t);
  const { root, d } = await setup(t);
  const asAlice = apiAs(t, alice, d.socket);
  const engine = await engineOf(t, alice, root);
  // Root puts a directory of its own inside alice's registered dir: rm runs as alice, so
  // what she could not delete herself stays.
  const sub = join(engine.dir, "roots-dir");
  mkdirSync(sub, { mode: 0o755 });
  writeFileSync(join(sub, "keep"), "x");
  chmodSync(sub, 0o755);
  const res = await asAlice.call("POST", "/v1/sessions", {
    id: "dirs",
    engine: { pid: engine.pid },
    paths: [engine.dir],
  });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  assert.equal((await asAlice.call("DELETE", "/v1/sessions/dirs")).status, 202);
  const done = await d.reaped("dirs");
  assert.equal(isGone(engine.pid), true);
  // The dir cannot go while root's subdir (not writable by alice) holds a file: reported.
  assert.ok(existsSync(join(sub, "keep")));
  assert.equal(done.outcome, "partial");
});
