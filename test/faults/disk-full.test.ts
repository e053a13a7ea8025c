import assert from "node:assert/strict";
import { rmSync, statfsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { callApi } from "../../src/client/transport.js";
import {
  isGone,
  sleeper,
  spawnDaemon,
  startEngine,
  tempDir,
  until,
  writeConfig,
  writeDaemonConfig,
} from "../helpers.js";
import {
  counts,
  fillUp,
  heartbeats,
  metric,
  mountTmpfs,
  orDied,
  readDb,
  register,
  sleep,
  stateOf,
  type ErrorBody,
  type SessionBody,
} from "./lib.js";

const TIMEOUT_SEC = 4;

/** Asserts the file system holding `file` takes not one more byte. */
function assertFull(dir: string): void {
  assert.throws(() => writeFileSync(join(dir, "one-more-byte"), "x"), { code: "ENOSPC" });
  rmSync(join(dir, "one-more-byte"), { force: true });
}

/** Every answer must be one of `ok`, or 503 SR_STORE_UNAVAILABLE in the API's envelope. */
function assertRefusedProperly(what: string, r: { status: number; body: unknown }): void {
  assert.notEqual(r.status, 500, `${what}: 500 ${JSON.stringify(r.body)}`);
  assert.equal(r.status, 503, `${what}: ${r.status} ${JSON.stringify(r.body)}`);
  const body = r.body as ErrorBody;
  assert.deepEqual(Object.keys(body), ["error"], `${what}: ${JSON.stringify(body)}`);
  assert.equal(body.error.code, "SR_STORE_UNAVAILABLE", `${what}: ${JSON.stringify(body)}`);
  assert.equal(typeof body.error.message, "string");
}

/**
 * The file system under the database fills up (a runaway log on /var, a small tmpfs): every
 * SQLite write fails with SQLITE_FULL. The daemon stays up, refuses what it cannot commit
 * with 503 SR_STORE_UNAVAILABLE, keeps its live sessions (in memory, heartbeats answered),
 * and once space returns finishes every reap it could not journal and reaps what died.
 */
test("disk full under the database: 503s, no crash, nothing live reaped; every reap finishes once space returns", async (t) => {
  const dir = tempDir(t);
  const mnt = mountTmpfs(dir, "db", "2m");
  // The database on the tmpfs, the socket beside the config.
  const socket = join(dir, "reaper.sock");
  const db = join(mnt, "reaper.db");
  const file = writeConfig(
    dir,
    `[api]
socket = "${socket}"
[store]
path = "${db}"
[detect]
# Walks of /proc far apart (a first walk at start, then none for minutes): the victim's exit
# is known from its pidfd alone, seen while the store could not commit. What was seen must
# be the reason on record once space returns, not the heartbeat timeout that passed meanwhile
# (a busy host spaces its walks too: this failed in the full suite).
liveness_cpu_percent = 0.001
[profiles.default]
heartbeat_timeout_sec = ${TIMEOUT_SEC}
grace_period_sec = 2
allowed_roots = ["${dir}"]
`,
  );
  const daemon = await spawnDaemon(t, file, socket);
  const pid = daemon.proc.pid as number;

  const live = Array.from({ length: 5 }, () => sleeper(t, "sleep", ["120"]));
  const liveIds = live.map((_, i) => `live-${i}`);
  for (const [i, e] of live.entries()) {
    assert.equal((await register(socket, liveIds[i] as string, e.pid)).status, 201);
  }
  const victim = sleeper(t, "sleep", ["120"]);
  assert.equal((await register(socket, "victim", victim.pid)).status, 201);
  // An engine that ignores SIGTERM: its reap waits out the 2 s grace period, so its
  // terminate step is journaled while the disk is full.
  const slow = await startEngine(t, ["--ignore-term"]);
  assert.equal((await register(socket, "slow", slow.pid)).status, 201);
  const hb = heartbeats(t, socket, [...liveIds, "victim", "slow"], 1000);
  await sleep(1_500);

  hb.quiet("slow");
  await sleep(300); // a heartbeat in flight is answered
  const closed = await callApi(socket, "DELETE", "/v1/sessions/slow");
  assert.equal(closed.status, 202, JSON.stringify(closed.body));
  const filled = fillUp(join(mnt, "filler"));
  assertFull(mnt);
  t.diagnostic(`filled the tmpfs with ${filled} bytes; free now ${statfsSync(mnt).bavail} blocks`);

  // Writes are refused, properly.
  const extra = sleeper(t, "sleep", ["120"]);
  for (let i = 0; i < 3; i++)
    assertRefusedProperly(`registration ${i}`, await register(socket, `full-${i}`, extra.pid));
  assertRefusedProperly("close", await callApi(socket, "DELETE", "/v1/sessions/live-4"));

  // The victim's engine dies while nothing can be written.
  hb.quiet("victim");
  await sleep(300);
  victim.kill("SIGKILL");
  // Longer than the heartbeat timeout, disk still full.
  await sleep(TIMEOUT_SEC * 1000 + 2_000);
  assertFull(mnt);
  assert.equal(daemon.proc.exitCode, null, `the daemon exited: ${daemon.output().slice(-3000)}`);
  assert.ok(!isGone(pid));
  for (const id of liveIds) assert.equal(await stateOf(socket, id), "live", id);
  for (const e of live) assert.ok(!isGone(e.pid));
  assertRefusedProperly("registration, later", await register(socket, "full-late", extra.pid));

  // Space returns.
  rmSync(join(mnt, "filler"));
  await until(async () => (await stateOf(socket, "victim")) === "reaped", 15_000, "victim reaped after space returned");
  await until(async () => (await stateOf(socket, "slow")) === "reaped", 15_000, "slow reaped after space returned");
  assert.ok(isGone(slow.pid));
  const victimBody = (await callApi<SessionBody>(socket, "GET", "/v1/sessions/victim")).body;
  assert.equal(victimBody.reason, "engine_gone");
  await until(async () => (await counts(socket)).reaping === 0, 15_000, "every session that left live reached reaped");
  const list = await callApi<{ sessions: SessionBody[] }>(socket, "GET", "/v1/sessions?limit=100");
  assert.deepEqual(
    list.body.sessions.filter((s) => s.state !== "live" && s.state !== "reaped").map((s) => s.id),
    [],
  );
  assert.deepEqual(
    list.body.sessions
      .filter((s) => s.state === "live")
      .map((s) => s.id)
      .sort(),
    [...liveIds].sort(),
    "the refused registrations left nothing; the live sessions are all live",
  );
  assert.equal((await register(socket, "after-full", extra.pid)).status, 201);

  const samples = await hb.stop();
  assert.deepEqual(
    samples.filter((s) => s.status !== 200).map((s) => `${s.id}: ${s.status} ${s.error ?? ""}`),
    [],
  );
  const events = readDb(t, db)
    .prepare("SELECT event FROM audit_events WHERE session_id = 'victim' ORDER BY seq")
    .all() as { event: string }[];
  assert.equal(events.filter((e) => e.event === "reap.finished").length, 1);
  daemon.proc.kill("SIGTERM");
  assert.equal(await daemon.exit, 0);
});

/**
 * The file system under the log file fills up: log lines are dropped (and counted), never
 * the decisions they describe: registrations commit, sessions are tracked and reaped.
 */
test("disk full under the log file: registrations 201, expiry and force-reap work, dropped lines counted", async (t) => {
  const dir = tempDir(t);
  const mnt = mountTmpfs(dir, "log", "256k");
  const { file, socket } = writeDaemonConfig(
    dir,
    `[log]
file = "${join(mnt, "reaper.log")}"
[profiles.default]
heartbeat_timeout_sec = ${TIMEOUT_SEC}
grace_period_sec = 1
allowed_roots = ["${dir}"]
`,
  );
  const daemon = await spawnDaemon(t, file, socket);
  const pid = daemon.proc.pid as number;
  fillUp(join(mnt, "filler"));
  assertFull(mnt);
  const state = (id: string): Promise<string> => orDied(daemon, stateOf(socket, id));

  const quiet = sleeper(t, "sleep", ["120"]);
  const forced = sleeper(t, "sleep", ["120"]);
  const reg = await orDied(daemon, register(socket, "quiet", quiet.pid, { heartbeatTimeoutSec: 2 }));
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  assert.equal((await orDied(daemon, register(socket, "forced", forced.pid))).status, 201);
  const reap = await orDied(daemon, callApi(socket, "POST", "/v1/sessions/forced/reap"));
  assert.equal(reap.status, 202, JSON.stringify(reap.body));
  await until(() => isGone(forced.pid), 10_000, "force-reaped engine gone");
  // Tracked: it expires when it does not heartbeat.
  await until(async () => (await state("quiet")) === "reaped", 10_000, "quiet expired and reaped");
  assert.ok(isGone(quiet.pid));
  const quietBody = await orDied(daemon, callApi<SessionBody>(socket, "GET", "/v1/sessions/quiet"));
  assert.equal(quietBody.body.reason, "heartbeat_timeout");
  await until(async () => (await state("forced")) === "reaped", 10_000, "forced reaped");

  assert.equal(daemon.proc.exitCode, null, `the daemon exited: ${daemon.output().slice(-3000)}`);
  assert.ok(!isGone(pid));
  const dropped = await metric(socket, "session_reaper_log_lines_dropped_total");
  t.diagnostic(`session_reaper_log_lines_dropped_total ${dropped}`);
  assert.ok(dropped !== null && dropped > 0, `session_reaper_log_lines_dropped_total ${dropped}`);
  // The audit trail's rows were committed, whatever became of its lines.
  const db = readDb(t, join(dir, "reaper.db"));
  const finished = db
    .prepare("SELECT session_id FROM audit_events WHERE event = 'reap.finished' ORDER BY session_id")
    .all() as { session_id: string }[];
  assert.deepEqual(
    finished.map((r) => r.session_id),
    ["forced", "quiet"],
  );
  daemon.proc.kill("SIGTERM");
  assert.equal(await daemon.exit, 0);
});
