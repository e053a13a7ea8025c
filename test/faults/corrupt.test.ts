import BetterSqlite3 from "better-sqlite3";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { closeSync, existsSync, openSync, statSync, writeSync } from "node:fs";
import { test } from "node:test";
import { callApi } from "../../src/client/transport.js";
import { sleeper, spawnDaemon, tempDir, writeDaemonConfig } from "../helpers.js";
import { auditLines, register, runReaperd } from "./lib.js";

const EXIT_CONFIG = 78;
const PAGE = 4096;

/**
 * The database file is damaged (a bad disk, a copy taken mid-write, a careless `dd`). The
 * daemon must not run on it: a corrupt sessions table would lose sessions silently (never
 * reaped) or fail at the first write. It exits 78 (systemd's RestartPreventExitStatus=
 * stops the restart loop) with a message that says the database is corrupt and what to
 * do, and never serves the socket.
 */
test("a page of the database overwritten with garbage: reaperd exits 78 saying so, and serves nothing", async (t) => {
  const dir = tempDir(t);
  const { file, socket, db } = writeDaemonConfig(dir);
  const first = await spawnDaemon(t, file, socket);
  const engine = sleeper(t, "sleep", ["120"]);
  // Enough rows for the file to span well past page 3 (labels make each row ~300 bytes).
  for (let i = 0; i < 200; i++) {
    const r = await register(socket, `c${i}`, engine.pid, { labels: { note: "x".repeat(200) } });
    assert.equal(r.status, 201, JSON.stringify(r.body));
  }
  first.proc.kill("SIGTERM");
  assert.equal(await first.exit, 0);
  assert.ok(!existsSync(`${db}-wal`), "the WAL was checkpointed into the file at stop");
  assert.ok(statSync(db).size >= PAGE * 10, `database of ${statSync(db).size} bytes`);

  // Page 3 (bytes 8192..12287): random bytes.
  const fd = openSync(db, "r+");
  writeSync(fd, randomBytes(PAGE), 0, PAGE, PAGE * 2);
  closeSync(fd);
  // The damage is real: SQLite's own check sees it.
  const check = new BetterSqlite3(db, { readonly: true, fileMustExist: true });
  let verdict: string;
  try {
    verdict = JSON.stringify(check.pragma("quick_check"));
  } catch (err) {
    verdict = String(err);
  } finally {
    check.close();
  }
  assert.ok(!verdict.includes('"ok"'), `quick_check after the damage: ${verdict}`);

  const run = await runReaperd(t, file, { timeoutMs: 15_000 }).finished;
  t.diagnostic(`exit ${run.code} (${run.signal}) after ${Math.round(run.ms)} ms; stderr: ${run.stderr.trim()}`);
  assert.equal(run.code, EXIT_CONFIG, `exit ${run.code} (${run.signal}); stderr: ${run.stderr}`);
  assert.ok(run.ms < 5_000, `took ${Math.round(run.ms)} ms to exit`);
  assert.match(run.stderr, /corrupt/i, "stderr says the database is corrupt");
  assert.ok(run.stderr.includes(db), "stderr names the database file");
  assert.match(
    run.stderr,
    /\b(restore|backup|move|rename|remove|delete|recreate|recover)/i,
    "stderr says what to do about it",
  );
  assert.deepEqual(
    auditLines(run.stdout).map((e) => e.event),
    [],
    "no audit line (daemon.started) from a daemon that refused to run",
  );
  await assert.rejects(callApi(socket, "GET", "/healthz"), { code: "SR_DAEMON_UNREACHABLE" });
});
