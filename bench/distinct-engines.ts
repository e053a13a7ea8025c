/**
 * Figure 8, distinct engines at scale: figures 3a (idle CPU), 5 (RSS) and 6 (time to READY)
 * with 10,000 live sessions each naming an engine process of its own (the C engine of
 * figure 4: its own port and its own dir with a file), not 10 shared ones. The engines are
 * forked once by one launcher (`engine-lite --many`) and reused by every measurement; each
 * daemon starts on a fresh copy of the same database, against the same daemon on an empty
 * database, side by side in one run:
 *
 * - 6: spawn to READY=1, empty and full interleaved, one daemon at a time;
 * - 5 and 3a: an empty and a full daemon running together; RSS after the settle, then CPU
 *   (% of a core) over the same windows, as figure 3a.
 *
 * Every full daemon must reap nothing: at the end every engine still runs with the identity
 * it was registered with, and no daemon's log has a reap. The liveness pass at this scale is
 * then timed with the daemon's own code in this process (recovery, the /proc walk, the pass),
 * and the notes say what limits 100,000 distinct engines.
 */
import { readFileSync, readdirSync, readlinkSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { pino } from "pino";
import { systemClock } from "../src/clock.js";
import { Detector } from "../src/detect/detector.js";
import { identify } from "../src/proc/identity.js";
import { isExited, listStats, readStat } from "../src/proc/stat.js";
import { DEFAULTS } from "../src/config/schema.js";
import { ProcessTable } from "../src/proc/tree.js";
import { LiveSessions } from "../src/sessions/live.js";
import type { ProcessIdentity } from "../src/model/session.js";
import { Store } from "../src/store/store.js";
import { logLines, startReaperd, type Reaperd } from "./lib/daemon.js";
import { compileEngine, startManyEngines, type Engine } from "./lib/engines.js";
import { Population } from "./lib/population.js";
import { MB, cpuWindows, rssBytes } from "./lib/proc.js";
import { QUICK, fmt, judge, mad, median, report, runFigure, say, sleep } from "./lib/report.js";
import { cleanupAll, tempDir } from "./lib/resources.js";

const ENGINES = QUICK ? 2_000 : 10_000;
/** No session is due during the run: nothing may be reaped. */
const TIMEOUT_SEC = 3600;
const READY_ROUNDS = QUICK ? 1 : 3;
const WINDOW_MS = QUICK ? 5_000 : 20_000;
const WINDOWS = QUICK ? 4 : 6;
/** After READY: the first liveness passes, the first RSS sample of every engine, the GC of recovery's garbage. */
const SETTLE_MS = QUICK ? 3_000 : 10_000;
const GOAL_CPU_PERCENT = 1;
const MIN_CPU_NOISE = 0.1;
const GOAL_RSS_MB = 150;
const RSS_NOISE_MB = 5;
const GOAL_READY_MS = 3_000;
const MIN_READY_NOISE_MS = 100;
/**
 * The default liveness schedule (every 2 s), and the share of a core the pass's walk may take
 * (detect.liveness_cpu_percent's default, src/config/schema.ts: the next walk waits cost / share).
 */
const PASS_EVERY_S = 2;
const WALK_SHARE = DEFAULTS.detect.liveness_cpu_percent / 100;
const PASSES = QUICK ? 5 : 10;
/** The unit's LimitNOFILE (systemd/session-reaper.service). */
const UNIT_NOFILE = 65_536;
const NEXT = 100_000;

const readText = (path: string): string => readFileSync(path, "latin1");

/** "Max open files" (or another row) of /proc/<pid>/limits: [soft, hard], Infinity for unlimited. */
function limit(pid: number | "self", row: string): [number, number] {
  const line = readText(`/proc/${pid}/limits`)
    .split("\n")
    .find((l) => l.startsWith(row));
  const [soft, hard] = (line ?? "").slice(row.length).trim().split(/\s+/);
  const n = (v: string | undefined): number => (v === "unlimited" ? Infinity : Number(v));
  return [n(soft), n(hard)];
}

interface Host {
  pidMax: number;
  threads: number;
  ports: [number, number];
  nofile: number;
  line: string;
}

/**
 * What the host allows, checked before anything starts: pids (threads count against
 * kernel.pid_max too), ephemeral ports (every engine listens on one), and the fds the daemon
 * inherits from this process (it keeps a pidfd per engine: src/detect/detector.ts). A host
 * that cannot hold ENGINES is an error, never a smaller figure.
 */
function host(): Host {
  const pidMax = Number(readText("/proc/sys/kernel/pid_max").trim());
  const threadsMax = Number(readText("/proc/sys/kernel/threads-max").trim());
  const threads = Number(readText("/proc/loadavg").split(" ")[3]?.split("/")[1]);
  const [, nproc] = limit("self", "Max processes");
  const ports = readText("/proc/sys/net/ipv4/ip_local_port_range").trim().split(/\s+/).map(Number) as [number, number];
  const portCount = ports[1] - ports[0] + 1;
  // Node raises its soft fd limit to the hard one at start: the daemon gets the hard limit.
  const [, nofile] = limit("self", "Max open files");
  const problems: string[] = [];
  if (threads + ENGINES + 1_000 > Math.min(pidMax, threadsMax, nproc)) {
    problems.push(
      `${ENGINES} engines + ${threads} threads need more pids than pid_max ${pidMax} / threads-max ${threadsMax} / ulimit -u ${nproc}`,
    );
  }
  if (ENGINES + 1_000 > portCount)
    problems.push(`${ENGINES} listeners need more than the ${portCount} ephemeral ports`);
  if (ENGINES + 200 > nofile) {
    problems.push(`the daemon holds a pidfd per engine: ${ENGINES} need more than the fd limit ${nofile} it inherits`);
  }
  if (problems.length > 0) throw new Error(`this host cannot run ${ENGINES} distinct engines: ${problems.join("; ")}`);
  return {
    pidMax,
    threads,
    ports,
    nofile,
    line:
      `host: pid_max ${pidMax} (${threads} threads before the engines), threads-max ${threadsMax}, ulimit -u ${nproc}; ` +
      `ephemeral ports ${ports[0]}-${ports[1]} (${portCount}); fd limit ${nofile} (the daemon's, inherited; the unit sets ${UNIT_NOFILE})`,
  };
}

const memAvailable = (): number => Number(/^MemAvailable:\s+(\d+) kB/m.exec(readText("/proc/meminfo"))?.[1]) * 1024;

/** The daemon's open fds, and how many of them are pidfds. */
function fds(pid: number): { open: number; pidfds: number } {
  const names = readdirSync(`/proc/${pid}/fd`);
  let pidfds = 0;
  for (const fd of names) {
    try {
      if (readlinkSync(`/proc/${pid}/fd/${fd}`) === "anon_inode:[pidfd]") pidfds++;
    } catch {
      // closed meanwhile
    }
  }
  return { open: names.length, pidfds };
}

/** Engines that still run with the identity they were registered with. */
function alive(ids: readonly ProcessIdentity[]): number {
  let n = 0;
  for (const id of ids) {
    const st = readStat(id.pid);
    if (st !== null && !isExited(st) && st.startTime === id.startTime) n++;
  }
  return n;
}

interface Checked {
  reaps: number;
  recovered: number;
  reapedAtStart: number;
  /** daemon.stalled: the loop blocked over 1 s (every time-based deadline then restarts). */
  stalls: number;
}

/** Reaps (and expiries) in a daemon's log, what it said at start, and its stalls. */
function reapsIn(d: Reaperd): Checked {
  const lines = logLines(d.logFile);
  const started = lines.find((l) => l.event === "daemon.started")?.detail as Record<string, number> | undefined;
  return {
    reaps: lines.filter((l) => l.event === "reap.started" || l.event === "session.expired").length,
    recovered: started?.recovered ?? -1,
    reapedAtStart: started?.reapedAtStart ?? -1,
    stalls: lines.filter((l) => l.event === "daemon.stalled").length,
  };
}

/** The daemon's metrics: a series' value (summed over its lines whose labels contain `labels`). */
async function scrape(d: Reaperd): Promise<(name: string, labels?: string) => number> {
  const res = await d.api<string>("GET", "/metrics");
  const lines = (typeof res.body === "string" ? res.body : "").split("\n");
  return (name, labels = "") => {
    let sum = NaN;
    for (const line of lines) {
      const space = line.lastIndexOf(" ");
      const series = line.slice(0, space);
      if (series !== name && !(series.startsWith(`${name}{`) && series.includes(labels))) continue;
      sum = (Number.isNaN(sum) ? 0 : sum) + Number(line.slice(space + 1));
    }
    return sum;
  };
}

interface PassCost {
  recoverMs: number;
  walkMs: number[];
  processes: number;
  passMs: number[];
  expired: number;
}

/**
 * The liveness pass at this scale, timed with the daemon's code in this process (the
 * daemons are stopped by then): recovery of the database (an identity check and a pidfd with
 * an exit watch per engine), the /proc walk the pass snapshots (read in one go here; the
 * daemon reads it 256 processes a turn), and the pass itself on that snapshot (every engine's
 * tree and resident memory, from the snapshot's stat lines).
 */
function passCost(db: string): PassCost {
  const store = new Store(db, Date.now());
  const registry = new LiveSessions(systemClock);
  let expired = 0;
  const detector = new Detector({
    registry,
    clock: systemClock,
    livenessSchedule: "*/2 * * * * *",
    log: pino({ level: "silent" }),
    expire: () => void expired++,
  });
  try {
    const t0 = performance.now();
    for (const s of store.liveForRecovery()) registry.recover({ ...s, busyCpuPercent: null });
    const recoverMs = performance.now() - t0;
    const out: PassCost = { recoverMs, walkMs: [], processes: 0, passMs: [], expired: 0 };
    for (let i = 0; i < PASSES; i++) {
      const w0 = performance.now();
      const stats = listStats();
      const table = new ProcessTable(stats);
      const w1 = performance.now();
      detector.checkLiveness(table);
      const w2 = performance.now();
      out.walkMs.push(w1 - w0);
      out.processes = stats.length;
      out.passMs.push(w2 - w1);
    }
    out.expired = expired;
    return out;
  } finally {
    detector.close();
    store.close();
  }
}

async function main(): Promise<number> {
  const h = host();
  say(h.line);

  // The engines: forked by one launcher, each its own process, port and dir.
  const bin = compileEngine();
  const root = tempDir("sr-bench-distinct-");
  const memBefore = memAvailable();
  const t0 = performance.now();
  const { engines, launcherPid } = await startManyEngines(bin, root, ENGINES);
  const startMs = performance.now() - t0;
  await sleep(500);
  const engineKb = (memBefore - memAvailable()) / 1024 / ENGINES;
  const ports = new Set(engines.map((e) => e.port)).size;
  if (ports !== ENGINES) throw new Error(`${ENGINES} engines share ports: ${ports} distinct`);
  say(
    `started ${ENGINES} engines in ${fmt(startMs / 1000)} s (${fmt((ENGINES / startMs) * 1000, 0)}/s; launcher pid ${launcherPid}), ` +
      `${ports} distinct ports, ~${fmt(engineKb, 0)} KB of host memory each (MemAvailable)`,
  );

  // One database: every session its own engine, port and dir, its tree as registration records it.
  const ids = engines.map((e: Engine) => identify(e.pid, "engine", process.pid));
  const population = new Population(
    engines.map((e) => ({ pid: e.pid, ports: [e.port], paths: [e.dir] })),
    { timeoutSec: TIMEOUT_SEC, engineTree: true },
  );
  const s0 = performance.now();
  population.database(ENGINES, tempDir());
  population.database(0, tempDir());
  say(`seeded ${ENGINES} live sessions in ${fmt((performance.now() - s0) / 1000)} s`);

  const toml = `[profiles.default]\nallowed_roots = ["${root}"]\n`;
  const start = async (count: number): Promise<Reaperd> => {
    const dir = tempDir();
    return startReaperd({ dir, db: population.database(count, dir), toml });
  };
  const checked: Checked[] = [];

  // Figure 6: time to READY, interleaved, one daemon at a time.
  const ready = { empty: [] as number[], full: [] as number[] };
  for (let round = 1; round <= READY_ROUNDS; round++) {
    const e = await start(0);
    await e.stop();
    ready.empty.push(e.readyMs);
    const f = await start(ENGINES);
    await f.stop();
    ready.full.push(f.readyMs);
    checked.push(reapsIn(f));
    say(`READY round ${round}: empty ${e.readyMs} ms, ${ENGINES} distinct engines ${f.readyMs} ms`);
  }

  // Figures 5 and 3a: an empty and a full daemon side by side.
  const base = await start(0);
  const full = await start(ENGINES);
  await sleep(SETTLE_MS);
  const rss = { base: [] as number[], full: [] as number[] };
  for (let i = 0; i < 5; i++) {
    rss.base.push(rssBytes(base.pid) / MB);
    rss.full.push(rssBytes(full.pid) / MB);
    await sleep(200);
  }
  say(
    `RSS after ${SETTLE_MS / 1000} s: no session ${fmt(median(rss.base))} MB, ${ENGINES} engines ${fmt(median(rss.full))} MB`,
  );
  const cpu = await cpuWindows(base.pid, full.pid, WINDOWS, WINDOW_MS, `${ENGINES} distinct engines`);
  const rssEnd = { base: rssBytes(base.pid) / MB, full: rssBytes(full.pid) / MB };
  const fd = fds(full.pid);
  const [, daemonNofile] = limit(full.pid, "Max open files");
  const metric = await scrape(full);
  const fdErrors = metric("session_reaper_fd_errors_total") || 0;
  const lagP99 = metric("nodejs_eventloop_lag_p99_seconds") * 1000;
  const lagMax = metric("nodejs_eventloop_lag_max_seconds") * 1000;
  const liveGauge = metric("session_reaper_sessions", 'state="live"');
  await base.stop();
  await full.stop();
  checked.push(reapsIn(full));
  say(
    `full daemon: ${fd.open} fds open (${fd.pidfds} pidfds) of its limit ${daemonNofile}; fd errors ${fdErrors}; ` +
      `live sessions ${liveGauge}; event-loop delay p99 ${fmt(lagP99)} ms, max ${fmt(lagMax)} ms (since start)`,
  );
  const stored = new Store(full.db, Date.now());
  const counts = stored.counts();
  stored.close();

  // Nothing reaped: every engine still runs as registered, no daemon logged a reap.
  const stillAlive = alive(ids);
  const reaps = checked.reduce((n, c) => n + c.reaps + Math.max(0, c.reapedAtStart), 0);
  const recoveredAll = checked.every((c) => c.recovered === ENGINES);
  say(
    `at the end: ${stillAlive}/${ENGINES} engines alive with their identity; reaps logged by the ${checked.length} full daemons: ${reaps}; ` +
      `recovered ${checked.map((c) => c.recovered).join(", ")}; daemon.stalled ${checked.reduce((n, c) => n + c.stalls, 0)}; ` +
      `last database: ${JSON.stringify(counts)}`,
  );

  // The liveness pass at this scale, with the daemon's code in this process.
  const pass = passCost(population.database(ENGINES, tempDir()));
  const walk = median(pass.walkMs);
  const check = median(pass.passMs);
  say(
    `liveness pass at ${ENGINES} engines (the daemon's code, in the bench process, median of ${PASSES}): ` +
      `/proc walk + table ${fmt(walk)} ms for ${pass.processes} processes (${fmt((walk * 1000) / pass.processes, 1)} µs each), ` +
      `the pass (trees and resident memory) ${fmt(check)} ms; ` +
      `recovery (identity + pidfd per engine) ${fmt(pass.recoverMs)} ms; expired ${pass.expired}`,
  );
  const uptime = readText("/proc/loadavg").split(" ").slice(0, 3).join(" ");

  // The engines go now (cleanup kills the group again on any failure), waited for until no
  // pid of theirs is left, zombies included (the launcher dies with them: init reaps them).
  const k0 = performance.now();
  process.kill(-launcherPid, "SIGKILL");
  const left = (): number => [launcherPid, ...ids.map((id) => id.pid)].filter((pid) => readStat(pid) !== null).length;
  while (left() > 0) {
    if (performance.now() - k0 > 60_000) throw new Error(`${left()} engine pids still present 60 s after SIGKILL`);
    await sleep(100);
  }
  say(`${ENGINES} engines killed and gone in ${fmt(performance.now() - k0)} ms`);

  const cpuBase = median(cpu.base);
  const cpuFull = median(cpu.full);
  const cpuNoise = Math.max(MIN_CPU_NOISE, mad(cpu.full));
  const cpuVerdict = judge(cpuFull, GOAL_CPU_PERCENT, cpuNoise, "below");
  const mean = (v: readonly number[]): number => v.reduce((a, b) => a + b, 0) / v.length;
  const rssBase = median(rss.base);
  const rssFull = median(rss.full);
  const rssVerdict = judge(rssFull, GOAL_RSS_MB, RSS_NOISE_MB, "below");
  const readyEmpty = median(ready.empty);
  const readyFull = median(ready.full);
  const readyNoise = Math.max(MIN_READY_NOISE_MS, mad(ready.full));
  const readyVerdict = judge(readyFull, GOAL_READY_MS, readyNoise, "below");
  const pidfdPass = fd.pidfds >= ENGINES && !(fdErrors > 0);
  const safe = stillAlive === ENGINES && reaps === 0 && recoveredAll && counts.live === ENGINES;

  // Where the idle CPU goes (the daemon's code, timed above), and what 100,000 would need.
  const period = PASS_EVERY_S * 1000;
  // The daemon walks again only once cost / WALK_SHARE has passed (at least every tick).
  const every = (cost: number): number => Math.max(period, cost / WALK_SHARE);
  const cost = walk + check;
  const passPct = (cost / every(cost)) * 100;
  const scale = NEXT / ENGINES;
  const n = (v: number): string => v.toLocaleString("en-US");
  const notes = [
    h.line,
    `engines: ${ENGINES} engine-lite processes forked by one launcher in ${fmt(startMs / 1000)} s, each its own pid, port and dir (a 4 KB file), reused by every daemon; ~${fmt(engineKb, 0)} KB of host memory each`,
    `READY: ${READY_ROUNDS} interleaved rounds (${ready.empty.join(", ")} ms empty; ${ready.full.join(", ")} ms full); RSS: median of 5 samples after a ${SETTLE_MS / 1000} s settle (at the end of the windows: ${fmt(rssEnd.base)} / ${fmt(rssEnd.full)} MB); CPU: ${WINDOWS} windows of ${WINDOW_MS / 1000} s, the empty and the full daemon running together`,
    `liveness pass at ${ENGINES} (the daemon's code timed in this process): /proc walk ${fmt(walk)} ms for ${pass.processes} processes + the per-engine check (tree, resident memory) ${fmt(check)} ms; the daemon walks at most every ${fmt(every(cost) / 1000, 1)} s here (detect.liveness_cpu_percent ${WALK_SHARE * 100} % of a core for the walk, at least every ${PASS_EVERY_S} s; none with no session): ${fmt(passPct, 2)} % of a core, against ${fmt(cpuFull, 2)} % measured`,
    `full daemon: ${fd.pidfds} pidfds, ${fd.open} fds of ${daemonNofile}; fd errors ${fdErrors}; event-loop delay p99 ${fmt(lagP99)} ms, max ${fmt(lagMax)} ms; recovery (identity + pidfd + exit watch per engine) ${fmt(pass.recoverMs)} ms`,
    `next order of magnitude (${n(NEXT)} distinct engines), from these measurements:`,
    `  pids: kernel.pid_max above ${n(NEXT + h.threads)} (here ${h.pidMax}; a sysctl, up to 4,194,304), and as many in threads-max and the engines' user's ulimit -u`,
    `  fds: one pidfd per engine, ${n(NEXT)} + ~${Math.max(0, fd.open - fd.pidfds)}: above the unit's LimitNOFILE=${n(UNIT_NOFILE)} (and this host's ${n(h.nofile)}); past it pidfd_open and accept fail with EMFILE`,
    `  the liveness pass: ~${n(Math.round(cost * scale))} ms of walk and checks (paced, 256 processes a turn), so a walk every ~${n(Math.round(every(cost * scale) / 1000))} s: the CPU stays at ${WALK_SHARE * 100} % of a core, but the trees of uncontained engines age that long (exits are still seen at once through pidfds; contained sessions do not need the walk)`,
    `  ports: ${n(ports)} of the ${n(h.ports[1] - h.ports[0] + 1)} ephemeral ports of one address taken here; ${n(NEXT)} listeners need several addresses or a wider range (65,535 per address at most)`,
    `  memory: ~${fmt((engineKb * NEXT) / 1024 / 1024, 1)} GB of host memory for the engines; the daemon's RSS +${fmt(((rssFull - rssBase) * 1000) / ENGINES, 1)} KB per distinct engine: ~${n(Math.round(rssBase + (rssFull - rssBase) * scale))} MB`,
    `  READY: ~${fmt(((readyFull - readyEmpty) / ENGINES) * 1000, 0)} µs per distinct engine over the empty start: ~${n(Math.round((readyEmpty + (readyFull - readyEmpty) * scale) / 100) * 100)} ms`,
    `load average at the end: ${uptime}`,
  ];
  return report(
    `Figure 8: ${ENGINES.toLocaleString("en-US")} distinct engines`,
    [
      {
        figure: `3a. idle CPU, ${ENGINES} live sessions on ${ENGINES} distinct engines (% of a core)`,
        baseline: `${fmt(cpuBase, 3)} (no session, same host)`,
        result: `${fmt(cpuFull, 3)} (${fmt((cpuFull / 100) * 60_000, 0)} ms CPU/min; mean ${fmt(mean(cpu.full), 3)}, busiest ${fmt(Math.max(...cpu.full), 3)})`,
        ratio: fmt(cpuFull / Math.max(cpuBase, 0.001)),
        goal: `< ${GOAL_CPU_PERCENT} %`,
        pass: cpuVerdict.pass,
        withinNoise: cpuVerdict.withinNoise,
        noise: `${fmt(cpuNoise, 3)} points (MAD of ${WINDOWS} windows, at least ${MIN_CPU_NOISE})`,
      },
      {
        figure: `5. RSS, ${ENGINES} distinct engines (MB)`,
        baseline: `${fmt(rssBase)} (no session)`,
        result: `${fmt(rssFull)} (+${fmt(((rssFull - rssBase) * 1000) / ENGINES, 2)} KB/session)`,
        ratio: fmt(rssFull / rssBase),
        goal: `< ${GOAL_RSS_MB} MB`,
        pass: rssVerdict.pass,
        withinNoise: rssVerdict.withinNoise,
        noise: `${RSS_NOISE_MB} MB`,
      },
      {
        figure: `6. time to READY, ${ENGINES} distinct engines (ms)`,
        baseline: `${fmt(readyEmpty)} (empty database)`,
        result: fmt(readyFull),
        ratio: fmt(readyFull / readyEmpty),
        goal: `< ${fmt(GOAL_READY_MS)} ms`,
        pass: readyVerdict.pass,
        withinNoise: readyVerdict.withinNoise,
        noise: `${fmt(readyNoise)} ms (MAD of ${READY_ROUNDS} rounds, at least ${MIN_READY_NOISE_MS})`,
      },
      {
        figure: "pidfds held by the full daemon; fd errors",
        baseline: `${ENGINES} engines`,
        result: `${fd.pidfds}; ${fdErrors}`,
        ratio: fmt(fd.pidfds / ENGINES),
        goal: `one per engine; 0`,
        pass: pidfdPass,
        noise: "none (counts)",
      },
      {
        figure: "engines alive at the end; reaps by the full daemons",
        baseline: "",
        result: `${stillAlive}/${ENGINES}; ${reaps}`,
        ratio: "",
        goal: `${ENGINES}/${ENGINES}; 0`,
        pass: safe,
        noise: "none (counts)",
      },
    ],
    notes,
  );
}

runFigure(main, cleanupAll);
