import assert from "node:assert/strict";
import { join } from "node:path";
import { test } from "node:test";
import { callApi } from "../../src/client/transport.js";
import { sleeper, spawnDaemon, tempDir, until, writeConfig, writeDaemonConfig } from "../helpers.js";
import { readDb, register, sleep, stateOf, type SessionBody } from "./lib.js";

type Row = { created_at: number; last_heartbeat_at: number; state: string };

/** The heartbeat's time as the daemon holds it (in memory, while live): GET answers it. */
async function heartbeatAt(socket: string, id: string): Promise<number> {
  const r = await callApi(socket, "POST", `/v1/sessions/${id}/heartbeat`);
  assert.equal(r.status, 200, JSON.stringify(r.body));
  const s = (await callApi<SessionBody>(socket, "GET", `/v1/sessions/${id}`)).body;
  assert.equal(s.state, "live");
  return Date.parse(s.lastHeartbeatAt);
}

/**
 * What SQLite holds is the record operators and audits read after the fact (`sqlite3
 * reaper.db`, a backup, a post-mortem): a session's last heartbeat must be there, also for
 * the session reaped before the next coalesced flush.
 */
test("last_heartbeat_at in SQLite: the heartbeat's time after a flush interval, and the last one after a force-reap", async (t) => {
  const dir = tempDir(t);
  // [store] flush_interval_ms left at its default (1000 ms).
  const { file, socket, db } = writeDaemonConfig(dir, `[profiles.default]\nallowed_roots = ["${dir}"]\n`);
  const daemon = await spawnDaemon(t, file, socket);
  const engine = sleeper(t, "sleep", ["60"]);
  const reg = await register(socket, "rec", engine.pid);
  assert.equal(reg.status, 201);
  const store = readDb(t, db);
  const row = (id: string): Row =>
    store.prepare("SELECT created_at, last_heartbeat_at, state FROM sessions WHERE id = ?").get(id) as Row;
  const createdAt = row("rec").created_at;
  assert.equal(createdAt, Date.parse(reg.body.createdAt));

  await sleep(200);
  const first = await heartbeatAt(socket, "rec");
  assert.ok(first > createdAt);
  // One flush interval, and a margin.
  await sleep(1_000);
  await until(() => row("rec").last_heartbeat_at === first, 1_500, `last_heartbeat_at = ${first}`);

  // A heartbeat, then a force-reap at once (well within the next flush interval).
  await sleep(200);
  const last = await heartbeatAt(socket, "rec");
  assert.ok(last > first);
  assert.equal((await callApi(socket, "POST", "/v1/sessions/rec/reap")).status, 202);
  await until(async () => (await stateOf(socket, "rec")) === "reaped", 10_000, "rec reaped");
  const reaped = row("rec");
  assert.equal(reaped.state, "reaped");
  assert.equal(
    reaped.last_heartbeat_at,
    last,
    `last_heartbeat_at ${reaped.last_heartbeat_at}: created_at ${createdAt}, first heartbeat ${first}, last ${last}`,
  );
  daemon.proc.kill("SIGTERM");
  assert.equal(await daemon.exit, 0);
});

test("last_heartbeat_at in SQLite after expiry and after a close, with a flush interval longer than the session", async (t) => {
  const dir = tempDir(t);
  // No periodic flush comes between the heartbeat and the end of these sessions.
  const socket = join(dir, "reaper.sock");
  const db = join(dir, "reaper.db");
  const file = writeConfig(
    dir,
    `[api]
socket = "${socket}"
[store]
path = "${db}"
flush_interval_ms = 60000
[profiles.default]
grace_period_sec = 1
allowed_roots = ["${dir}"]
`,
  );
  const daemon = await spawnDaemon(t, file, socket);
  const expires = sleeper(t, "sleep", ["60"]);
  const closes = sleeper(t, "sleep", ["60"]);
  assert.equal((await register(socket, "expires", expires.pid, { heartbeatTimeoutSec: 2 })).status, 201);
  assert.equal((await register(socket, "closes", closes.pid)).status, 201);
  const store = readDb(t, db);
  const row = (id: string): Row =>
    store.prepare("SELECT created_at, last_heartbeat_at, state FROM sessions WHERE id = ?").get(id) as Row;

  await sleep(300);
  const expiresHb = await heartbeatAt(socket, "expires");
  const closesHb = await heartbeatAt(socket, "closes");
  assert.equal((await callApi(socket, "DELETE", "/v1/sessions/closes")).status, 202);
  // "expires" goes silent: reaped 2 s after its heartbeat.
  await until(async () => (await stateOf(socket, "expires")) === "reaped", 10_000, "expires reaped");
  await until(async () => (await stateOf(socket, "closes")) === "reaped", 10_000, "closes reaped");
  const expired = (await callApi<SessionBody>(socket, "GET", "/v1/sessions/expires")).body;
  assert.equal(expired.reason, "heartbeat_timeout");

  for (const [id, hb] of [
    ["expires", expiresHb],
    ["closes", closesHb],
  ] as const) {
    const r = row(id);
    assert.ok(hb > r.created_at);
    assert.equal(
      r.last_heartbeat_at,
      hb,
      `${id}: last_heartbeat_at ${r.last_heartbeat_at}, created_at ${r.created_at}`,
    );
  }
  daemon.proc.kill("SIGTERM");
  assert.equal(await daemon.exit, 0);
});
