/**
 * Figure 10, a host fork storm: a shell loop outside any session starts 20,000 short
 * processes (`/bin/true`, fork and exec each) as fast as it can, while 200 sessions (the C
 * engines of figure 4) heartbeat at 1 Hz (bench/lib/heartbeat-load.ts: a new connection each,
 * from a thread of its own) and 100 more sessions fork all the time (a shell that starts a
 * `sleep 5` after the other, not contained: their members change every 5 s and are theirs by
 * lineage alone; 20 forks a second in all: a fork and exec costs about 3.7 ms of CPU on this
 * machine, and a faster pace would only measure the machine's saturation). The daemon reads every
 * fork and exit on the host from the kernel's process events connector (src/proc/lineage.ts).
 *
 * First the cost alone: the daemon's CPU (utime + stime, its threads included) in a storm of
 * 5,000 forks before any session, beyond its idle rate, per 1,000 forks. Then, side by side in
 * one run, in a window without the storm (A) and in the storm's (B): the heartbeats' latency;
 * the daemon's RSS before and after; the events
 * the daemon counted and lost (GET /v1/daemon). Then the 100 forking sessions are force-reaped:
 * each must end `clean`, with no process of theirs alive (judged from /proc here, by the
 * marker each forker's shell carries in argv[0]): the table survived the storm, losses
 * included. With BENCH_BEFORE=<another build's dist/src/main.js>, the same run against that
 * build follows, reported beside it (a build without the connector costs nothing per fork).
 */
import { readFileSync, readdirSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { callApi } from "../src/client/transport.js";
import { logLines, startReaperd, type Reaperd } from "./lib/daemon.js";
import { compileEngine, startManyEngines } from "./lib/engines.js";
import { startHeartbeatLoad, type Beat } from "./lib/heartbeat-load.js";
import { cpuMs, rssBytes, MB } from "./lib/proc.js";
import { QUICK, fmt, percentile, report, runFigure, say, sleep, type Row } from "./lib/report.js";
import { cleanupAll, exited, start, startGroup, tempDir } from "./lib/resources.js";
import { registerMany } from "./lib/sessions.js";

const HEARTBEATING = 200;
const FORKING = 100;
const STORM_FORKS = QUICK ? 5_000 : 20_000;
/** The storm that measures the daemon's CPU per fork, before any session. */
const COST_FORKS = QUICK ? 2_000 : 5_000;
const WINDOW_A_MS = QUICK ? 5_000 : 10_000;
const GOAL_P99_MS = 50;
const BEFORE = process.env.BENCH_BEFORE || undefined;

interface Lineage {
  available: boolean;
  why?: string;
  events: number;
  lost: number;
  processes: number;
}

interface Run {
  build: string;
  a: { beats: Beat[] };
  b: { beats: Beat[]; cpuMs: number; ms: number; forksPerSec: number };
  /** The daemon's CPU per 1,000 forks (ms), measured with no session and no request. */
  costPer1000: number;
  rssBefore: number;
  rssAfter: number;
  lineageBefore: Lineage | undefined;
  lineageAfter: Lineage | undefined;
  /** Log lines saying events were lost (and the table mended from a walk). */
  lossLogs: number;
  forkersClean: number;
  forkersAlive: number;
}

async function lineageOf(d: Reaperd): Promise<Lineage | undefined> {
  const res = await d.api<{ lineage?: Lineage }>("GET", "/v1/daemon");
  return res.body.lineage;
}

/** Processes whose command line holds `marker` (the forkers' shells and their sleeps). */
function marked(marker: string): number[] {
  const out: number[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      if (readFileSync(`/proc/${name}/cmdline`, "latin1").includes(marker)) out.push(Number(name));
    } catch {
      // gone
    }
  }
  return out;
}

function stats(list: readonly Beat[]): { n: number; p50: number; p99: number; max: number; failed: number } {
  const ms = list.map((b) => b.ms).sort((x, y) => x - y);
  return {
    n: list.length,
    p50: percentile(ms, 50),
    p99: percentile(ms, 99),
    max: ms[ms.length - 1] ?? 0,
    failed: list.filter((b) => b.status !== 200).length,
  };
}

/** A shell loop outside any session: `forks` processes (fork and exec of /bin/true), at once. */
async function shellStorm(forks: number): Promise<void> {
  const storm = start("bash", ["-c", `for ((i = 0; i < ${forks}; i++)); do /bin/true; done`]);
  await exited(storm);
  if (storm.exitCode !== 0) throw new Error(`the storm's shell exited ${storm.exitCode ?? storm.signalCode}`);
}

async function runOnce(build: string, reaperd: string | undefined, bin: string): Promise<Run> {
  const root = tempDir("sr-bench-forks-");
  const { engines } = await startManyEngines(bin, root, HEARTBEATING);
  const daemon = await startReaperd({
    dir: tempDir(),
    reaperd,
    // The forkers are not contained: what they fork is theirs by lineage alone.
    toml: `[profiles.default]\nallowed_roots = ["${root}"]\nheartbeat_timeout_sec = 600\n[profiles.forkers]\ncontainment = "none"\nheartbeat_timeout_sec = 600\n`,
  });
  // The cost of reading the host's forks, alone: the daemon idle (no session yet) for a window,
  // then a storm of COST_FORKS as long; its CPU beyond the idle rate, per 1,000 forks.
  const idle0 = cpuMs(daemon.pid);
  const idleFrom = performance.now();
  await sleep(3_000);
  const idleRate = (cpuMs(daemon.pid) - idle0) / (performance.now() - idleFrom);
  const cost0 = cpuMs(daemon.pid);
  const costFrom = performance.now();
  await shellStorm(COST_FORKS);
  await sleep(500);
  const costMs = performance.now() - costFrom;
  const costPer1000 = (cpuMs(daemon.pid) - cost0 - idleRate * costMs) / (COST_FORKS / 1000);
  const load = startHeartbeatLoad(daemon.socket, HEARTBEATING);
  for (let i = 0; i < engines.length; i += 16) {
    const batch = engines.slice(i, i + 16).map((e, j) => ({
      id: `live-${i + j}`,
      engine: { pid: e.pid },
      ports: [e.port],
      paths: [e.dir],
      heartbeatTimeoutSec: 10,
    }));
    await registerMany(daemon.socket, batch);
    load.add(batch.map((x) => x.id));
  }
  // The forkers, started after the daemon (lineage then knows every process they start): a
  // shell each, starting one `sleep 5` after the other (a subshell that execs it), each named
  // by a marker in argv[0] that /proc shows.
  const marker = `sr-forker-${process.pid}-${build.replace(/\W/g, "")}`;
  const forkers = Array.from({ length: FORKING }, (_, i) =>
    startGroup("bash", ["-c", 'while :; do (exec -a "$0" sleep 5); done', `${marker}-${i}`]),
  );
  await registerMany(
    daemon.socket,
    forkers.map((f, i) => ({ id: `forker-${i}`, profile: "forkers", engine: { pid: f.pid } })),
  );
  say(`${build}: ${HEARTBEATING} sessions heartbeat at 1 Hz, ${FORKING} sessions fork every 5 s`);
  await sleep(2_000);
  const rssBefore = rssBytes(daemon.pid);
  const lineageBefore = await lineageOf(daemon);

  // Window A: no storm.
  const aFrom = performance.now();
  await sleep(WINDOW_A_MS);
  const aTo = performance.now();

  // Window B: the storm, from a shell outside any session, until it is done (and 1 s more).
  const bFrom = performance.now();
  const cpuB0 = cpuMs(daemon.pid);
  await shellStorm(STORM_FORKS);
  const stormMs = performance.now() - bFrom;
  await sleep(1_000);
  const bTo = performance.now();
  const cpuB = cpuMs(daemon.pid) - cpuB0;
  const lineageAfter = await lineageOf(daemon);
  const rssAfter = rssBytes(daemon.pid);
  const beats = await load.stop();

  // The forking sessions end: clean, and nothing of theirs alive (judged here, from /proc).
  const reapMs: number[] = [];
  for (let i = 0; i < FORKING; i += 25) {
    await Promise.all(
      forkers.slice(i, i + 25).map(async (_, j) => {
        const t = performance.now();
        const res = await callApi(daemon.socket, "POST", `/v1/sessions/forker-${i + j}/reap`, undefined, {
          timeoutMs: 60_000,
        });
        reapMs.push(performance.now() - t);
        if (res.status !== 202) throw new Error(`force-reap forker-${i + j} answered ${res.status}`);
      }),
    );
  }
  const finishedOf = (): Record<string, unknown>[] =>
    logLines(daemon.logFile).filter((l) => l.event === "reap.finished" && String(l.sessionId).startsWith("forker-"));
  const t0 = performance.now();
  while (finishedOf().length < FORKING) {
    if (performance.now() - t0 > 120_000) throw new Error("the forkers' reaps did not finish within 2 minutes");
    await sleep(250);
  }
  say(`${build}: force-reap answered in ${reapMs.map((x) => Math.round(x)).join(" ")} ms`);
  const stalls = logLines(daemon.logFile).filter(
    (l) => l.event === "daemon.stalled" || /stall|lag/i.test(String(l.msg)),
  );
  if (stalls.length > 0) say(`${build}: ${JSON.stringify(stalls.slice(0, 5))}`);
  const forkersClean = finishedOf().filter((l) => l.outcome === "clean").length;
  const forkersAlive = marked(marker).length;
  const lossLogs = logLines(daemon.logFile).filter((l) => /process events were lost/.test(String(l.msg))).length;
  await daemon.stop();
  return {
    build,
    a: { beats: beats.filter((x) => x.at >= aFrom && x.at < aTo) },
    costPer1000,
    b: {
      beats: beats.filter((x) => x.at >= bFrom && x.at < bTo),
      cpuMs: cpuB,
      ms: bTo - bFrom,
      forksPerSec: (STORM_FORKS / stormMs) * 1000,
    },
    rssBefore,
    rssAfter,
    lineageBefore,
    lineageAfter,
    lossLogs,
    forkersClean,
    forkersAlive,
  };
}

async function main(): Promise<number> {
  const bin = compileEngine();
  const runs: Run[] = [await runOnce("this build", undefined, bin)];
  if (BEFORE !== undefined) runs.push(await runOnce("before", BEFORE, bin));
  for (const r of runs) {
    const a = stats(r.a.beats);
    const b = stats(r.b.beats);
    const lost = (r.lineageAfter?.lost ?? 0) - (r.lineageBefore?.lost ?? 0);
    say(
      `${r.build}: storm of ${STORM_FORKS} forks at ${fmt(r.b.forksPerSec)}/s; heartbeats no storm p99 ${fmt(a.p99)} ms (${a.n}), storm p99 ${fmt(b.p99)} ms (p50 ${fmt(b.p50)}, max ${fmt(b.max)}, ${b.n}), ${a.failed + b.failed} not 200; daemon CPU ${fmt(r.costPer1000)} ms per 1,000 forks alone, ${fmt(r.b.cpuMs)} ms in ${fmt(r.b.ms / 1000)} s of the loaded storm; RSS ${fmt(r.rssBefore / MB)} -> ${fmt(r.rssAfter / MB)} MB; lineage ${JSON.stringify(r.lineageAfter ?? "none")}, ${lost} lost in the storm, ${r.lossLogs} loss logged; forkers clean ${r.forkersClean}/${FORKING}, alive after ${r.forkersAlive}`,
    );
  }
  const ours = runs[0] as Run;
  const before = runs[1];
  const a = stats(ours.a.beats);
  const b = stats(ours.b.beats);
  const lost = (ours.lineageAfter?.lost ?? 0) - (ours.lineageBefore?.lost ?? 0);
  const events = (ours.lineageAfter?.events ?? 0) - (ours.lineageBefore?.events ?? 0);
  const rows: Row[] = [
    {
      figure: `heartbeat latency p99 (ms), ${HEARTBEATING} sessions at 1 Hz and ${FORKING} forking, while a shell outside any session starts ${STORM_FORKS.toLocaleString("en-US")} processes (${fmt(ours.b.forksPerSec)}/s)`,
      baseline: `${fmt(a.p99)} (same heartbeats, no storm; p50 ${fmt(a.p50)})`,
      result: `${fmt(b.p99)} (p50 ${fmt(b.p50)}, max ${fmt(b.max)})${before === undefined ? "" : `; before: ${fmt(stats(before.b.beats).p99)} (no storm ${fmt(stats(before.a.beats).p99)})`}`,
      ratio: fmt(b.p99 / Math.max(a.p99, 0.001)),
      goal: `p99 ≤ ${GOAL_P99_MS} ms`,
      pass: b.p99 <= GOAL_P99_MS,
      noise: "none",
    },
    {
      figure:
        "events read in the storm; lost (counted, logged, table mended from a walk); forking sessions clean; their processes alive after the reaps",
      baseline: "",
      result: `${events.toLocaleString("en-US")}; ${lost} (${ours.lossLogs} logged); ${ours.forkersClean}/${FORKING}; ${ours.forkersAlive}`,
      ratio: "",
      goal: `any; every loss logged; ${FORKING}/${FORKING}; 0`,
      pass:
        ours.lineageAfter?.available === true &&
        (lost === 0 || ours.lossLogs > 0) &&
        ours.forkersClean === FORKING &&
        ours.forkersAlive === 0,
      noise: "none (counts)",
    },
    {
      figure: `daemon CPU per 1,000 forks on the host (ms; a storm of ${COST_FORKS.toLocaleString("en-US")} before any session, beyond the idle daemon's rate)`,
      baseline: before === undefined ? "" : `${fmt(before.costPer1000)} (before)`,
      result: fmt(ours.costPer1000),
      ratio: "",
      goal: "reported",
      pass: null,
      noise: "one run",
    },
    {
      figure: "daemon RSS before and after the storm (MB)",
      baseline: before === undefined ? "" : `${fmt(before.rssBefore / MB)} -> ${fmt(before.rssAfter / MB)} (before)`,
      result: `${fmt(ours.rssBefore / MB)} -> ${fmt(ours.rssAfter / MB)}`,
      ratio: fmt(ours.rssAfter / ours.rssBefore),
      goal: "reported",
      pass: null,
      noise: "one run",
    },
  ];
  const failed = [...runs].some((r) => stats([...r.a.beats, ...r.b.beats]).failed > 0);
  if (failed) say("some heartbeats were not answered 200");
  return Math.max(
    report("Figure 10: a host fork storm", rows, [
      "the storm is a bash loop (fork and exec of /bin/true); the daemon reads every fork and exit on the host",
      "latency is the client's: a new unix-socket connection per heartbeat, from a thread of its own on the same 2 cores",
    ]),
    failed ? 1 : 0,
  );
}

runFigure(main, cleanupAll);
