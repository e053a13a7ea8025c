/**
 * The premises of the engine tests, checked without a daemon: the verification helpers see
 * what /proc, ss and the file system show, and PostgreSQL, pg_ctl and Redis build the
 * process trees lib.ts describes. If one of these fails, an engine test's verdict on the
 * daemon means nothing.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readdirSync, symlinkSync } from "node:fs";
import { createServer, type AddressInfo } from "node:net";
import { join } from "node:path";
import { test } from "node:test";
import { tempDir, testUser, until } from "../helpers.js";
import {
  bgsave,
  busyBackend,
  initCluster,
  listening,
  pathGone,
  pgCtlStart,
  procAlive,
  procId,
  procInfo,
  processesOf,
  startPostgres,
  startRedis,
} from "./lib.js";

test("procAlive, listening and pathGone read /proc, ss and the file system", async (t) => {
  // A zombie: `sleep 30` (exec'd by sh) never reaps the short sleep sh started first.
  const parent = spawn("/bin/sh", ["-c", "sleep 0.05 & exec sleep 30"], { stdio: "ignore" });
  t.after(() => void parent.kill("SIGKILL"));
  let zombie = 0;
  await until(
    () => {
      const c = readdirSync("/proc")
        .filter((n) => /^\d+$/.test(n))
        .map((n) => procInfo(Number(n)))
        .find((p) => p !== null && p.ppid === parent.pid && p.state === "Z");
      zombie = c?.pid ?? 0;
      return zombie > 0;
    },
    5_000,
    "a zombie child",
  );
  assert.equal(procAlive(zombie), false, "a zombie is gone");
  assert.ok(procInfo(zombie), "yet /proc still lists it");
  assert.equal(procAlive(parent.pid as number), true);
  assert.equal(procAlive({ pid: parent.pid as number, start: 1 }), false, "another start time: another process");

  const srv = createServer().listen(0, "127.0.0.1");
  await new Promise((r) => srv.once("listening", r));
  const port = (srv.address() as AddressInfo).port;
  assert.deepEqual(
    listening(port).map((l) => l.pid),
    [process.pid],
  );
  await new Promise((r) => srv.close(r));
  assert.deepEqual(listening(port), []);

  const dir = tempDir(t);
  symlinkSync(join(dir, "nowhere"), join(dir, "dangling"));
  assert.equal(pathGone(join(dir, "dangling")), false, "a dangling symlink is something");
  assert.equal(pathGone(join(dir, "nowhere")), true);
});

test("postgres: every child of the postmaster leads its own session; a busy backend outlives a SIGKILLed postmaster", async (t) => {
  const user = testUser(t);
  const pg = await startPostgres(t, user);
  assert.equal(await pg.psql("SELECT 1"), "1");
  const backend = await busyBackend(pg);
  const children = processesOf(user.uid).filter((p) => p.ppid === pg.postmasterPid);
  assert.ok(children.length >= 4, "checkpointer, background writer, walwriter, … and the backend");
  assert.ok(children.some((p) => p.pid === backend.pid));
  for (const p of children) assert.equal(p.sid, p.pid, `${p.cmd}: setsid()`);
  assert.deepEqual(
    listening(pg.port).map((l) => l.pid),
    [pg.postmasterPid],
  );

  process.kill(pg.postmasterPid, "SIGKILL");
  await until(() => !procAlive(pg.postmaster), 5_000, "postmaster gone");
  await until(() => processesOf(user.uid).every((p) => p.pid === backend.pid), 10_000, "the auxiliary processes exit");
  const b = procInfo(backend.pid);
  assert.ok(b && procAlive(backend.id), "the busy backend runs on");
  assert.notEqual(b.ppid, pg.postmasterPid, "re-parented");
  assert.equal(b.sid, backend.pid);
  assert.deepEqual(listening(pg.port), [], "nobody listens: the backend only holds its connection");
});

test("pg_ctl start exits 0 and leaves the postmaster running, in a session of its own", async (t) => {
  const user = testUser(t);
  const c = await initCluster(t, user);
  const r = await pgCtlStart(t, c);
  assert.equal(r.launcher.code, 0);
  assert.equal(procAlive(r.launcherPid), false);
  const pm = procInfo(r.postmasterPid);
  assert.ok(pm && procAlive(r.postmaster));
  assert.notEqual(pm.ppid, r.launcherPid, "re-parented once pg_ctl exited");
  assert.equal(pm.sid, r.postmasterPid, "pg_ctl's child called setsid()");
  assert.equal(await r.psql("SELECT 1"), "1");
  // A fast shutdown: the postmaster removes its shared memory itself.
  process.kill(r.postmasterPid, "SIGINT");
  await until(() => processesOf(user.uid).length === 0, 15_000, "the cluster stopped");
});

test("redis: the BGSAVE child is a plain fork of the server, writing its temp file", async (t) => {
  const user = testUser(t);
  const redis = await startRedis(t, user);
  const child = await bgsave(redis);
  const c = procInfo(child.pid);
  const server = procInfo(redis.pid);
  assert.ok(c && server);
  assert.equal(c.ppid, redis.pid);
  assert.equal(c.pgid, server.pgid);
  assert.equal(c.sid, server.sid);
  assert.ok(readdirSync(redis.dir).includes(`temp-${child.pid}.rdb`));
  assert.deepEqual(
    listening(redis.port).map((l) => l.pid),
    [redis.pid],
    "the child does not hold the listener",
  );
  assert.equal(procId(child.pid).start, child.id.start);
});
