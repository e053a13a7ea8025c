/**
 * Figure 7, heartbeats during a reap storm: 1,000 live sessions (each a real engine process)
 * heartbeat at 1 Hz from their registration, spread evenly (1,000 requests a second, from a
 * thread of their own: bench/lib/heartbeat-load.ts), while 1,000 other engines (the C engine
 * of figure 4: a port and a dir each) are reaped at once: their deadlines fall together
 * (STORM_MODE=expire, the default: a gateway's crash), or an operator force-reaps them all
 * (STORM_MODE=reap: 1,000 requests, 128 at a time). The heartbeats' latency (request sent to
 * answer read, a new connection each, as a shell client would) is measured in a window with
 * no storm and in the storm's window, side by side in one run; every heartbeat of the run
 * (the registrations' phase included) must be answered 200 and no live session reaped.
 * BENCH_STORM_BEATS=<file> writes every heartbeat (send time, latency, answer) there.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { callApi } from "../src/client/transport.js";
import { logLines, startReaperd } from "./lib/daemon.js";
import { allCleaned, compileEngine, startEngines } from "./lib/engines.js";
import { QUICK, fmt, percentile, report, runFigure, say, sleep } from "./lib/report.js";
import { cleanupAll, start, tempDir } from "./lib/resources.js";
import { registerMany } from "./lib/sessions.js";
import { startHeartbeatLoad, type Beat } from "./lib/heartbeat-load.js";

const LIVE = QUICK ? 200 : 1_000;
const STORM = QUICK ? 200 : 1_000;
/** The live sessions' timeout: ten missed heartbeats. */
const LIVE_TIMEOUT_SEC = 10;
const WINDOW_MS = QUICK ? 8_000 : 15_000;
const GOAL_P99_MS = 50;
const MODE = process.env.STORM_MODE === "reap" ? "reap" : "expire";

const CLIENT = new URL("../src/client/transport.js", import.meta.url).href;

/**
 * The daemon's event-loop delay since the previous scrape (its nodejs_eventloop_lag_* series),
 * ms. A build before 2026-12-07 reported it plus its monitor's 100 ms period.
 */
async function loopLag(socket: string): Promise<{ p99: number; max: number }> {
  const res = await callApi<string>(socket, "GET", "/metrics");
  const text = typeof res.body === "string" ? res.body : "";
  const value = (name: string): number => Number(new RegExp(`^${name} (\\S+)$`, "m").exec(text)?.[1] ?? NaN) * 1000;
  return { p99: value("nodejs_eventloop_lag_p99_seconds"), max: value("nodejs_eventloop_lag_max_seconds") };
}

function stats(list: readonly Beat[]): { n: number; p50: number; p99: number; max: number; failed: number } {
  const ms = list.map((b) => b.ms).sort((a, b) => a - b);
  return {
    n: list.length,
    p50: percentile(ms, 50),
    p99: percentile(ms, 99),
    max: ms[ms.length - 1] ?? 0,
    failed: list.filter((b) => b.status !== 200).length,
  };
}

async function main(): Promise<number> {
  const bin = compileEngine();
  const root = tempDir("sr-bench-storm-");
  say(`starting ${LIVE} live and ${STORM} storm engines`);
  const live = await startEngines(bin, root, "live", LIVE);
  const storm = await startEngines(bin, root, "storm", STORM);
  const daemon = await startReaperd({
    dir: tempDir(),
    toml: `[profiles.default]\nallowed_roots = ["${root}"]\nheartbeat_timeout_sec = 600\n`,
  });
  // Each live session heartbeats once a second from the moment it is registered (its own
  // slot of each second: bench/lib/heartbeat-load.ts).
  const load = startHeartbeatLoad(daemon.socket, LIVE);
  for (let i = 0; i < live.length; i += 16) {
    const batch = live.slice(i, i + 16).map((e, j) => ({
      id: `live-${i + j}`,
      engine: { pid: e.pid },
      ports: [e.port],
      paths: [e.dir],
      heartbeatTimeoutSec: LIVE_TIMEOUT_SEC,
    }));
    await registerMany(daemon.socket, batch);
    load.add(batch.map((b) => b.id));
  }
  // The storm's sessions, registered while the live ones heartbeat. With STORM_MODE=expire
  // (the default) they are then heartbeaten once each in a burst, so that their deadlines fall
  // together, after window A: the detector expires them all at once. With STORM_MODE=reap an
  // operator's burst of force-reaps ends them instead (its requests are part of the load).
  const stormTimeoutSec = Math.ceil((2000 + WINDOW_MS + 3000) / 1000);
  await registerMany(
    daemon.socket,
    storm.map((e, i) => ({
      id: `storm-${i}`,
      engine: { pid: e.pid },
      ports: [e.port],
      paths: [e.dir],
      ...(MODE === "expire" ? { heartbeatTimeoutSec: stormTimeoutSec } : {}),
    })),
  );
  let expireAt = Number.POSITIVE_INFINITY;
  if (MODE === "expire") {
    for (let i = 0; i < STORM; i += 32) {
      await Promise.all(
        storm.slice(i, i + 32).map(async (_, j) => {
          const res = await callApi(daemon.socket, "POST", `/v1/sessions/storm-${i + j}/heartbeat`);
          if (res.status !== 200) throw new Error(`storm heartbeat answered ${res.status}`);
        }),
      );
    }
    expireAt = performance.now() + stormTimeoutSec * 1000;
  }
  say(`registered ${LIVE} + ${STORM} sessions; ${LIVE} heartbeat at 1 Hz each; storm by ${MODE}`);
  // Window A: no storm.
  await sleep(2000);
  const aFrom = performance.now();
  await sleep(WINDOW_MS);
  const aTo = performance.now();
  await loopLag(daemon.socket); // the event-loop histogram restarts at each scrape
  let bFrom: number;
  if (MODE === "expire") {
    // Window B from just before the deadlines.
    await sleep(Math.max(0, expireAt - performance.now() - 500));
    bFrom = performance.now();
  } else {
    // Window B: every storm session force-reaped at once (from another process, so that
    // this one's heartbeat timing is not disturbed by the burst).
    bFrom = performance.now();
    const burst = start(
      process.execPath,
      [
        "--input-type=module",
        "-e",
        // 128 connections at a time (the socket's listen backlog is finite), as fast as answered.
        `import { callApi } from ${JSON.stringify(CLIENT)};
       let next = 0; const bad = [];
       await Promise.all(Array.from({ length: 128 }, async () => {
         while (next < ${STORM}) {
           const i = next++;
           const r = await callApi(${JSON.stringify(daemon.socket)}, "POST", "/v1/sessions/storm-" + i + "/reap", undefined, { timeoutMs: 60000 })
             .catch((e) => ({ status: String(e.code ?? e) }));
           if (r.status !== 202) bad.push(i + ": " + r.status);
         }
       }));
       if (bad.length > 0) console.error(bad.length + " force-reaps not 202: " + bad.slice(0, 5).join(", "));
       process.exit(bad.length === 0 ? 0 : 1);`,
      ],
      { stdio: ["ignore", "inherit", "inherit"] },
    );
    const burstCode = await new Promise<number | null>((r) => burst.once("exit", (c) => r(c)));
    if (burstCode !== 0) throw new Error(`the force-reap burst failed (${burstCode})`);
  }
  const sentMs = performance.now() - bFrom;
  while (!allCleaned(storm)) {
    if (performance.now() - bFrom > 10 * 60_000) throw new Error("storm not cleaned within 10 minutes");
    await sleep(250); // the check reads /proc/net/tcp: not too often, it loads the same cores
  }
  const cleanedMs = performance.now() - bFrom;
  // The engines are gone; each reap still verifies and journals its end: window B lasts
  // until every storm session's reap.finished is written (the storm's whole work).
  // Read incrementally, counted without parsing: this process also times the heartbeats.
  let logOffset = 0;
  let finishedCount = 0;
  const stormFinished = (): number => {
    const text = readFileSync(daemon.logFile, "latin1").slice(logOffset);
    const end = text.lastIndexOf("\n") + 1;
    const marker = '"event":"reap.finished","sessionId":"storm-';
    for (let i = text.indexOf(marker); i >= 0 && i < end; i = text.indexOf(marker, i + 1)) finishedCount++;
    logOffset += end;
    return finishedCount;
  };
  while (stormFinished() < STORM) {
    if (performance.now() - bFrom > 10 * 60_000) throw new Error("storm reaps not finished within 10 minutes");
    await sleep(250);
  }
  const finishedMs = performance.now() - bFrom;
  const lag = await loopLag(daemon.socket);
  await sleep(1000);
  const bTo = performance.now();
  const beats = await load.stop();
  const finished = logLines(daemon.logFile).filter((l) => l.event === "reap.finished");
  const liveReaped = finished.filter((l) => String(l.sessionId).startsWith("live-")).length;
  if (liveReaped > 0) {
    const why = new Map<string, number>();
    for (const l of finished.filter((x) => String(x.sessionId).startsWith("live-"))) {
      why.set(String(l.reason), (why.get(String(l.reason)) ?? 0) + 1);
    }
    say(`live sessions reaped, by reason: ${JSON.stringify(Object.fromEntries(why))}`);
    const stalls = logLines(daemon.logFile).filter((l) => l.event === "daemon.stalled");
    say(`daemon.stalled events: ${JSON.stringify(stalls.map((l) => l.detail))}`);
    const first = finished.find((x) => String(x.sessionId).startsWith("live-"));
    say(`first live reap: ${JSON.stringify(first)}`);
    // Whether the client sent it heartbeats in time, and what they were answered.
    const started = logLines(daemon.logFile).find(
      (l) => l.event === "reap.started" && l.sessionId === first?.sessionId,
    );
    if (started !== undefined) {
      const at = Date.parse(String(started.time)) - performance.timeOrigin;
      const sent = beats.filter((x) => x.id === started.sessionId && x.at > at - LIVE_TIMEOUT_SEC * 1000 && x.at <= at);
      say(
        `heartbeats sent to ${String(started.sessionId)} in the ${LIVE_TIMEOUT_SEC} s before its reap (ms before, latency, answer): ${JSON.stringify(sent.map((x) => [Math.round(at - x.at), Math.round(x.ms), x.status]))}`,
      );
    }
  }
  if (process.env.BENCH_STORM_BEATS !== undefined) {
    writeFileSync(process.env.BENCH_STORM_BEATS, JSON.stringify({ aFrom, aTo, bFrom, bTo, beats }));
  }
  const stormClean = finished.filter((l) => String(l.sessionId).startsWith("storm-") && l.outcome === "clean").length;
  await daemon.stop();
  const a = stats(beats.filter((b) => b.at >= aFrom && b.at < aTo));
  const b = stats(beats.filter((b) => b.at >= bFrom && b.at < bTo));
  // Every heartbeat of the run counts, the registration phase's too (sessions are live from
  // their registration): a refused connection or an answer other than 200 is a failure.
  const reg = stats(beats.filter((x) => x.at < aFrom));
  const all = stats(beats);
  const kinds = new Map<string, number>();
  for (const x of beats) if (x.status !== 200) kinds.set(String(x.status), (kinds.get(String(x.status)) ?? 0) + 1);
  say(
    `while ${LIVE} + ${STORM} sessions were registered: ${reg.n} heartbeats, p50 ${fmt(reg.p50)} ms, p99 ${fmt(reg.p99)} ms, max ${fmt(reg.max)} ms, ${reg.failed} not 200`,
  );
  say(`whole run: ${all.n} heartbeats, ${all.failed} not 200 ${JSON.stringify(Object.fromEntries(kinds))}`);
  say(
    `no storm: ${a.n} heartbeats, p50 ${fmt(a.p50)} ms, p99 ${fmt(a.p99)} ms, max ${fmt(a.max)} ms, ${a.failed} not 200`,
  );
  say(
    `storm (${MODE}): ${MODE === "reap" ? `${STORM} force-reaps sent in ${fmt(sentMs)} ms, ` : ""}all cleaned after ${fmt(cleanedMs)} ms, every reap finished after ${fmt(finishedMs)} ms; ${b.n} heartbeats, p50 ${fmt(b.p50)} ms, p99 ${fmt(b.p99)} ms, max ${fmt(b.max)} ms, ${b.failed} not 200`,
  );
  say(`live sessions reaped: ${liveReaped}; storm sessions clean: ${stormClean}/${STORM}`);
  return report(
    "Figure 7: heartbeats during a reap storm",
    [
      {
        figure: `heartbeat latency p99 (ms), ${LIVE} sessions at 1 Hz, while ${STORM} engines are reaped at once (${MODE === "expire" ? "their deadlines fall together" : "force-reaped in a burst"})`,
        baseline: `${fmt(a.p99)} (same heartbeats, no storm; p50 ${fmt(a.p50)})`,
        result: `${fmt(b.p99)} (p50 ${fmt(b.p50)}, max ${fmt(b.max)}; storm cleaned in ${fmt(cleanedMs / 1000)} s; the daemon's event-loop delay p99 ${fmt(lag.p99)} ms, max ${fmt(lag.max)} ms)`,
        ratio: fmt(b.p99 / Math.max(a.p99, 0.001)),
        goal: `p99 ≤ ${GOAL_P99_MS} ms`,
        pass: b.p99 <= GOAL_P99_MS,
        noise: "none",
      },
      {
        figure: "heartbeats not answered 200 (whole run); live sessions reaped; storm sessions clean",
        baseline: "",
        result: `${all.failed}; ${liveReaped}; ${stormClean}/${STORM}`,
        ratio: "",
        goal: `0; 0; ${STORM}/${STORM}`,
        pass: all.failed === 0 && liveReaped === 0 && stormClean === STORM,
        noise: "none (counts)",
      },
    ],
    [
      "latency is the client's: a new unix-socket connection per heartbeat, from a separate process on the same 2 cores",
    ],
  );
}

runFigure(main, cleanupAll);
