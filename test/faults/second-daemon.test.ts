import assert from "node:assert/strict";
import { existsSync, mkdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { test } from "node:test";
import { callApi } from "../../src/client/transport.js";
import { sleeper, spawnDaemon, tempDir, writeConfig, writeDaemonConfig } from "../helpers.js";
import { auditLines, heartbeats, readDb, register, runReaperd, sleep, stateOf } from "./lib.js";

/** sysexits.h EX_CONFIG, what reaperd exits with when it must not run (src/main.ts). */
const EXIT_CONFIG = 78;

/**
 * An operator starts reaperd by hand while the unit's daemon runs (or systemd and a
 * container both start one). The second daemon must notice before it touches anything:
 * no database write, no audit line, no socket taken over, no session recovered into a
 * second detector that would expire them on its own clock; it exits 78 naming the
 * running daemon's pid.
 */
test("a second reaperd on the same database and socket exits 78 naming the first, having written nothing", async (t) => {
  const dir = tempDir(t);
  const { file, socket, db } = writeDaemonConfig(
    dir,
    `[profiles.default]
heartbeat_timeout_sec = 3
allowed_roots = ["${dir}"]
`,
  );
  const a = await spawnDaemon(t, file, socket);
  const aPid = a.proc.pid as number;
  const engine = sleeper(t, "sleep", ["120"]);
  assert.equal((await register(socket, "held", engine.pid, { heartbeatTimeoutSec: 3 })).status, 201);
  const hb = heartbeats(t, socket, ["held"], 1000);
  const aStarted = (await callApi<{ startedAt: string }>(socket, "GET", "/v1/daemon")).body.startedAt;
  const socketIno = statSync(socket).ino;
  await sleep(1_500);
  const store = readDb(t, db);
  const eventCount = (): number => (store.prepare("SELECT COUNT(*) AS n FROM audit_events").get() as { n: number }).n;
  const before = eventCount();
  const t0 = performance.now();

  // Same config: same database, same socket.
  const same = await runReaperd(t, file, { timeoutMs: 10_000 }).finished;
  t.diagnostic(`same config: exit ${same.code} after ${Math.round(same.ms)} ms; stderr: ${same.stderr.trim()}`);
  assert.equal(same.code, EXIT_CONFIG, `exit ${same.code} (${same.signal}); stderr: ${same.stderr}`);
  assert.ok(same.ms < 3_000, `took ${Math.round(same.ms)} ms to exit`);
  assert.deepEqual(
    auditLines(same.stdout + same.stderr).map((e) => e.event),
    [],
    "the second daemon wrote audit lines",
  );
  assert.equal(eventCount(), before, "the second daemon wrote to audit_events");

  // Another database, the same socket: refused before the database is even created.
  const otherDir = join(dir, "other");
  mkdirSync(otherDir);
  const otherDb = join(otherDir, "reaper.db");
  const otherFile = writeConfig(otherDir, `[api]\nsocket = "${socket}"\n[store]\npath = "${otherDb}"\n`);
  const other = await runReaperd(t, otherFile, { timeoutMs: 10_000 }).finished;
  t.diagnostic(`other database: exit ${other.code} after ${Math.round(other.ms)} ms; stderr: ${other.stderr.trim()}`);
  assert.equal(other.code, EXIT_CONFIG, `exit ${other.code} (${other.signal}); stderr: ${other.stderr}`);
  assert.ok(other.ms < 3_000, `took ${Math.round(other.ms)} ms to exit`);
  assert.ok(other.stderr.includes(socket), `stderr names the socket: ${other.stderr}`);
  for (const f of [otherDb, `${otherDb}-wal`, `${otherDb}-shm`]) assert.ok(!existsSync(f), `${f} was created`);
  assert.deepEqual(
    auditLines(other.stdout + other.stderr).map((e) => e.event),
    [],
  );

  // A is untouched: its socket file, its answers, its session, 10 s on.
  assert.equal(statSync(socket).ino, socketIno, "the socket file was replaced");
  await sleep(Math.max(0, 10_500 - (performance.now() - t0)));
  assert.equal(a.proc.exitCode, null);
  assert.equal((await callApi<{ startedAt: string }>(socket, "GET", "/v1/daemon")).body.startedAt, aStarted);
  assert.equal(await stateOf(socket, "held"), "live");
  const samples = await hb.stop();
  assert.ok(samples.length >= 10);
  assert.deepEqual(
    samples.filter((s) => s.status !== 200).map((s) => `${s.status} ${s.error ?? ""}`),
    [],
  );
  assert.equal(eventCount(), before, "audit_events changed while the daemons were refused");
  assert.deepEqual(
    auditLines(a.output())
      .filter((e) => e.event === "daemon.started")
      .map((e) => e.detail?.pid),
    [aPid],
  );
  // Last, so that a failure here does not hide the others: the refusal names who runs.
  assert.match(same.stderr, new RegExp(`\\b${aPid}\\b`), `stderr names the running daemon's pid ${aPid}`);
  a.proc.kill("SIGTERM");
  assert.equal(await a.exit, 0);
});
