/**
 * Figure 1, heartbeat ingestion: requests/s of POST /v1/sessions/{id}/heartbeat over the
 * unix socket, 10,000 registered sessions, 50 keep-alive connections, against a bare
 * node:http server answering 204 on a unix socket, with the same load tool, interleaved in
 * the same run (bare, reaperd, bare, reaperd, …). Goal: at least 0.70 of bare node:http.
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { startReaperd } from "./lib/daemon.js";
import { postRequest, runLoad, type LoadResult } from "./lib/load.js";
import { QUICK, fmt, halfRange, median, report, runFigure, say, sleep } from "./lib/report.js";
import { cleanupAll, start, tempDir } from "./lib/resources.js";
import { registerMany } from "./lib/sessions.js";

const BARE = fileURLToPath(new URL("./fixtures/bare-server.js", import.meta.url));
const SESSIONS = QUICK ? 2_000 : 10_000;
const CONNECTIONS = 50;
const RUN_MS = QUICK ? 2_000 : 5_000;
const WARMUP_MS = QUICK ? 1_000 : 2_000;
const ROUNDS = QUICK ? 2 : 3;
const GOAL = 0.7;
/** The smallest noise margin granted, whatever the spread this run showed. */
const MIN_NOISE = 0.03;

async function main(): Promise<number> {
  const dir = tempDir();
  // One real engine process for all sessions (registration allows many sessions per engine).
  const engine = start("sleep", ["3600"]);
  const daemon = await startReaperd({ dir });
  say(`reaperd ready in ${daemon.readyMs} ms; registering ${SESSIONS} sessions`);
  const ids = Array.from({ length: SESSIONS }, (_, i) => `hb-${String(i).padStart(6, "0")}`);
  await registerMany(
    daemon.socket,
    ids.map((id) => ({ id, engine: { pid: engine.pid } })),
  );

  const bareSocket = join(dir, "bare.sock");
  const bare = start(process.execPath, [BARE, bareSocket], { stdio: ["ignore", "pipe", "inherit"] });
  await new Promise<void>((resolve, reject) => {
    bare.stdout?.once("data", () => resolve());
    bare.once("exit", (code) => reject(new Error(`bare server exited with ${code}`)));
  });

  const requests = ids.map((id) => postRequest(`/v1/sessions/${id}/heartbeat`, '{"activity":"busy"}'));
  const load = (socketPath: string, durationMs: number): Promise<LoadResult> =>
    runLoad({ socketPath, connections: CONNECTIONS, durationMs, requests });

  // Warm-up (JIT, connection setup, the first heartbeat flushes): not counted.
  await load(bareSocket, WARMUP_MS);
  await load(daemon.socket, WARMUP_MS);

  const bareRuns: LoadResult[] = [];
  const reaperRuns: LoadResult[] = [];
  for (let round = 1; round <= ROUNDS; round++) {
    await sleep(300);
    const b = await load(bareSocket, RUN_MS);
    await sleep(300);
    const r = await load(daemon.socket, RUN_MS);
    bareRuns.push(b);
    reaperRuns.push(r);
    say(
      `round ${round}: bare ${fmt(b.reqPerSec)} req/s (p99 ${fmt(b.p99Ms)} ms), reaperd ${fmt(r.reqPerSec)} req/s ` +
        `(p99 ${fmt(r.p99Ms)} ms): ratio ${fmt(r.reqPerSec / b.reqPerSec)}`,
    );
  }
  await daemon.stop();

  const errors = reaperRuns.reduce((n, r) => n + r.errors, 0) + bareRuns.reduce((n, r) => n + r.errors, 0);
  const ratios = reaperRuns.map((r, i) => r.reqPerSec / (bareRuns[i] as LoadResult).reqPerSec);
  const ratio = median(ratios);
  const noise = Math.max(MIN_NOISE, halfRange(ratios));
  const bareRate = median(bareRuns.map((r) => r.reqPerSec));
  const reaperRate = median(reaperRuns.map((r) => r.reqPerSec));
  const bareP99 = median(bareRuns.map((r) => r.p99Ms));
  const reaperP99 = median(reaperRuns.map((r) => r.p99Ms));
  return report(
    "Figure 1: heartbeat ingestion",
    [
      {
        figure: `heartbeat req/s (${SESSIONS} sessions, ${CONNECTIONS} conns)`,
        baseline: `${fmt(bareRate)} (bare node:http 204)`,
        result: fmt(reaperRate),
        ratio: fmt(ratio),
        goal: `>= ${GOAL}`,
        pass: errors === 0 && ratio >= GOAL - noise,
        noise: `${fmt(noise, 3)} (half the range of ${ROUNDS} interleaved ratios, at least ${MIN_NOISE})`,
      },
      {
        figure: "heartbeat p99 latency, ms",
        baseline: fmt(bareP99),
        result: fmt(reaperP99),
        ratio: fmt(reaperP99 / bareP99),
        goal: "reported",
        pass: null,
        noise: "10 µs buckets",
      },
    ],
    [
      `ratios per round: ${ratios.map((r) => fmt(r, 3)).join(", ")}; non-2xx answers: ${errors}`,
      `median of ${ROUNDS} interleaved ${RUN_MS / 1000} s runs each, after a ${WARMUP_MS / 1000} s warm-up`,
    ],
  );
}

runFigure(main, cleanupAll);
