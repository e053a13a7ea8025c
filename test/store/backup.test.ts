import assert from "node:assert/strict";
import { copyFileSync, existsSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import BetterSqlite3 from "better-sqlite3";
import { ctl } from "../cli/ctl.js";
import { exited, isGone, sleeper, startDaemon, tempDir, testConfig, until } from "../helpers.js";

type Finished = { at: number; reason?: string; outcome?: string };

test("a backup taken mid-storm restores: started on it, every session ends once and correctly", async (t) => {
  const base = tempDir(t);
  const profiles = {
    // A close hook that holds each reap a few seconds: the backup lands while they run.
    default: { grace_period_sec: 0.5, close_hook: ["sleep", "3"], step_timeout_sec: 10 },
  };
  const dirA = join(base, "a");
  const dirB = join(base, "b");
  mkdirSync(dirA);
  mkdirSync(dirB);
  const a = await startDaemon(t, testConfig(dirA, { profiles }));
  const engines = Array.from({ length: 40 }, () => sleeper(t));
  const id = (i: number): string => `s-${i}`;
  for (const [i, e] of engines.entries()) {
    const r = await a.api("POST", "/v1/sessions", { id: id(i), engine: { pid: e.pid } });
    assert.equal(r.status, 201, JSON.stringify(r.body));
  }
  // The storm: 20 closes at once; the backup while their reaps run.
  const closes = await Promise.all(engines.slice(0, 20).map((_, i) => a.api("DELETE", `/v1/sessions/${id(i)}`)));
  assert.ok(closes.every((r) => r.status === 202));
  const file = join(base, "backup.db");
  const b = await ctl(["backup", file, "--json", "--socket", a.socket]);
  assert.equal(b.code, 0, b.stdout + b.stderr);
  const report = JSON.parse(b.stdout) as { sessions: Record<string, number>; integrity: string; database: string };
  assert.equal(report.integrity, "ok");
  assert.equal(report.database, join(dirA, "reaper.db"));
  assert.ok((report.sessions.reaping ?? 0) > 0, `taken mid-storm: ${JSON.stringify(report.sessions)}`);
  assert.equal((report.sessions.live ?? 0) + (report.sessions.reaping ?? 0) + (report.sessions.reaped ?? 0), 40);
  // A second backup never overwrites the first.
  const again = await ctl(["backup", file, "--socket", a.socket]);
  assert.equal(again.code, 2, again.stderr);
  assert.match(again.stderr, /exists/);

  // The first daemon finishes its storm and stops; meanwhile ten more engines die.
  for (let i = 0; i < 20; i++) await a.reaped(id(i), 20_000);
  await a.stop();
  for (const e of engines.slice(20, 30)) {
    e.kill("SIGKILL");
    await exited(e);
  }

  // Restored: the backup as the database of a daemon started on it.
  copyFileSync(file, join(dirB, "reaper.db"));
  const restored = await startDaemon(t, testConfig(dirB, { profiles }));
  for (let i = 30; i < 40; i++) assert.equal((await restored.api("DELETE", `/v1/sessions/${id(i)}`)).status, 202);
  const ends = new Map<string, Finished>();
  for (let i = 0; i < 40; i++) {
    const s = (await restored.api<{ state: string; reason: string; outcome: string }>("GET", `/v1/sessions/${id(i)}`))
      .body;
    if (s.state === "reaped") ends.set(id(i), { at: 0, reason: s.reason, outcome: s.outcome });
    else ends.set(id(i), await restored.reaped(id(i), 30_000));
  }
  const db = new BetterSqlite3(join(dirB, "reaper.db"), { readonly: true });
  t.after(() => db.close());
  for (let i = 0; i < 40; i++) {
    const s = db.prepare("SELECT state, reason, outcome FROM sessions WHERE id = ?").get(id(i)) as {
      state: string;
      reason: string;
      outcome: string;
    };
    const want = i < 20 ? "closed" : i < 30 ? "engine_gone" : "closed";
    assert.deepEqual([s.state, s.reason, s.outcome], ["reaped", want, "clean"], `${id(i)}: ${JSON.stringify(s)}`);
    // None reaped twice in the restored daemon's audit trail.
    const finished = db
      .prepare("SELECT COUNT(*) AS n FROM audit_events WHERE session_id = ? AND event = 'reap.finished'")
      .get(id(i)) as { n: number };
    assert.equal(finished.n, 1, `${id(i)} reap.finished ${finished.n} times`);
  }
  await until(() => engines.every((e) => isGone(e.pid)), 5_000, "every engine gone").catch(() => undefined);
  assert.deepEqual(
    engines.filter((e) => !isGone(e.pid)).map((e) => e.pid),
    [],
  );
});

test("backup: --db for a stopped daemon; a path that is no database is refused and leaves no file", async (t) => {
  const dir = tempDir(t);
  const config = testConfig(dir);
  const d = await startDaemon(t, config);
  assert.equal((await d.api("POST", "/v1/sessions", { id: "one", engine: { pid: sleeper(t).pid } })).status, 201);
  await d.stop();
  const file = join(dir, "copy.db");
  const r = await ctl(["backup", file, "--db", config.store.path, "--json"]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.deepEqual((JSON.parse(r.stdout) as { sessions: Record<string, number> }).sessions, { live: 1 });

  const junk = join(dir, "junk.db");
  writeFileSync(junk, "not a database, only text ".repeat(200));
  const bad = join(dir, "bad-copy.db");
  const refused = await ctl(["backup", bad, "--db", junk]);
  assert.equal(refused.code, 1, refused.stdout + refused.stderr);
  assert.match(refused.stderr, /cannot back up|failed its check/);
  assert.equal(existsSync(bad), false);
});
