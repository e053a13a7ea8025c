/**
 * Figure 1, heartbeat ingestion: requests/s of POST /v1/sessions/{id}/heartbeat over the
 * unix socket, 10,000 registered sessions, 50 keep-alive connections, against a bare
 * node:http server answering 204 on a unix socket, with the same load tool, interleaved in
 * the same run (bare, fastify, reaperd, bare, fastify, reaperd, …). Goal: at least 0.80 of
 * bare node:http (the median of the rounds' ratios); noise margin: the median absolute
 * deviation of those ratios, at least 0.03.
 *
 * Also measured in the same rounds, reported without a goal: fastify 5 alone (the daemon's
 * configuration, one route answering 204), the ceiling any fastify route can reach on this
 * machine in this run; and, with BENCH_BEFORE=<another build's dist/src/main.js>[,<another>…],
 * each of those builds of reaperd under the same load, in the same rounds (before/after
 * comparisons), with the server CPU per heartbeat of each.
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { startReaperd, type Reaperd } from "./lib/daemon.js";
import { cpuMs } from "./lib/proc.js";
import { postRequest, runLoad, type LoadResult } from "./lib/load.js";
import { QUICK, fmt, judge, mad, median, report, runFigure, say, sleep, type Row } from "./lib/report.js";
import { cleanupAll, start, tempDir } from "./lib/resources.js";
import { registerMany } from "./lib/sessions.js";

const BARE = fileURLToPath(new URL("./fixtures/bare-server.js", import.meta.url));
const FASTIFY = fileURLToPath(new URL("./fixtures/fastify-server.js", import.meta.url));
/** Earlier builds to run side by side (BENCH_BEFORE, comma-separated). */
const BEFORES = (process.env.BENCH_BEFORE ?? "").split(",").filter((b) => b !== "");
const SESSIONS = QUICK ? 2_000 : 10_000;
const CONNECTIONS = 50;
const RUN_MS = QUICK ? 2_000 : 5_000;
const WARMUP_MS = QUICK ? 1_000 : 2_000;
const ROUNDS = QUICK ? 2 : 5;
const GOAL = 0.8;
/** The smallest noise margin granted, whatever the spread this run showed. */
const MIN_NOISE = 0.03;

/** A fixture server on a unix socket; resolves with its pid once it prints "listening". */
async function fixture(script: string, socket: string): Promise<number> {
  const child = start(process.execPath, [script, socket], { stdio: ["ignore", "pipe", "inherit"] });
  await new Promise<void>((resolve, reject) => {
    child.stdout?.once("data", () => resolve());
    child.once("exit", (code) => reject(new Error(`${script} exited with ${code}`)));
  });
  return child.pid as number;
}

interface Subject {
  name: string;
  socket: string;
  pid: number;
  runs: LoadResult[];
  /** The server's CPU time (user + system) per answered request in each run, µs. */
  cpuUs: number[];
}

async function main(): Promise<number> {
  const dir = tempDir();
  // One real engine process for all sessions (registration allows many sessions per engine).
  const engine = start("sleep", ["3600"]);
  const ids = Array.from({ length: SESSIONS }, (_, i) => `hb-${String(i).padStart(6, "0")}`);
  const daemons: Reaperd[] = [];
  const reaperd = async (name: string, build?: string): Promise<Subject> => {
    // Each daemon is loaded 5 s of every round of all the subjects (half a minute with two
    // earlier builds): its sessions must outlive the gaps, or their heartbeats answer 409.
    const toml = "[profiles.default]\nheartbeat_timeout_sec = 3600\n";
    const daemon = await startReaperd({ dir: tempDir(), toml, ...(build ? { reaperd: build } : {}) });
    daemons.push(daemon);
    say(`${name} ready in ${daemon.readyMs} ms; registering ${SESSIONS} sessions`);
    await registerMany(
      daemon.socket,
      ids.map((id) => ({ id, engine: { pid: engine.pid } })),
    );
    return { name, socket: daemon.socket, pid: daemon.pid, runs: [], cpuUs: [] };
  };
  const server = async (name: string, script: string): Promise<Subject> => {
    const socket = join(dir, `${name}.sock`);
    return { name, socket, pid: await fixture(script, socket), runs: [], cpuUs: [] };
  };
  const bare = await server("bare", BARE);
  const fastify = await server("fastify", FASTIFY);
  const subjects = [bare, fastify, await reaperd("reaperd")];
  const builds = new Map<Subject, string>();
  for (const [i, build] of BEFORES.entries()) {
    const s = await reaperd(BEFORES.length === 1 ? "before" : `before-${i + 1}`, build);
    builds.set(s, build);
    subjects.push(s);
  }
  const ours = subjects[2] as Subject;

  const requests = ids.map((id) => postRequest(`/v1/sessions/${id}/heartbeat`, '{"activity":"busy"}'));
  const load = (socketPath: string, durationMs: number): Promise<LoadResult> =>
    runLoad({ socketPath, connections: CONNECTIONS, durationMs, requests });

  // Warm-up (JIT, connection setup, the first heartbeat flushes): not counted.
  for (const s of subjects) await load(s.socket, WARMUP_MS);

  for (let round = 1; round <= ROUNDS; round++) {
    const parts: string[] = [];
    for (const s of subjects) {
      await sleep(300);
      const cpu0 = cpuMs(s.pid);
      const r = await load(s.socket, RUN_MS);
      s.cpuUs.push(((cpuMs(s.pid) - cpu0) * 1000) / r.requests);
      s.runs.push(r);
      const odd = Object.entries(r.statuses).filter(([status]) => Number(status) < 200 || Number(status) > 299);
      parts.push(
        `${s.name} ${fmt(r.reqPerSec)} req/s (p99 ${fmt(r.p99Ms)} ms, ${fmt(s.cpuUs.at(-1) as number)} µs CPU/req${
          odd.length === 0 ? "" : `; answered ${odd.map(([status, n]) => `${status} x${n}`).join(", ")}`
        })`,
      );
    }
    const ratio = (s: Subject): string =>
      fmt((s.runs.at(-1) as LoadResult).reqPerSec / (bare.runs.at(-1) as LoadResult).reqPerSec, 3);
    say(
      `round ${round}: ${parts.join(", ")}; ratios ${subjects
        .slice(1)
        .map((s) => `${s.name} ${ratio(s)}`)
        .join(", ")}`,
    );
  }
  for (const d of daemons) await d.stop();

  const ratiosOf = (s: Subject): number[] => s.runs.map((r, i) => r.reqPerSec / (bare.runs[i] as LoadResult).reqPerSec);
  const errors = subjects.reduce((n, s) => n + s.runs.reduce((m, r) => m + r.errors, 0), 0);
  const bareRate = median(bare.runs.map((r) => r.reqPerSec));
  const bareP99 = median(bare.runs.map((r) => r.p99Ms));
  const rows: Row[] = [];
  const ratios = ratiosOf(ours);
  const ratio = median(ratios);
  const noise = Math.max(MIN_NOISE, mad(ratios));
  const verdict = judge(ratio, GOAL, noise, "atLeast");
  rows.push({
    figure: `heartbeat req/s (${SESSIONS} sessions, ${CONNECTIONS} conns)`,
    baseline: `${fmt(bareRate)} (bare node:http 204)`,
    result: fmt(median(ours.runs.map((r) => r.reqPerSec))),
    ratio: fmt(ratio),
    goal: `>= ${GOAL}`,
    pass: errors === 0 && verdict.pass,
    withinNoise: verdict.withinNoise,
    noise: `${fmt(noise, 3)} (median absolute deviation of ${ROUNDS} interleaved ratios, at least ${MIN_NOISE})`,
  });
  for (const s of subjects.slice(1)) {
    if (s === ours) continue;
    rows.push({
      figure: s === fastify ? "fastify alone (same config, 204), req/s" : `reaperd ${s.name} (${builds.get(s)}), req/s`,
      baseline: fmt(bareRate),
      result: fmt(median(s.runs.map((r) => r.reqPerSec))),
      ratio: fmt(median(ratiosOf(s))),
      goal: "reported",
      pass: null,
      noise: `rounds ${ratiosOf(s)
        .map((r) => fmt(r, 2))
        .join(", ")}`,
    });
  }
  const minCpu = (x: Subject): number => Math.min(...x.cpuUs);
  rows.push({
    figure: "server CPU per request, µs (min over rounds)",
    baseline: `${fmt(minCpu(bare))} (bare); fastify alone ${fmt(minCpu(fastify))}`,
    result: [fmt(minCpu(ours)), ...[...builds.keys()].map((s) => `${s.name} ${fmt(minCpu(s))}`)].join("; "),
    ratio: fmt(minCpu(bare) / minCpu(ours)),
    goal: "reported",
    pass: null,
    noise: "clock ticks (10 ms) over each run",
  });
  rows.push({
    figure: "heartbeat p99 latency, ms",
    baseline: fmt(bareP99),
    result: fmt(median(ours.runs.map((r) => r.p99Ms))),
    ratio: fmt(median(ours.runs.map((r) => r.p99Ms)) / bareP99),
    goal: "reported",
    pass: null,
    noise: "10 µs buckets",
  });
  const verdictNote = !verdict.pass
    ? "the goal is missed beyond the noise margin"
    : verdict.withinNoise
      ? "PASS only within the noise margin: the median is below the goal"
      : "the median meets the goal";
  return report("Figure 1: heartbeat ingestion", rows, [
    `reaperd ratios per round: ${ratios.map((r) => fmt(r, 3)).join(", ")} (${verdictNote}); non-2xx answers: ${errors}`,
    `median of ${ROUNDS} interleaved ${RUN_MS / 1000} s runs each, after a ${WARMUP_MS / 1000} s warm-up`,
  ]);
}

runFigure(main, cleanupAll);
