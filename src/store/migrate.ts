import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { Database } from "better-sqlite3";
import { ReaperError } from "../errors.js";

/** The package's migrations/, seen from the built file dist/src/store/migrate.js. */
export const MIGRATIONS_DIR = fileURLToPath(new URL("../../../migrations/", import.meta.url));

interface Migration {
  version: number;
  name: string;
  sql: string;
}

function readMigrations(dir: string): Migration[] {
  return readdirSync(dir)
    .filter((f) => /^\d{3}_[a-z0-9_]+\.sql$/.test(f))
    .sort()
    .map((f) => ({ version: Number(f.slice(0, 3)), name: f, sql: readFileSync(join(dir, f), "utf8") }));
}

/**
 * Applies the numbered, append-only migrations in order, each in its own transaction and
 * recorded in schema_migrations (graphile-worker's src/migrate.ts). A database written by a
 * newer build is refused rather than guessed at.
 */
export function migrate(db: Database, now: number, dir = MIGRATIONS_DIR): number[] {
  db.exec(`CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)`);
  const applied = new Set(
    (db.prepare("SELECT version FROM schema_migrations").all() as { version: number }[]).map((r) => r.version),
  );
  const known = readMigrations(dir);
  const newest = Math.max(0, ...known.map((m) => m.version));
  const unknown = [...applied].filter((v) => v > newest);
  if (unknown.length > 0) {
    throw new ReaperError(
      "SR_CONFIG_INVALID",
      `the database has migrations ${unknown.join(", ")} that this build does not know: it was written by a newer session-reaper`,
    );
  }
  const done: number[] = [];
  for (const m of known) {
    if (applied.has(m.version)) continue;
    // IMMEDIATE takes the write lock first; the re-check inside it makes a daemon that lost
    // the race to another one (started on the same file) skip what the winner applied.
    const isApplied = db.prepare("SELECT 1 FROM schema_migrations WHERE version = ?");
    const ran = db
      .transaction(() => {
        if (isApplied.get(m.version) !== undefined) return false;
        db.exec(m.sql);
        db.prepare("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)").run(
          m.version,
          m.name,
          now,
        );
        return true;
      })
      .immediate();
    if (ran) done.push(m.version);
  }
  return done;
}
