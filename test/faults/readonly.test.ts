import assert from "node:assert/strict";
import { chmodSync, chownSync, existsSync, mkdirSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { callApi } from "../../src/client/transport.js";
import { sleeper, spawnDaemon, tempDir, testUser, writeConfig, type TestUser } from "../helpers.js";
import { auditLines, register, runReaperd, type Finished } from "./lib.js";

/** Exit codes reaperd may give up with here: 78 (configuration) or 70 (crash), never a hang. */
const GIVE_UP = [78, 70];
const WHY = /read-?only|permission|EACCES|EROFS|not writable|cannot write|can't write/i;

/**
 * A database created by root (the daemon was once started by hand as root), then the
 * daemon run as its service user, who may read the file but not write it. SQLite opens
 * such a file read-only without complaint; the first write fails. The daemon must find out
 * at start and exit, saying why, instead of hanging half-started or serving a store it
 * cannot write.
 */
async function setUp(t: Parameters<typeof tempDir>[0] & { after: (fn: () => void) => void }) {
  const dir = tempDir(t);
  // The socket's directory belongs to the user: only the database is in the way.
  const run = join(dir, "run");
  const data = join(dir, "data");
  mkdirSync(run);
  mkdirSync(data);
  const socket = join(run, "reaper.sock");
  const db = join(data, "reaper.db");
  const file = writeConfig(dir, `[api]\nsocket = "${socket}"\n[store]\npath = "${db}"\n`);
  // Created by a daemon run as root, with a session in it.
  const root = await spawnDaemon(t, file, socket);
  const engine = sleeper(t, "sleep", ["60"]);
  assert.equal((await register(socket, "made-by-root", engine.pid)).status, 201);
  root.proc.kill("SIGTERM");
  assert.equal(await root.exit, 0);
  assert.ok(!existsSync(`${db}-wal`) && !existsSync(`${db}-shm`));
  const user = testUser(t);
  chmodSync(dir, 0o755);
  chmodSync(file, 0o644);
  chownSync(run, user.uid, user.gid);
  return { dir, data, db, file, socket, user };
}

function assertGaveUp(run: Finished, db: string, socket: string): void {
  assert.ok(
    run.code !== null && GIVE_UP.includes(run.code),
    `exit ${run.code} (${run.signal}) after ${Math.round(run.ms)} ms; stderr: ${run.stderr}; stdout: ${run.stdout.slice(-1000)}`,
  );
  assert.ok(run.ms < 5_000, `took ${Math.round(run.ms)} ms to exit`);
  assert.ok(run.stderr.includes(db), `stderr names the database: ${run.stderr}`);
  assert.match(run.stderr, WHY, "stderr says why");
  assert.deepEqual(
    auditLines(run.stdout).map((e) => e.event),
    [],
  );
  assert.ok(!existsSync(socket), "the socket was created");
}

async function runAs(t: Parameters<typeof runReaperd>[0], file: string, user: TestUser): Promise<Finished> {
  const run = await runReaperd(t, file, { user, timeoutMs: 15_000 }).finished;
  return run;
}

test("a database file root owns, the daemon run as another user: exits with the reason, never hangs", async (t) => {
  const { db, file, socket, user } = await setUp(t);
  // root:root 0644 in a root:root 0755 directory: readable, not writable, no -wal/-shm possible.
  chmodSync(db, 0o644);
  const run = await runAs(t, file, user);
  t.diagnostic(`exit ${run.code} (${run.signal}) after ${Math.round(run.ms)} ms; stderr: ${run.stderr.trim()}`);
  assertGaveUp(run, db, socket);
  await assert.rejects(callApi(socket, "GET", "/healthz"), { code: "SR_DAEMON_UNREACHABLE" });
});

test("a database file chmod 0444 in a directory the user may write: exits with the reason, never hangs", async (t) => {
  const { data, db, file, socket, user } = await setUp(t);
  // The user owns the directory and everything in it (the database's lock file too) and may
  // create -wal and -shm, but the database file itself is read-only.
  chownSync(data, user.uid, user.gid);
  for (const f of readdirSync(data)) chownSync(join(data, f), user.uid, user.gid);
  chmodSync(db, 0o444);
  const run = await runAs(t, file, user);
  t.diagnostic(`exit ${run.code} (${run.signal}) after ${Math.round(run.ms)} ms; stderr: ${run.stderr.trim()}`);
  assertGaveUp(run, db, socket);
});
