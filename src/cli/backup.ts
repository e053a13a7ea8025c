/**
 * `reaperctl backup FILE`: a consistent copy of the daemon's database while it runs, through
 * SQLite's online backup API. The daemon says where its database is (GET /v1/daemon's
 * `database`; `--db` names it instead), reaperctl reads it with a connection of its own (so
 * it needs read access to the database, its -wal and -shm: root or the daemon's user), and
 * writes FILE through a temporary name renamed at the end. The copy is one snapshot: the last
 * step copies every page left inside one read transaction (in WAL mode the daemon's writes go
 * on meanwhile; a write between two steps makes SQLite start the copy again), then the copy's
 * integrity is checked. FILE must not exist.
 */
import BetterSqlite3 from "better-sqlite3";
import { existsSync, renameSync, rmSync, statSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { errorMessage } from "../errors.js";
import { EXIT, UsageError, apiFailure, stringOption, type Context } from "./command.js";
import { table } from "./format.js";

/** Pages per step after the first: all that is left, in one read transaction. */
const ALL_AT_ONCE = 0x7fffffff;

export async function backup(ctx: Context): Promise<number> {
  if (ctx.args.length !== 1) throw new UsageError("backup takes exactly one FILE");
  const file = resolve(ctx.args[0] as string);
  if (existsSync(file)) throw new UsageError(`${file} exists: give a new file name (a backup never overwrites)`);
  if (!existsSync(dirname(file))) throw new UsageError(`${dirname(file)}: no such directory`);
  let source = stringOption(ctx.values, "db");
  if (source === undefined) {
    const res = await ctx.api<{ database?: string }>("GET", "/v1/daemon");
    if (res.status !== 200) return apiFailure(ctx, res);
    source = res.body.database;
    if (source === undefined || source === ":memory:") {
      ctx.note("the daemon does not say where its database is (an older daemon, or an in-memory one): give --db PATH");
      return EXIT.error;
    }
  }
  source = resolve(source);
  const partial = `${file}.partial-${process.pid}`;
  const started = performance.now();
  let db: BetterSqlite3.Database | null = null;
  try {
    db = new BetterSqlite3(source, { readonly: true, fileMustExist: true });
    await db.backup(partial, { progress: () => ALL_AT_ONCE });
  } catch (err) {
    rmSync(partial, { force: true });
    ctx.note(`cannot back up ${source}: ${errorMessage(err)}`);
    return EXIT.error;
  } finally {
    db?.close();
  }
  let summary: { sessions: Record<string, number>; tombstones: number; check: string };
  try {
    summary = check(partial);
  } catch (err) {
    rmSync(partial, { force: true });
    ctx.note(`the copy of ${source} failed its check: ${errorMessage(err)}`);
    return EXIT.error;
  }
  renameSync(partial, file);
  const result = {
    file,
    database: source,
    bytes: statSync(file).size,
    ms: Math.round(performance.now() - started),
    sessions: summary.sessions,
    tombstones: summary.tombstones,
    integrity: summary.check,
  };
  ctx.out(
    ctx.json
      ? JSON.stringify(result, null, 2) + "\n"
      : table([
          ["backup", file],
          ["of", source],
          ["size", `${result.bytes} bytes`],
          ["took", `${result.ms} ms`],
          [
            "sessions",
            Object.entries(summary.sessions)
              .map(([state, n]) => `${n} ${state}`)
              .join(", ") || "none",
          ],
          ["tombstones", String(summary.tombstones)],
          ["integrity", summary.check],
        ]),
  );
  return EXIT.ok;
}

/** The copy's integrity and what it holds; throws if it is not a sound database. */
function check(file: string): { sessions: Record<string, number>; tombstones: number; check: string } {
  const copy = new BetterSqlite3(file, { readonly: true, fileMustExist: true });
  try {
    const rows = copy.pragma("integrity_check(5)", { simple: false }) as { integrity_check: string }[];
    const problems = rows.map((r) => r.integrity_check).filter((m) => m !== "ok");
    if (problems.length > 0) throw new Error(problems.join("; "));
    const sessions: Record<string, number> = {};
    for (const r of copy.prepare("SELECT state, COUNT(*) AS n FROM sessions GROUP BY state").all() as {
      state: string;
      n: number;
    }[]) {
      sessions[r.state] = r.n;
    }
    const hasTombstones = copy.prepare("SELECT 1 FROM sqlite_schema WHERE name = 'tombstones'").get() !== undefined;
    const tombstones = hasTombstones
      ? (copy.prepare("SELECT COUNT(*) AS n FROM tombstones").get() as { n: number }).n
      : 0;
    return { sessions, tombstones, check: "ok" };
  } finally {
    copy.close();
  }
}
