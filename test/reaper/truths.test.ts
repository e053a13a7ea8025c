/**
 * What a reap reports must be what is true of the host afterwards: a leftover the reap could
 * not end (here a root process in a session a non-admin registered, which the session may not
 * signal) keeps what it holds, and the outcome says so, naming what and why. Real users, real
 * processes, real SysV and POSIX shared memory, real cgroups, real directories.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { chmodSync, chownSync, existsSync, mkdirSync, readdirSync, rmdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { test, type TestContext } from "node:test";
import { SESSION_COOKIE } from "../../src/proc/users.js";
import {
  apiAs,
  exited,
  isGone,
  startDaemon,
  startEngine,
  tempDir,
  testConfig,
  testUser,
  until,
  type TestUser,
} from "../helpers.js";

type Leftover = { step: string; kind: string; item: string; detail: string };
type SessionJson = { outcome: string; leftovers: Leftover[] };

/** A daemon whose socket every test user can reach (they register their own sessions). */
async function setup(t: TestContext, doc: Record<string, unknown> = {}) {
  const dir = tempDir(t);
  chmodSync(dir, 0o755);
  const d = await startDaemon(t, testConfig(dir, { ...doc, api: { socket_mode: "0666" } }));
  return { dir, d };
}

/** A session `id` registered by `user` (no admin) for an engine of its own, as the user's client does. */
async function usersSession(t: TestContext, d: Awaited<ReturnType<typeof setup>>["d"], user: TestUser, id: string) {
  const engine = await startEngine(t, [], undefined, { user });
  const client = apiAs(t, user, d.socket);
  const reg = await client.call<{
    registeredBy: { admin: boolean };
    containment: { kind: string; path?: string };
  }>("POST", "/v1/sessions", { id, engine: { pid: engine.pid } });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  assert.equal(reg.body.registeredBy.admin, false);
  return { engine, containment: reg.body.containment, close: () => client.call("DELETE", `/v1/sessions/${id}`) };
}

/**
 * A root process carrying the session's cookie (a setuid helper, a launcher's process that
 * joined the session): the session's, and a non-admin's session may not signal it, so it
 * survives the reap. It attaches a SysV segment it created and maps `file`; prints the shmid.
 */
async function rootSurvivor(t: TestContext, id: string, file: string): Promise<{ pid: number; shmid: string }> {
  const code = `
import ctypes, mmap, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
shmid = libc.shmget(0, 4096, 0o600 | 0o1000)
assert libc.shmat(shmid, None, 0) not in (None, ctypes.c_void_p(-1).value)
f = open(sys.argv[1], "r+b")
m = mmap.mmap(f.fileno(), 0)
print(shmid, flush=True)
time.sleep(300)
`;
  const child = spawn("python3", ["-c", code, file], {
    stdio: ["ignore", "pipe", "inherit"],
    env: { ...process.env, [SESSION_COOKIE]: id },
  });
  t.after(() => void child.kill("SIGKILL"));
  const shmid = await new Promise<string>((resolve, reject) => {
    child.stdout.setEncoding("utf8").once("data", (d: string) => resolve(d.trim()));
    child.once("exit", (c) => reject(new Error(`survivor exited ${c}`)));
  });
  // After the kill above (hooks run in order): the segment goes with its last attacher.
  t.after(() => void spawn("ipcrm", ["-m", shmid], { stdio: "ignore" }));
  return { pid: child.pid as number, shmid };
}

test("IPC a survivor of the session still attaches or maps is an ipc leftover naming it, and ipc is not verified", async (t) => {
  const user = testUser(t);
  const { d } = await setup(t);
  const id = "ipc-survivor";
  const s = await usersSession(t, d, user, id);
  // A POSIX shm file of the engine's user, made during the session (as shm_open would).
  const file = `/dev/shm/sr-truths-${process.pid}-${Date.now()}`;
  writeFileSync(file, "x".repeat(4096));
  chownSync(file, user.uid, user.gid);
  t.after(() => void spawn("rm", ["-f", file], { stdio: "ignore" }));
  const survivor = await rootSurvivor(t, id, file);

  assert.equal((await s.close()).status, 202);
  const finished = await d.reaped(id);
  assert.equal(isGone(s.engine.pid), true);
  assert.equal(isGone(survivor.pid), false, "the session may not signal root's process");
  const got = (await d.api<SessionJson>("GET", `/v1/sessions/${id}`)).body;
  assert.equal(finished.outcome, "partial");
  const ipc = got.leftovers.filter((l) => l.kind === "ipc");
  assert.deepEqual(ipc.map((l) => l.item).sort(), [`posix_shm ${file}`, `sysv_shm ${survivor.shmid}`].sort());
  for (const l of ipc) {
    // Who holds it, and that it was left in place (in use: never pulled from under it).
    assert.match(l.detail, new RegExp(`pid ${survivor.pid} \\([^,]+, uid 0\\), a leftover of the session`), l.detail);
    assert.match(l.detail, /in use: not removed/);
  }
  assert.ok(existsSync(file));
  // The verification found them as well: an object still in use is not verified gone.
  const verified = (finished.detail as { verified: string[] }).verified;
  assert.ok(verified.includes("cookie"), JSON.stringify(verified));
  assert.equal(verified.includes("ipc"), false, JSON.stringify(verified));
});

test("a session cgroup still populated after the reap is a path leftover, removed once it empties", async (t) => {
  const user = testUser(t);
  const { d } = await setup(t, { log: { level: "info" } });
  const id = "cgroup-survivor";
  const s = await usersSession(t, d, user, id);
  // This machine's cgroup v2 tree (pure or hybrid) is writable by root: the session gets one.
  assert.equal(s.containment.kind, "cgroup", JSON.stringify(s.containment));
  const cgroup = s.containment.path as string;
  // A root process in the session's cgroup: neither cgroup.kill (refused: another uid is in
  // it) nor a signal of the session (same) may end it.
  const stranger = spawn("sleep", ["303"], { stdio: "ignore" });
  t.after(async () => {
    // Should the test fail before its end: the stranger, then the cgroup it kept, go.
    stranger.kill("SIGKILL");
    await exited(stranger);
    for (const d of [cgroup, dirname(cgroup)]) {
      try {
        rmdirSync(d);
      } catch {
        // removed already (the base: or still used)
      }
    }
  });
  writeFileSync(join(cgroup, "cgroup.procs"), String(stranger.pid));

  assert.equal((await s.close()).status, 202);
  const finished = await d.reaped(id);
  assert.equal(finished.outcome, "partial");
  assert.equal(isGone(s.engine.pid), true);
  assert.equal(isGone(stranger.pid as number), false);
  const got = (await d.api<SessionJson>("GET", `/v1/sessions/${id}`)).body;
  const left = got.leftovers.find((l) => l.kind === "path" && l.item === cgroup);
  assert.ok(left, JSON.stringify(got.leftovers));
  assert.equal(left.step, "terminate");
  assert.match(
    left.detail,
    new RegExp(`^the session's cgroup, not removed: it still holds pid ${stranger.pid} \\(sleep, uid 0\\)`),
  );
  assert.ok(existsSync(cgroup));

  // Once the stranger is gone, the cgroup goes, with no reap left to do it.
  stranger.kill("SIGKILL");
  await until(() => !existsSync(cgroup), 10_000, "the session's cgroup removed once empty");
  await until(
    () => d.lines.some((l) => l.includes("session cgroup removed once it emptied") && l.includes(cgroup)),
    5_000,
    "the removal logged",
  );
});

test("a directory whose contents are removed but which itself remains (root-owned parent) says so", async (t) => {
  const user = testUser(t);
  const dir = tempDir(t);
  chmodSync(dir, 0o755);
  // The allowed root is root's and not writable by the user: rm, run as the user, empties the
  // registered directory but cannot unlink it from there.
  const root = join(dir, "engines");
  mkdirSync(root);
  chmodSync(root, 0o755); // whatever the umask
  const data = join(root, "data");
  mkdirSync(join(data, "sub"), { recursive: true });
  writeFileSync(join(data, "sub", "file"), "x");
  for (const p of [data, join(data, "sub"), join(data, "sub", "file")]) chownSync(p, user.uid, user.gid);
  const d = await startDaemon(t, testConfig(dir, { profiles: { default: { allowed_roots: [root] } } }));
  const engine = spawn("sleep", ["304"], { uid: user.uid, gid: user.gid, stdio: "ignore" });
  t.after(() => void engine.kill("SIGKILL"));
  const reg = await d.api<{ id: string }>("POST", "/v1/sessions", { engine: { pid: engine.pid }, paths: [data] });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  assert.equal((await d.api("DELETE", `/v1/sessions/${reg.body.id}`)).status, 202);
  const finished = await d.reaped(reg.body.id);
  assert.equal(finished.outcome, "partial");
  // The test's own look: emptied, not removed.
  assert.deepEqual(readdirSync(data), []);
  const got = (await d.api<SessionJson>("GET", `/v1/sessions/${reg.body.id}`)).body;
  const left = got.leftovers.find((l) => l.kind === "path" && l.item === data);
  assert.ok(left, JSON.stringify(got.leftovers));
  assert.match(
    left.detail,
    new RegExp(
      `^failed: its contents were removed; the empty directory itself remains: its parent ${root} is not writable by uid ${user.uid} \\(owner uid 0, mode 0755\\) \\(rm: .*Permission denied\\)$`,
    ),
  );
});
