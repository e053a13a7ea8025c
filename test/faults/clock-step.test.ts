import assert from "node:assert/strict";
import { existsSync, writeFileSync } from "node:fs";
import { request } from "node:http";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { test } from "node:test";
import { callApi } from "../../src/client/transport.js";
import { isGone, sleeper, spawnDaemon, tempDir, until, writeDaemonConfig } from "../helpers.js";
import { counts, heartbeats, register, sleep, stateOf, type SessionBody } from "./lib.js";

/**
 * The wall clock stepped under a running daemon (NTP's first sync, an operator's `date -s`,
 * a VM restored from a snapshot): reaperd runs under libfaketime, whose offset is read from
 * a file at every call (FAKETIME_NO_CACHE), with the monotonic clock left alone
 * (FAKETIME_DONT_FAKE_MONOTONIC), as a real step leaves CLOCK_MONOTONIC alone.
 * Node 20 works under libfaketime: Date.now() follows the file, process.hrtime and timers
 * do not (checked by hand before these tests were written).
 */
const LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
const TIMEOUT_SEC = 4;
/**
 * Clients heartbeat at half the timeout, their phases spread over the period: the detector's
 * timers then fire every few hundred ms, each about one period after that session's last
 * heartbeat, so a daemon that compares wall-clock readings across the step sees overdue
 * sessions at its first timer after the step.
 */
const PERIOD_MS = 2_000;
const SESSIONS = 10;

async function fakedDaemon(t: Parameters<typeof tempDir>[0] & { after: (fn: () => void) => void }) {
  assert.ok(existsSync(LIBFAKETIME), `libfaketime is not installed at ${LIBFAKETIME}`);
  const dir = tempDir(t);
  const offset = join(dir, "faketime");
  writeFileSync(offset, "+0\n");
  const { file, socket } = writeDaemonConfig(
    dir,
    `[profiles.default]
heartbeat_timeout_sec = ${TIMEOUT_SEC}
grace_period_sec = 1
allowed_roots = ["${dir}"]
`,
  );
  const daemon = await spawnDaemon(t, file, socket, {
    LD_PRELOAD: LIBFAKETIME,
    FAKETIME_DONT_FAKE_MONOTONIC: "1",
    FAKETIME_NO_CACHE: "1",
    FAKETIME_TIMESTAMP_FILE: offset,
  });
  const engines = Array.from({ length: SESSIONS }, () => sleeper(t, "sleep", ["120"]));
  const ids = engines.map((_, i) => `s${i}`);
  for (const [i, e] of engines.entries()) {
    const r = await register(socket, ids[i] as string, e.pid, { heartbeatTimeoutSec: TIMEOUT_SEC });
    assert.equal(r.status, 201, JSON.stringify(r.body));
  }
  /** The daemon's wall clock, from its answers' Date header (the test's own clock is not faked). */
  const daemonNow = (): Promise<number> =>
    new Promise((resolve, reject) => {
      const req = request({ socketPath: socket, path: "/healthz", headers: { host: "localhost" } }, (res) => {
        res.resume();
        resolve(Date.parse(res.headers.date ?? ""));
      });
      req.on("error", reject);
      req.end();
    });
  const step = async (to: string, expectMs: number): Promise<void> => {
    writeFileSync(offset, `${to}\n`);
    await sleep(1_100); // node's http caches its Date header for up to a second
    const skew = (await daemonNow()) - Date.now();
    assert.ok(Math.abs(skew - expectMs) < 60_000, `the daemon's clock is ${skew} ms off, expected ${expectMs}`);
  };
  return { daemon, socket, engines, ids, step };
}

/**
 * Heartbeats going on for longer than the timeout before the step: every session's deadline
 * has come due and been pushed back at least once, so the detector's timers fire all the
 * time (a step in the first seconds after registration would fall before its first timer,
 * and every session would have heartbeated on the stepped clock by then).
 */
const warmUp = (): Promise<void> => sleep(TIMEOUT_SEC * 1000 + 2_000);

/** Stops one session's heartbeats and waits for its fence; returns ms from its last 200 to the fence. */
async function silenceAndWaitForExpiry(hb: ReturnType<typeof heartbeats>, socket: string, id: string): Promise<number> {
  hb.quiet(id);
  await sleep(300); // a heartbeat in flight is answered
  const last = hb.lastOk(id) as number;
  // Due TIMEOUT_SEC after its last heartbeat; 1.5 s more is the bound asked of the daemon.
  const bound = TIMEOUT_SEC * 1000 + 1_500 - (performance.now() - last);
  await until(async () => (await stateOf(socket, id)) !== "live", bound, `${id} expired`);
  return performance.now() - last;
}

test("wall clock stepped 1 h forward under a running daemon: heartbeating sessions are not reaped", async (t) => {
  const { daemon, socket, engines, ids, step } = await fakedDaemon(t);
  const hb = heartbeats(t, socket, ids, PERIOD_MS);
  await warmUp();

  await step("+1h", 3_600_000);
  // Past the heartbeat timeout, on the real clock, with heartbeats going on.
  await sleep(TIMEOUT_SEC * 1000 + 2_000);
  assert.deepEqual(await counts(socket), { live: SESSIONS, reaping: 0, reaped: 0 });

  // Expiry still works on the stepped clock: a silent client is reaped in time.
  const lagMs = await silenceAndWaitForExpiry(hb, socket, "s1");
  t.diagnostic(`s1 fenced ${Math.round(lagMs)} ms after its last heartbeat (timeout ${TIMEOUT_SEC} s)`);
  const s1 = (await callApi<SessionBody>(socket, "GET", "/v1/sessions/s1")).body;
  assert.equal(s1.reason, "heartbeat_timeout");
  await until(async () => (await stateOf(socket, "s1")) === "reaped", 10_000, "s1 reaped");
  assert.ok(isGone(engines[1]?.pid as number));

  const samples = await hb.stop();
  assert.deepEqual(
    samples.filter((s) => s.status !== 200).map((s) => `${s.id}: ${s.status}`),
    [],
  );
  assert.deepEqual(await counts(socket), { live: SESSIONS - 1, reaping: 0, reaped: 1 });
  assert.equal(daemon.proc.exitCode, null);
});

test("wall clock stepped 1 h back under a running daemon: a silent session is still reaped within its timeout", async (t) => {
  const { daemon, socket, engines, ids, step } = await fakedDaemon(t);
  const hb = heartbeats(t, socket, ids, PERIOD_MS);
  await warmUp();

  await step("-1h", -3_600_000);
  await sleep(2_000);
  assert.deepEqual(await counts(socket), { live: SESSIONS, reaping: 0, reaped: 0 });

  const lagMs = await silenceAndWaitForExpiry(hb, socket, "s2");
  t.diagnostic(`s2 fenced ${Math.round(lagMs)} ms after its last heartbeat (timeout ${TIMEOUT_SEC} s)`);
  const s2 = (await callApi<SessionBody>(socket, "GET", "/v1/sessions/s2")).body;
  assert.equal(s2.reason, "heartbeat_timeout");
  await until(async () => (await stateOf(socket, "s2")) === "reaped", 10_000, "s2 reaped");
  assert.ok(isGone(engines[2]?.pid as number));

  const samples = await hb.stop();
  assert.deepEqual(
    samples.filter((s) => s.status !== 200).map((s) => `${s.id}: ${s.status}`),
    [],
  );
  assert.deepEqual(await counts(socket), { live: SESSIONS - 1, reaping: 0, reaped: 1 });
  assert.equal(daemon.proc.exitCode, null);
});
