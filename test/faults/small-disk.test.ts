import assert from "node:assert/strict";
import { rmSync, statSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { callApi } from "../../src/client/transport.js";
import { isGone, sleeper, spawnDaemon, tempDir, until, writeConfig } from "../helpers.js";
import {
  counts,
  fillUp,
  heartbeats,
  metric,
  mountTmpfs,
  register,
  sleep,
  stateOf,
  type ErrorBody,
  type SessionBody,
} from "./lib.js";

/** The smallest disk docs/operations.md states the daemon lives on ("The disk under the database"). */
const SIZE = "448k";
/** On a disk of 1 MiB or less the WAL's bound (and the reserve) is 64 KiB, the headroom 128 KiB. */
const WAL_BOUND = 64 * 1024;
const SESSIONS = 40;
/** Heartbeats every second: a client held up to 5 s by a busy host is not taken for gone. */
const TIMEOUT_SEC = 6;
const ROUNDS = 8;

const sizeOf = (file: string): number => {
  try {
    return statSync(file).size;
  } catch {
    return 0;
  }
};

function assertRefused(what: string, r: { status: number; body: unknown }): void {
  assert.equal(r.status, 503, `${what}: ${r.status} ${JSON.stringify(r.body)}`);
  assert.equal((r.body as ErrorBody).error.code, "SR_STORE_UNAVAILABLE", `${what}: ${JSON.stringify(r.body)}`);
}

/**
 * Issue 22's small disk: the database alone on a tmpfs of the smallest size docs/operations.md states,
 * 40 sessions heartbeating every second over the real socket, registrations, force-reaps and
 * expiries going on. The WAL stays within its bound and the store commits throughout (before,
 * the WAL filled a 2 MiB disk in 24 s and the store never came back). Then something else
 * fills the disk: changes answer 503 and sessions fall overdue; once it is removed the store
 * commits again by itself, the overdue sessions are reaped, registrations and force-reaps
 * work. Twice.
 */
test(`the smallest disk (${SIZE}): ${SESSIONS} sessions at 1 Hz, reaps and registrations; a fill by something else and its removal, twice`, async (t) => {
  const dir = tempDir(t);
  const mnt = mountTmpfs(dir, "db", SIZE);
  const socket = join(dir, "reaper.sock");
  const db = join(mnt, "reaper.db");
  const file = writeConfig(
    dir,
    `[api]
socket = "${socket}"
[store]
path = "${db}"
[profiles.default]
heartbeat_timeout_sec = ${TIMEOUT_SEC}
grace_period_sec = 1
allowed_roots = ["${dir}"]
`,
  );
  const daemon = await spawnDaemon(t, file, socket);
  const ids = Array.from({ length: SESSIONS }, (_, i) => `hb-${i}`);
  const engines = new Map<string, number>();
  const start = async (id: string): Promise<void> => {
    const e = sleeper(t, "sleep", ["600"]);
    engines.set(id, e.pid);
    const r = await register(socket, id, e.pid);
    assert.equal(r.status, 201, `${id}: ${r.status} ${JSON.stringify(r.body)} (WAL ${sizeOf(`${db}-wal`)} bytes)`);
  };
  for (const id of ids) await start(id);
  const hb = heartbeats(t, socket, ids, 1000);

  // Watched every 200 ms: the WAL's size and whether the store commits.
  let maxWal = 0;
  let outages = 0;
  let watching = true;
  const watch = (async () => {
    while (watching) {
      maxWal = Math.max(maxWal, sizeOf(`${db}-wal`));
      if ((await metric(socket, "session_reaper_store_available")) !== 1) outages++;
      await sleep(200);
    }
  })();
  t.after(() => void (watching = false));

  // Churn: each round a session registered (heartbeating), the previous one force-reaped, and a
  // quiet one registered that expires on its heartbeat timeout.
  const churn: ReturnType<typeof heartbeats>[] = [];
  const reaped: string[] = [];
  for (let k = 0; k < ROUNDS; k++) {
    await start(`c-${k}`);
    churn.push(heartbeats(t, socket, [`c-${k}`], 1000));
    await start(`q-${k}`);
    reaped.push(`q-${k}`);
    if (k > 0) {
      churn[k - 1]?.quiet(`c-${k - 1}`);
      await sleep(300); // a heartbeat in flight is answered
      const r = await callApi(socket, "POST", `/v1/sessions/c-${k - 1}/reap`);
      assert.equal(r.status, 202, `force-reap c-${k - 1}: ${r.status} ${JSON.stringify(r.body)}`);
      reaped.push(`c-${k - 1}`);
    }
    await sleep(2000);
  }
  await until(
    async () => (await Promise.all(reaped.map((id) => stateOf(socket, id)))).every((s) => s === "reaped"),
    20_000,
    "every forced and expired session reaped",
  );
  for (const id of reaped) {
    const s = (await callApi<SessionBody>(socket, "GET", `/v1/sessions/${id}`)).body;
    assert.equal(s.reason, id.startsWith("q-") ? "heartbeat_timeout" : "forced", id);
  }
  watching = false;
  await watch;
  t.diagnostic(
    `steady: largest WAL ${maxWal} bytes; database ${sizeOf(db)} bytes; ${reaped.length} reaped; outages seen ${outages}`,
  );
  assert.equal(outages, 0, "the store stopped committing on its own");
  assert.equal(await metric(socket, "session_reaper_store_faults_total"), 0);
  assert.ok(maxWal <= 2 * WAL_BOUND, `the WAL reached ${maxWal} bytes`);

  const last = `c-${ROUNDS - 1}`;
  for (const cycle of [1, 2]) {
    // Something else fills the disk.
    const filler = join(mnt, "filler");
    fillUp(filler);
    const extra = sleeper(t, "sleep", ["600"]);
    assertRefused(`registration (fill ${cycle})`, await register(socket, `full-${cycle}`, extra.pid));
    const overdue = ids.slice((cycle - 1) * 5, cycle * 5);
    for (const id of overdue) hb.quiet(id);
    if (cycle === 1) assertRefused("force-reap", await callApi(socket, "POST", `/v1/sessions/${last}/reap`));
    // Past their heartbeat timeout while the store cannot commit: nothing is reaped on time alone.
    await sleep(TIMEOUT_SEC * 1000 + 2000);
    assert.equal(await metric(socket, "session_reaper_store_available"), 0);
    for (const id of overdue) assert.equal(await stateOf(socket, id), "live", id);

    rmSync(filler);
    const removedAt = performance.now();
    await until(
      async () => (await metric(socket, "session_reaper_store_available")) === 1,
      15_000,
      `store available after fill ${cycle} was removed`,
    );
    const backAfter = performance.now() - removedAt;
    await until(
      async () => (await Promise.all(overdue.map((id) => stateOf(socket, id)))).every((s) => s === "reaped"),
      20_000,
      `overdue sessions reaped after fill ${cycle}`,
    );
    for (const id of overdue) {
      const s = (await callApi<SessionBody>(socket, "GET", `/v1/sessions/${id}`)).body;
      assert.equal(s.reason, "heartbeat_timeout", id);
      assert.ok(isGone(engines.get(id) as number), `${id}'s engine`);
    }
    const reg = await register(socket, `after-${cycle}`, extra.pid);
    assert.equal(reg.status, 201, `registration after fill ${cycle}: ${JSON.stringify(reg.body)}`);
    churn.push(heartbeats(t, socket, [`after-${cycle}`], 1000));
    if (cycle === 1) {
      churn[ROUNDS - 1]?.quiet(last);
      await sleep(300);
      const r = await callApi(socket, "POST", `/v1/sessions/${last}/reap`);
      assert.equal(r.status, 202, JSON.stringify(r.body));
      await until(async () => (await stateOf(socket, last)) === "reaped", 15_000, `${last} force-reaped`);
    }
    t.diagnostic(
      `fill ${cycle}: store back ${Math.round(backAfter)} ms after the removal; database ${sizeOf(db)} bytes, WAL ${sizeOf(`${db}-wal`)} bytes`,
    );
  }

  const list = await callApi<{ sessions: SessionBody[] }>(socket, "GET", "/v1/sessions?state=live&limit=1000");
  assert.deepEqual(
    list.body.sessions.map((s) => s.id).sort(),
    [...ids.slice(10), "after-1", "after-2"].sort(),
    "live sessions",
  );
  assert.equal((await counts(socket)).reaping, 0);
  const samples = [...(await hb.stop()), ...(await Promise.all(churn.map((h) => h.stop()))).flat()];
  assert.deepEqual(
    samples.filter((s) => s.status !== 200).map((s) => `${s.id}: ${s.status} ${s.error ?? ""}`),
    [],
  );
  daemon.proc.kill("SIGTERM");
  assert.equal(await daemon.exit, 0);
});
