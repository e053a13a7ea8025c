import assert from "node:assert/strict";
import { copyFileSync, mkdirSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import BetterSqlite3 from "better-sqlite3";
import { ReaperError } from "../../src/errors.js";
import { MIGRATIONS_DIR, migrate } from "../../src/store/migrate.js";
import { Store } from "../../src/store/store.js";
import { tempDir } from "../helpers.js";

const T0 = Date.UTC(2026, 0, 1);

/** The .sql migrations shipped with the package, in order. */
const SHIPPED = readdirSync(MIGRATIONS_DIR)
  .filter((f) => /^\d{3}_[a-z0-9_]+\.sql$/.test(f))
  .sort();

function open(t: { after: (fn: () => void) => void }, file: string): BetterSqlite3.Database {
  const db = new BetterSqlite3(file);
  t.after(() => db.close());
  return db;
}

function applied(db: BetterSqlite3.Database): { version: number; name: string; applied_at: number }[] {
  return db.prepare("SELECT version, name, applied_at FROM schema_migrations ORDER BY version").all() as {
    version: number;
    name: string;
    applied_at: number;
  }[];
}

function tables(db: BetterSqlite3.Database): string[] {
  return (
    db.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").all() as { name: string }[]
  ).map((r) => r.name);
}

test("the package ships at least the initial migration", () => {
  assert.ok(SHIPPED.length >= 1);
  assert.equal(SHIPPED[0], "001_initial.sql");
});

test("a fresh database gets every migration once, recorded in schema_migrations", (t) => {
  const dir = tempDir(t);
  const db = open(t, join(dir, "r.db"));
  const done = migrate(db, T0);
  assert.deepEqual(
    done,
    SHIPPED.map((f) => Number(f.slice(0, 3))),
  );
  assert.deepEqual(
    applied(db),
    SHIPPED.map((f) => ({ version: Number(f.slice(0, 3)), name: f, applied_at: T0 })),
  );
  for (const table of ["audit_events", "reap_steps", "schema_migrations", "sessions"]) {
    assert.ok(tables(db).includes(table), `table ${table} missing`);
  }
});

test("migrating again, on the same or a reopened connection, applies nothing", (t) => {
  const dir = tempDir(t);
  const file = join(dir, "r.db");
  const first = new BetterSqlite3(file);
  migrate(first, T0);
  assert.deepEqual(migrate(first, T0 + 1), []);
  first.close();

  const again = open(t, file);
  assert.deepEqual(migrate(again, T0 + 2), []);
  assert.ok(
    applied(again).every((r) => r.applied_at === T0),
    "applied_at was rewritten",
  );
  assert.equal(applied(again).length, SHIPPED.length);
});

test("reopening a Store applies nothing new and keeps the data", (t) => {
  const dir = tempDir(t);
  const file = join(dir, "r.db");
  const a = new Store(file, T0);
  a.insertEvent({ at: T0, event: "daemon.started" });
  a.close();
  const b = new Store(file, T0 + 60_000);
  t.after(() => b.close());
  assert.deepEqual(applied(b.db), applied(open(t, file)));
  assert.ok(applied(b.db).every((r) => r.applied_at === T0));
  assert.equal((b.db.prepare("SELECT COUNT(*) AS n FROM audit_events").get() as { n: number }).n, 1);
});

test("only migrations not yet recorded are applied, in order", (t) => {
  const dir = tempDir(t);
  const migrations = join(dir, "migrations") + "/";
  mkdirSync(migrations);
  for (const f of SHIPPED) copyFileSync(join(MIGRATIONS_DIR, f), join(migrations, f));
  const db = open(t, join(dir, "r.db"));
  const first = migrate(db, T0, migrations);
  assert.equal(first.length, SHIPPED.length);

  const next = SHIPPED.length + 1;
  const name = `${String(next).padStart(3, "0")}_add_probe.sql`;
  writeFileSync(join(migrations, name), "CREATE TABLE probe (x INTEGER);\n");
  writeFileSync(join(migrations, "README.txt"), "not a migration");
  assert.deepEqual(migrate(db, T0 + 5, migrations), [next]);
  assert.ok(tables(db).includes("probe"));
  assert.deepEqual(applied(db).at(-1), { version: next, name, applied_at: T0 + 5 });
  assert.deepEqual(migrate(db, T0 + 6, migrations), []);
});

test("a failing migration is rolled back and not recorded", (t) => {
  const dir = tempDir(t);
  const migrations = join(dir, "migrations") + "/";
  mkdirSync(migrations);
  writeFileSync(join(migrations, "001_ok.sql"), "CREATE TABLE a (x INTEGER);\n");
  writeFileSync(join(migrations, "002_broken.sql"), "CREATE TABLE b (x INTEGER);\nTHIS IS NOT SQL;\n");
  const db = open(t, join(dir, "r.db"));
  assert.throws(() => migrate(db, T0, migrations));
  assert.deepEqual(
    applied(db).map((r) => r.version),
    [1],
  );
  assert.ok(tables(db).includes("a"));
  assert.ok(!tables(db).includes("b"), "the broken migration's first statement was kept");
});

test("a database with a migration newer than this build is refused", (t) => {
  const dir = tempDir(t);
  const file = join(dir, "r.db");
  const db = new BetterSqlite3(file);
  migrate(db, T0);
  db.prepare("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)").run(
    999,
    "999_from_the_future.sql",
    T0,
  );
  db.close();

  const again = open(t, file);
  assert.throws(
    () => migrate(again, T0),
    (err: unknown) => err instanceof ReaperError && err.code === "SR_CONFIG_INVALID",
  );
  assert.throws(
    () => new Store(file, T0),
    (err: unknown) => err instanceof ReaperError && err.code === "SR_CONFIG_INVALID",
  );
});

test("the (state, deadline) index exists and the expiry probe uses it", (t) => {
  const dir = tempDir(t);
  const store = new Store(join(dir, "r.db"), T0);
  t.after(() => store.close());
  const idx = store.db
    .prepare("SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' AND name = 'sessions_state_deadline'")
    .get() as { name: string; tbl_name: string } | undefined;
  assert.deepEqual(idx, { name: "sessions_state_deadline", tbl_name: "sessions" });
  const cols = (store.db.prepare("PRAGMA index_info(sessions_state_deadline)").all() as { name: string }[]).map(
    (r) => r.name,
  );
  assert.deepEqual(cols, ["state", "deadline"]);

  const plan = (
    store.db
      .prepare("EXPLAIN QUERY PLAN SELECT id FROM sessions WHERE state='live' ORDER BY deadline LIMIT 1")
      .all() as { detail: string }[]
  ).map((r) => r.detail);
  assert.ok(
    plan.some((d) => d.includes("USING INDEX sessions_state_deadline")),
    plan.join(" | "),
  );
  assert.ok(!plan.some((d) => d.includes("TEMP B-TREE")), `the probe sorts: ${plan.join(" | ")}`);
  assert.ok(!plan.some((d) => /^SCAN sessions$/.test(d)), `the probe scans: ${plan.join(" | ")}`);
});
