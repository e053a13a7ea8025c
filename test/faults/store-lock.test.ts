import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { performance } from "node:perf_hooks";
import { test } from "node:test";
import { callApi } from "../../src/client/transport.js";
import { isGone, sleeper, spawnDaemon, tempDir, until, writeDaemonConfig } from "../helpers.js";
import { counts, heartbeats, percentile, register, sleep, stateOf } from "./lib.js";

const TIMEOUT_SEC = 4;
const SESSIONS = 10;
const HOLD_MS = 9_000;

/**
 * Another process holds the database's write lock (a backup tool, an operator's sqlite3 shell
 * left in a transaction) for longer than the heartbeat timeout. The daemon keeps its live
 * sessions in memory: heartbeats stay fast and nothing is reaped; what must be written
 * (a registration) is refused with 503 SR_STORE_UNAVAILABLE instead of blocking the event
 * loop or answering 500; once the lock is gone everything works again.
 */
test("a sqlite3 shell holding BEGIN EXCLUSIVE for 9 s: heartbeats stay fast, registrations 503, nothing reaped", async (t) => {
  const dir = tempDir(t);
  const { file, socket, db } = writeDaemonConfig(
    dir,
    `[profiles.default]
heartbeat_timeout_sec = ${TIMEOUT_SEC}
grace_period_sec = 1
allowed_roots = ["${dir}"]
`,
  );
  const daemon = await spawnDaemon(t, file, socket);
  const engines = Array.from({ length: SESSIONS }, () => sleeper(t, "sleep", ["120"]));
  const ids = engines.map((_, i) => `locked-${i}`);
  for (const [i, e] of engines.entries()) {
    const r = await register(socket, ids[i] as string, e.pid, { heartbeatTimeoutSec: TIMEOUT_SEC });
    assert.equal(r.status, 201, JSON.stringify(r.body));
  }
  // Twice a second each: enough samples during the lock for a p99.
  const hb = heartbeats(t, socket, ids, 500);
  await sleep(1_500);

  // The lock holder: a real sqlite3 shell, in a write transaction on the daemon's database.
  const shell = spawn("sqlite3", [db], { stdio: ["pipe", "pipe", "pipe"] });
  t.after(() => void shell.kill("SIGKILL"));
  let shellOut = "";
  shell.stdout.setEncoding("utf8").on("data", (d: string) => (shellOut += d));
  shell.stderr.setEncoding("utf8").on("data", (d: string) => (shellOut += d));
  shell.stdin.write(
    [
      ".bail on",
      ".timeout 5000",
      "BEGIN EXCLUSIVE;",
      "CREATE TABLE fault_scratch (x);",
      "INSERT INTO fault_scratch VALUES (1);",
      "SELECT 'locked';",
      "",
    ].join("\n"),
  );
  await until(() => shellOut.includes("locked"), 10_000, `the shell took the lock (${shellOut})`);
  const lockedAt = performance.now();

  // Registrations during the lock, spread over it.
  const extra = Array.from({ length: 3 }, () => sleeper(t, "sleep", ["120"]));
  const refused: { status: number; body: unknown; ms: number }[] = [];
  for (const [i, e] of extra.entries()) {
    await sleep(i === 0 ? 1_000 : 2_500);
    const t0 = performance.now();
    try {
      const r = await register(socket, `during-lock-${i}`, e.pid);
      refused.push({ status: r.status, body: r.body, ms: performance.now() - t0 });
    } catch (err) {
      refused.push({ status: 0, body: String(err), ms: performance.now() - t0 });
    }
  }
  await sleep(Math.max(0, HOLD_MS - (performance.now() - lockedAt)));
  const releasedAt = performance.now();
  shell.stdin.end("ROLLBACK;\n.quit\n");
  await new Promise((r) => shell.once("close", r));
  assert.ok(!shellOut.includes("Error"), `the sqlite3 shell failed: ${shellOut}`);

  assert.equal(
    daemon.proc.exitCode,
    null,
    `the daemon exited (${daemon.proc.exitCode}) during the lock: ${daemon.output().slice(-3000)}`,
  );
  t.diagnostic(`registrations during the lock: ${JSON.stringify(refused)}`);
  for (const r of refused) {
    assert.equal(r.status, 503, JSON.stringify(r.body));
    assert.deepEqual(Object.keys(r.body as object), ["error"], JSON.stringify(r.body));
    const error = (r.body as { error: { code: string; message: unknown } }).error;
    assert.equal(error.code, "SR_STORE_UNAVAILABLE");
    assert.equal(typeof error.message, "string");
  }

  const during = hb.samples.filter((s) => s.sentAt >= lockedAt && s.sentAt < releasedAt);
  const p99 = percentile(
    during.map((s) => s.ms),
    99,
  );
  t.diagnostic(
    `${during.length} heartbeats during the lock: p50 ${percentile(
      during.map((s) => s.ms),
      50,
    ).toFixed(1)} ms, p99 ${p99.toFixed(1)} ms, max ${Math.max(...during.map((s) => s.ms)).toFixed(1)} ms`,
  );
  assert.ok(during.length >= SESSIONS * 10, `only ${during.length} heartbeats answered during the lock`);
  assert.deepEqual([...new Set(during.map((s) => s.status))], [200], "every heartbeat during the lock answered 200");
  assert.ok(p99 < 1_000, `heartbeat p99 during the lock: ${p99.toFixed(0)} ms`);
  assert.deepEqual(await counts(socket), { live: SESSIONS, reaping: 0, reaped: 0 });

  // Released: registrations work again.
  const after = sleeper(t, "sleep", ["120"]);
  let last: { status: number; body: unknown } = { status: 0, body: null };
  await until(
    async () => {
      last = await register(socket, "after-lock", after.pid);
      return last.status !== 503;
    },
    5_000,
    "registration accepted after the lock",
  );
  assert.equal(last.status, 201, JSON.stringify(last.body));
  // Its client goes away at once: closed, reaped (writes work again).
  assert.equal((await callApi(socket, "DELETE", "/v1/sessions/after-lock")).status, 202);

  // And expiry works as before: a client that stops heartbeating is reaped.
  hb.quiet("locked-3");
  await until(async () => (await stateOf(socket, "locked-3")) === "reaped", TIMEOUT_SEC * 1000 + 6_000, "reaped");
  assert.ok(isGone(engines[3]?.pid as number));
  const samples = await hb.stop();
  assert.deepEqual(
    samples.filter((s) => s.status !== 200).map((s) => `${s.id}: ${s.status} ${s.error ?? ""}`),
    [],
  );
  // The failed registrations left nothing behind; the others are all live.
  await until(async () => (await stateOf(socket, "after-lock")) === "reaped", 10_000, "after-lock reaped");
  assert.deepEqual(await counts(socket), { live: SESSIONS - 1, reaping: 0, reaped: 2 });
  assert.equal((await register(socket, "during-lock-0", extra[0]?.pid as number)).status, 201);
  assert.equal(daemon.proc.exitCode, null);
  daemon.proc.kill("SIGTERM");
  assert.equal(await daemon.exit, 0);
});
