/**
 * Figure 4, reap throughput: 1,000 real engine processes, each listening on a loopback port
 * and owning a temp dir with a file, expire at once (registered with their port and dir, then
 * one heartbeat each in a burst, so their deadlines fall within a fraction of a second); the
 * time from the first deadline until every process is gone, every port free and every dir
 * deleted, at the default reaper.concurrency. The floor, same run, same kind of processes: a
 * plain shell loop (`kill PID; rm -rf DIR` per engine), timed to the same three checks.
 */
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import { callApi } from "../src/cli/client.js";
import { isExited, readStat } from "../src/proc/stat.js";
import { logLines, startReaperd } from "./lib/daemon.js";
import { QUICK, fmt, report, runFigure, say, sleep } from "./lib/report.js";
import { cleanupAll, exited, start, tempDir } from "./lib/resources.js";
import { registerMany } from "./lib/sessions.js";

const ENGINE_SOURCE = fileURLToPath(new URL("../../bench/fixtures/engine-lite.c", import.meta.url));
const ENGINES = QUICK ? 200 : 1_000;
const CONCURRENCY = 8; // the default reaper.concurrency
/** Long enough to register every engine before the burst of heartbeats sets the deadlines. */
const TIMEOUT_SEC = QUICK ? 20 : 120;
const GIVE_UP_MS = 10 * 60_000;

interface Engine {
  pid: number;
  port: number;
  dir: string;
}

function compileEngine(): string {
  const bin = join(tempDir(), "engine-lite");
  execFileSync("cc", ["-O2", "-o", bin, ENGINE_SOURCE]);
  return bin;
}

async function startEngines(bin: string, root: string, tag: string): Promise<Engine[]> {
  const out: Engine[] = [];
  for (let i = 0; i < ENGINES; i++) {
    const dir = join(root, `${tag}-${i}`);
    const child = start(bin, [dir], { stdio: ["ignore", "pipe", "inherit"] });
    const port = await new Promise<number>((resolve, reject) => {
      child.stdout?.setEncoding("utf8").once("data", (d: string) => resolve(Number(d.trim())));
      child.once("exit", (code) => reject(new Error(`engine exited with ${code}`)));
    });
    child.stdout?.destroy(); // one fd less per engine in this process
    out.push({ pid: child.pid as number, port, dir });
  }
  return out;
}

/** TCP ports with a LISTEN socket, from /proc/net/tcp{,6}. */
function listeningPorts(): Set<number> {
  const ports = new Set<number>();
  for (const f of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    for (const line of readFileSync(f, "latin1").split("\n").slice(1)) {
      const cols = line.trim().split(/\s+/);
      if (cols[3] === "0A") ports.add(parseInt((cols[1] ?? "").split(":")[1] ?? "", 16));
    }
  }
  return ports;
}

function allCleaned(engines: readonly Engine[]): boolean {
  for (const e of engines) {
    const st = readStat(e.pid);
    if (st !== null && !isExited(st)) return false;
  }
  const listening = listeningPorts();
  return engines.every((e) => !listening.has(e.port) && !existsSync(e.dir));
}

/** Polls until every engine is gone, its port free and its dir deleted; ms after `from`. */
async function cleanedAfter(engines: readonly Engine[], from: number): Promise<number> {
  while (!allCleaned(engines)) {
    if (performance.now() - from > GIVE_UP_MS) throw new Error("engines not cleaned within 10 minutes");
    await sleep(50);
  }
  return performance.now() - from;
}

async function shellFloor(bin: string, root: string): Promise<number> {
  const engines = await startEngines(bin, root, "floor");
  const script = join(root, "floor.sh");
  writeFileSync(script, engines.map((e) => `kill ${e.pid}; rm -rf ${e.dir}`).join("\n") + "\n");
  const t0 = performance.now();
  await exited(start("bash", [script]));
  return cleanedAfter(engines, t0);
}

async function reaperRun(bin: string, root: string): Promise<{ ms: number; finishedMs: number; clean: number }> {
  const engines = await startEngines(bin, root, "reaped");
  const dir = tempDir();
  const daemon = await startReaperd({
    dir,
    toml: `[reaper]\nconcurrency = ${CONCURRENCY}\n[profiles.default]\nallowed_roots = ["${root}"]\nheartbeat_timeout_sec = ${TIMEOUT_SEC}\n`,
  });
  const t0 = performance.now();
  await registerMany(
    daemon.socket,
    engines.map((e, i) => ({
      id: `reap-${i}`,
      engine: { pid: e.pid },
      ports: [e.port],
      paths: [e.dir],
      heartbeatTimeoutSec: TIMEOUT_SEC,
    })),
  );
  const registeredMs = performance.now() - t0;
  if (registeredMs > (TIMEOUT_SEC - 5) * 1000) throw new Error(`registration took ${fmt(registeredMs)} ms`);
  say(`registered ${ENGINES} engines (port + dir each) in ${fmt(registeredMs / 1000)} s`);
  // One heartbeat each, in a burst: every deadline moves to within a moment of the others.
  const deadlines: number[] = [];
  let next = 0;
  await Promise.all(
    Array.from({ length: 32 }, async () => {
      while (next < engines.length) {
        const i = next++;
        const res = await callApi<{ deadline: string }>(daemon.socket, "POST", `/v1/sessions/reap-${i}/heartbeat`);
        if (res.status !== 200) throw new Error(`heartbeat answered ${res.status}`);
        deadlines.push(Date.parse(res.body.deadline));
      }
    }),
  );
  const first = Math.min(...deadlines);
  const spread = Math.max(...deadlines) - first;
  say(`deadlines within ${spread} ms; waiting for the first`);
  await sleep(Math.max(0, first - Date.now()));
  const from = performance.now();
  const ms = await cleanedAfter(engines, from);
  let finished: Record<string, unknown>[] = [];
  while ((finished = logLines(daemon.logFile).filter((l) => l.event === "reap.finished")).length < ENGINES) {
    if (performance.now() - from > GIVE_UP_MS) break;
    await sleep(200);
  }
  const finishedMs = performance.now() - from;
  await daemon.stop();
  return { ms, finishedMs, clean: finished.filter((l) => l.outcome === "clean").length };
}

async function main(): Promise<number> {
  const bin = compileEngine();
  const root = tempDir("sr-bench-engines-");
  const floorMs = await shellFloor(bin, root);
  say(`shell loop: ${ENGINES} engines gone, ports free, dirs deleted in ${fmt(floorMs)} ms`);
  const r = await reaperRun(bin, root);
  say(`reaperd: ${fmt(r.ms)} ms (last reap.finished after ${fmt(r.finishedMs)} ms), ${r.clean} clean`);
  return report(
    "Figure 4: reap throughput",
    [
      {
        figure: `${ENGINES} engines gone, ports free, dirs deleted (s), concurrency ${CONCURRENCY}`,
        baseline: `${fmt(floorMs / 1000)} (shell loop kill + rm -rf)`,
        result: `${fmt(r.ms / 1000)} (${fmt((ENGINES * 1000) / r.ms)} reaps/s)`,
        ratio: fmt(r.ms / floorMs),
        goal: "all cleaned, outcome clean",
        pass: r.clean === ENGINES,
        noise: "none (a count)",
      },
      {
        figure: "until the last reap.finished is journaled (s)",
        baseline: "",
        result: fmt(r.finishedMs / 1000),
        ratio: "",
        goal: "reported",
        pass: null,
        noise: "",
      },
    ],
    [
      "each reap: tree snapshot, socket snapshot, SIGTERM, verified exit, port checks (no listener, test bind), dir removed through the openat path as the engine's uid, 7 journaled steps",
    ],
  );
}

runFigure(main, cleanupAll);
