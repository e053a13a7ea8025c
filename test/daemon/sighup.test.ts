import assert from "node:assert/strict";
import { existsSync, mkdirSync, readFileSync, renameSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import BetterSqlite3 from "better-sqlite3";
import { callApi } from "../../src/client/transport.js";
import { ctl } from "../cli/ctl.js";
import { orDied, register, stateOf } from "../faults/lib.js";
import { sleeper, spawnDaemon, tempDir, until, writeDaemonConfig } from "../helpers.js";

type Line = { msg?: string; event?: string; sessionId?: string; level?: string };

/** Every line of a log file, parsed (a line that is not JSON fails the test). */
function lines(file: string): Line[] {
  const text = readFileSync(file, "utf8");
  assert.ok(text.endsWith("\n"), `${file} ends with a whole line`);
  return text
    .split("\n")
    .filter((l) => l !== "")
    .map((l) => JSON.parse(l) as Line);
}

/** A daemon logging to `log` (or stdout when null), at level info. */
async function daemonWithLog(t: Parameters<typeof tempDir>[0], dir: string, log: string | null) {
  const { file, socket } = writeDaemonConfig(
    dir,
    `[log]
level = "info"
${log === null ? "" : `file = "${log}"`}
[profiles.default]
grace_period_sec = 1
allowed_roots = ["${dir}"]
`,
  );
  const daemon = await spawnDaemon(t, file, socket);
  const registered = async (id: string): Promise<void> => {
    const r = await orDied(daemon, register(socket, id, sleeper(t, "sleep", ["120"]).pid));
    assert.equal(r.status, 201, `${id}: ${JSON.stringify(r.body)}`);
  };
  const hangup = (): void => void daemon.proc.kill("SIGHUP");
  /** `cond`, unless the daemon died meanwhile (SIGHUP's default action): then that is the failure. */
  const aliveAnd = (cond: () => boolean) => (): boolean => {
    const { exitCode, signalCode } = daemon.proc;
    if (exitCode !== null || signalCode !== null)
      throw new Error(`the daemon died: exit ${exitCode}, signal ${signalCode}`);
    return cond();
  };
  return { daemon, socket, registered, hangup, aliveAnd };
}

/**
 * logrotate's `create` rotation: the file is moved away, then postrotate sends SIGHUP (as
 * `systemctl reload` does, the unit's ExecReload). Before, SIGHUP's default action killed the
 * daemon. Now it lives on, serves, and writes to a new file at the configured path; the moved
 * file holds every line up to the reopen, whole, and the two files verify as one trail.
 */
test("SIGHUP after the log file was moved away: the daemon lives on and writes a new file; the old one is complete", async (t) => {
  const dir = tempDir(t);
  const log = join(dir, "log", "reaper.log");
  const { daemon, socket, registered, hangup, aliveAnd } = await daemonWithLog(t, dir, log);
  await registered("s1");
  await registered("s2");
  renameSync(log, `${log}.1`);
  await registered("s3"); // to the open file, moved or not, until the signal
  hangup();
  await until(
    aliveAnd(() => existsSync(log) && readFileSync(log, "utf8").includes('"msg":"log file reopened"}\n')),
    10_000,
    "new log file",
  );
  assert.equal(daemon.proc.exitCode, null, `the daemon exited: ${daemon.output().slice(-2000)}`);
  assert.equal(daemon.proc.signalCode, null);

  assert.equal((await orDied(daemon, callApi(socket, "GET", "/readyz"))).status, 200);
  await registered("s4");
  assert.equal((await orDied(daemon, callApi(socket, "DELETE", "/v1/sessions/s1"))).status, 202);
  await until(async () => (await orDied(daemon, stateOf(socket, "s1"))) === "reaped", 15_000, "s1 reaped");

  const old = lines(`${log}.1`);
  assert.deepEqual(
    old.filter((l) => l.event === "session.registered").map((l) => l.sessionId),
    ["s1", "s2", "s3"],
  );
  assert.equal(old.at(-1)?.msg, "reopening the log file", "the old file ends where the new one begins");
  const now = lines(log);
  assert.equal(now[0]?.msg, "log file reopened");
  assert.deepEqual(
    now.filter((l) => l.event === "session.registered").map((l) => l.sessionId),
    ["s4"],
  );
  assert.ok(now.some((l) => l.event === "reap.finished" && l.sessionId === "s1"));

  // The rotated trail, oldest file first, is one complete trail.
  const both = readFileSync(`${log}.1`, "utf8") + readFileSync(log, "utf8");
  const verify = await ctl(["audit", "verify", "--socket", socket], {}, both);
  assert.equal(verify.code, 0, verify.stdout + verify.stderr);
  assert.match(verify.stdout, /^sessions seen\s+4$/m);
  assert.match(verify.stdout, /^reaped\s+1$/m);

  daemon.proc.kill("SIGTERM");
  assert.equal(await daemon.exit, 0);
});

test("SIGHUP while logging to stdout: logged and ignored", async (t) => {
  const dir = tempDir(t);
  const { daemon, socket, registered, hangup, aliveAnd } = await daemonWithLog(t, dir, null);
  hangup();
  await until(
    aliveAnd(() => daemon.output().includes("SIGHUP: logging to stdout, no log file to reopen")),
    10_000,
    "logged",
  );
  hangup();
  await registered("s1");
  assert.equal((await orDied(daemon, callApi(socket, "GET", "/readyz"))).status, 200);
  assert.equal(daemon.proc.exitCode, null);
  daemon.proc.kill("SIGTERM");
  assert.equal(await daemon.exit, 0);
});

test("SIGHUP when the log file cannot be opened again: an error on record, lines go on to the open file", async (t) => {
  const dir = tempDir(t);
  const log = join(dir, "reaper.log");
  const { daemon, socket, registered, hangup, aliveAnd } = await daemonWithLog(t, dir, log);
  renameSync(log, `${log}.1`);
  mkdirSync(log); // a directory where the file should be made: EISDIR
  hangup();
  await until(
    aliveAnd(() => readFileSync(`${log}.1`, "utf8").includes('"msg":"the log file could not be reopened')),
    10_000,
    "the failure logged",
  );
  await registered("s1");
  assert.ok(lines(`${log}.1`).some((l) => l.event === "session.registered" && l.sessionId === "s1"));
  assert.equal((await orDied(daemon, callApi(socket, "GET", "/readyz"))).status, 200);
  daemon.proc.kill("SIGTERM");
  assert.equal(await daemon.exit, 0);
});

/**
 * Rotation under load: about a thousand audit events a second (PATCHes: one session.updated
 * each, with a label that names it), and the log moved away and reopened three times
 * meanwhile. Every event the daemon committed is in exactly one of the files, whole, once.
 */
test("SIGHUP under a load of audit events (about 3,000 a second here, alone): three rotations, no line lost, none written twice", async (t) => {
  const dir = tempDir(t);
  const log = join(dir, "log", "reaper.log");
  const { daemon, socket, registered, hangup, aliveAnd } = await daemonWithLog(t, dir, log);
  const ids = ["h0", "h1", "h2", "h3", "h4"];
  for (const id of ids) await registered(id);
  let n = 0;
  let answered = 0;
  let running = true;
  // Five clients, one per session, each PATCHing as fast as the daemon answers.
  const clients = ids.map(async (id) => {
    while (running) {
      const k = n++;
      const r = await orDied(daemon, callApi(socket, "PATCH", `/v1/sessions/${id}`, { labels: { n: String(k) } }));
      assert.equal(r.status, 200, JSON.stringify(r.body));
      answered++;
    }
  });
  const started = performance.now();
  for (let rotation = 1; rotation <= 3; rotation++) {
    await new Promise((r) => setTimeout(r, 700));
    renameSync(log, `${log}.${rotation}`);
    hangup();
    await until(
      aliveAnd(() => existsSync(log)),
      10_000,
      `reopened (${rotation})`,
    );
  }
  await new Promise((r) => setTimeout(r, 700));
  running = false;
  await Promise.all(clients);
  const perSec = answered / ((performance.now() - started) / 1000);
  t.diagnostic(`${answered} PATCHes answered, ${perSec.toFixed(0)} a second`);
  daemon.proc.kill("SIGTERM");
  assert.equal(await daemon.exit, 0);

  // Oldest first: the three moved files, then the current one. Each is whole lines only.
  const files = [`${log}.1`, `${log}.2`, `${log}.3`, log];
  const updated = files.flatMap((f) => lines(f).filter((l) => l.event === "session.updated")) as (Line & {
    detail?: { added?: { labels?: Record<string, string> } };
  })[];
  const seen = new Map<string, number>();
  for (const l of updated) {
    const key = `${l.sessionId ?? "?"}:${l.detail?.added?.labels?.n ?? "?"}`;
    seen.set(key, (seen.get(key) ?? 0) + 1);
  }
  const twice = [...seen].filter(([, c]) => c > 1).map(([k]) => k);
  assert.deepEqual(twice, [], "lines written twice");
  assert.equal(updated.length, answered, "a line for every PATCH answered 200");
  // Each file holds some of them: every rotation happened under load.
  for (const f of files)
    assert.ok(
      lines(f).some((l) => l.event === "session.updated"),
      `${f} has events`,
    );
  // And SQLite agrees: as many events as lines.
  const db = new BetterSqlite3(join(dir, "reaper.db"), { readonly: true });
  t.after(() => db.close());
  const stored = db.prepare("SELECT COUNT(*) AS n FROM audit_events WHERE event = 'session.updated'").get() as {
    n: number;
  };
  assert.equal(stored.n, answered);
});
