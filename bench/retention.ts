/**
 * Figure 12, a year on a host in minutes: 1,000,000 sessions registered and closed, one after
 * the other in batches, with store.retain_reaped_sec = 60 (and tombstones kept 120 s, so
 * that they too reach their steady state within the run; by default they are kept a year): the
 * database's size and the daemon's RSS after 250,000, 500,000 and 1,000,000, and the reaps a
 * second. Goal: bounded, the size at the end within 1.2 × the size at the first point
 * (retention purges what is older than a minute, and incremental vacuum gives the pages back).
 * BENCH_QUICK=1: 100,000 sessions, points at 25,000, 50,000 and 100,000, retention 10 s.
 *
 * Each point is measured right after a retention pass ended (its store.purged line, then a
 * second for the vacuum), so every point holds the same span of reaped sessions: measured at
 * any moment, the rows held vary by the pass interval (a quarter of the retention). The size
 * judged is the database's own, page_count × page_size (what the file holds once the WAL is
 * checkpointed); the file and its WAL (bounded by the daemon at 4 MiB) are reported beside it.
 *
 * Each batch of sessions names one engine (`sleep`), so a close costs a whole reap without a
 * process per session: the batch's first reap ends the engine, and the rest are reaped as
 * `engine_gone` (a close that comes after answers 409) or find it gone. The
 * closes are not waited for; a batch starts once fewer than BACKLOG sessions are reaping.
 */
import { closeSync, fstatSync, openSync, readSync, statSync } from "node:fs";
import BetterSqlite3 from "better-sqlite3";
import { callApi } from "../src/client/transport.js";
import { startReaperd } from "./lib/daemon.js";
import { MB, rssBytes } from "./lib/proc.js";
import { QUICK, fmt, report, runFigure, say, sleep } from "./lib/report.js";
import { cleanupAll, start, tempDir } from "./lib/resources.js";

const TOTAL = Number(process.env.RETENTION_TOTAL ?? (QUICK ? 100_000 : 1_000_000));
const POINTS = [TOTAL / 4, TOTAL / 2, TOTAL];
const RETAIN_SEC = QUICK ? 10 : 60;
const BATCH = 250;
const IN_FLIGHT = 16;
const BACKLOG = 2_000;
const GOAL = 1.2;

function fileSize(path: string): number {
  try {
    return statSync(path).size;
  } catch {
    return 0; // no WAL at this moment
  }
}

/** The database's own size (pages in use and free, as its header says), read by a connection of ours. */
function pagesSize(path: string): { bytes: number; free: number; tombstones: number } {
  const db = new BetterSqlite3(path, { readonly: true, fileMustExist: true });
  try {
    const pages = db.pragma("page_count", { simple: true }) as number;
    const size = db.pragma("page_size", { simple: true }) as number;
    const free = db.pragma("freelist_count", { simple: true }) as number;
    const tombstones = (db.prepare("SELECT COUNT(*) AS n FROM tombstones").get() as { n: number }).n;
    return { bytes: pages * size, free: free * size, tombstones };
  } finally {
    db.close();
  }
}

const PURGED = '"event":"store.purged"';

/**
 * store.purged lines in the daemon's log so far, read as the log grows: only what was
 * appended since the last call (a million reaps write about 3.5 GB of log, more than one
 * string can hold). A match cut by a read is found whole in the next one, with the tail kept.
 */
class PurgeCount {
  private offset = 0;
  private tail = "";
  private n = 0;
  private readonly buf = Buffer.alloc(1 << 20);

  constructor(private readonly file: string) {}

  read(): number {
    const fd = openSync(this.file, "r");
    try {
      const size = fstatSync(fd).size;
      while (this.offset < size) {
        const got = readSync(fd, this.buf, 0, Math.min(this.buf.length, size - this.offset), this.offset);
        if (got === 0) break;
        this.offset += got;
        const text = this.tail + this.buf.toString("latin1", 0, got);
        this.n += text.split(PURGED).length - 1;
        this.tail = text.slice(-(PURGED.length - 1));
      }
    } finally {
      closeSync(fd);
    }
    return this.n;
  }
}

async function parallel(n: number, work: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: IN_FLIGHT }, async () => {
      while (next < n) await work(next++);
    }),
  );
}

async function main(): Promise<number> {
  const daemon = await startReaperd({
    dir: tempDir(),
    storeToml: `retain_reaped_sec = ${RETAIN_SEC}\nretain_tombstones_sec = ${2 * RETAIN_SEC}`,
    toml: '[profiles.default]\ngrace_period_sec = 1\ncontainment = "none"\n',
  });
  const counts = async (): Promise<Record<string, number>> =>
    (await callApi<{ counts: Record<string, number> }>(daemon.socket, "GET", "/v1/daemon")).body.counts;
  const points: {
    n: number;
    bytes: number;
    file: number;
    wal: number;
    free: number;
    tombstones: number;
    rssMb: number;
    reapsPerSec: number;
    rows: number;
  }[] = [];
  const purged = new PurgeCount(daemon.logFile);
  const t0 = performance.now();
  let done = 0;
  let engines = 0;
  while (done < TOTAL) {
    const engine = start("sleep", ["3600"]);
    engines++;
    await sleep(5); // exec'd: its identity is sleep's
    const ids = Array.from({ length: Math.min(BATCH, TOTAL - done) }, (_, i) => `r-${done + i}`);
    await parallel(ids.length, async (i) => {
      const r = await callApi(
        daemon.socket,
        "POST",
        "/v1/sessions",
        { id: ids[i], engine: { pid: engine.pid } },
        { timeoutMs: 60_000 },
      );
      if (r.status !== 201) throw new Error(`registration answered ${r.status}: ${JSON.stringify(r.body)}`);
    });
    await parallel(ids.length, async (i) => {
      const r = await callApi(daemon.socket, "DELETE", `/v1/sessions/${ids[i] as string}`, undefined, {
        timeoutMs: 60_000,
      });
      // 409: the batch's engine is gone already (ended by the first reap): engine_gone reaps it.
      if (r.status !== 202 && r.status !== 409)
        throw new Error(`close answered ${r.status}: ${JSON.stringify(r.body)}`);
    });
    done += ids.length;
    for (;;) {
      const c = await counts();
      if ((c.reaping ?? 0) < BACKLOG) break;
      await sleep(50);
    }
    const point = POINTS.find((p) => p === done);
    if (point !== undefined) {
      for (;;) {
        const c = await counts(); // every close of the point reaped
        if ((c.reaping ?? 0) === 0 && (c.live ?? 0) === 0) break;
        await sleep(50);
      }
      const s = (performance.now() - t0) / 1000; // the rate up to the point, not the wait below
      // The next retention pass's end, and a second for its vacuum.
      const seen = purged.read();
      while (purged.read() === seen) await sleep(100);
      await sleep(1_000);
      const c = await counts();
      const size = pagesSize(daemon.db);
      const p = {
        n: done,
        bytes: size.bytes,
        file: fileSize(daemon.db),
        wal: fileSize(`${daemon.db}-wal`),
        free: size.free,
        tombstones: size.tombstones,
        rssMb: rssBytes(daemon.pid) / MB,
        reapsPerSec: done / s,
        rows: c.reaped ?? 0,
      };
      points.push(p);
      say(
        `${done} sessions in ${fmt(s)} s: database ${fmt(p.bytes / MB)} MB (file ${fmt(p.file / MB)}, WAL ${fmt(
          p.wal / MB,
        )}, free ${fmt(p.free / MB)}) holding ${p.rows} reaped and ${p.tombstones} tombstones, RSS ${fmt(p.rssMb)} MB, ${fmt(
          p.reapsPerSec,
        )} reaps/s`,
      );
    }
  }
  await daemon.stop();
  const first = points[0] as (typeof points)[number];
  const last = points.at(-1) as (typeof points)[number];
  const ratio = last.bytes / first.bytes;
  return report(
    `Figure 12: a year of sessions in minutes, retention ${RETAIN_SEC} s`,
    [
      {
        figure: `database size (page_count x page_size) after ${points.map((p) => fmt(p.n)).join(", ")} sessions, MB`,
        baseline: `${fmt(first.bytes / MB)} (after ${fmt(first.n)})`,
        result: points.map((p) => fmt(p.bytes / MB)).join(", "),
        ratio: fmt(ratio),
        goal: `<= ${GOAL} x the first`,
        pass: ratio <= GOAL,
        noise: "none (sizes, each right after a retention pass)",
      },
      {
        figure: "the file and its WAL at the same points (MB)",
        baseline: "",
        result: points.map((p) => `${fmt(p.file / MB)} + ${fmt(p.wal / MB)}`).join(", "),
        ratio: "",
        goal: "reported",
        pass: null,
        noise: "one run",
      },
      {
        figure: "daemon RSS at the same points (MB)",
        baseline: fmt(first.rssMb),
        result: points.map((p) => fmt(p.rssMb)).join(", "),
        ratio: fmt(last.rssMb / first.rssMb),
        goal: "reported",
        pass: null,
        noise: "one run",
      },
      {
        figure: "reaps per second (registered, closed and reaped), cumulative at each point",
        baseline: "",
        result: points.map((p) => fmt(p.reapsPerSec)).join(", "),
        ratio: "",
        goal: "reported",
        pass: null,
        noise: "one run",
      },
    ],
    [
      `retention ${RETAIN_SEC} s, tombstones ${2 * RETAIN_SEC} s; held at each point: ${points
        .map((p) => `${fmt(p.rows)} reaped sessions and ${fmt(p.tombstones)} tombstones`)
        .join(", ")}`,
      `${fmt(engines)} engines (sleep), ${BATCH} sessions each; ${IN_FLIGHT} requests in flight`,
    ],
  );
}

runFigure(main, cleanupAll);
