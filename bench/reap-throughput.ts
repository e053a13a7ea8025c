/**
 * Figure 4, reap throughput: 1,000 real engine processes, each listening on a loopback port
 * and owning a temp dir with a file, expire at once (registered with their port and dir, then
 * one heartbeat each in a burst, so their deadlines fall within a fraction of a second); the
 * time from the first deadline until every process is gone, every port free and every dir
 * deleted, at the default reaper.concurrency. The floor, same run, same kind of processes: a
 * plain shell loop (`kill PID; rm -rf DIR` per engine), timed to the same three checks.
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { callApi } from "../src/client/transport.js";
import { logLines, startReaperd } from "./lib/daemon.js";
import { cleanedAfter, compileEngine, startEngines } from "./lib/engines.js";
import { QUICK, fmt, report, runFigure, say, sleep } from "./lib/report.js";
import { cleanupAll, exited, start, tempDir } from "./lib/resources.js";
import { registerMany } from "./lib/sessions.js";
import { DEFAULTS } from "../src/config/schema.js";

const ENGINES = QUICK ? 200 : 1_000;
/** The daemon's default reaper.concurrency unless BENCH_CONCURRENCY says otherwise. */
const CONCURRENCY = Number(process.env.BENCH_CONCURRENCY ?? DEFAULTS.reaper.concurrency);
/** Long enough to register every engine before the burst of heartbeats sets the deadlines. */
const TIMEOUT_SEC = QUICK ? 20 : 120;
const GIVE_UP_MS = 10 * 60_000;

async function shellFloor(bin: string, root: string): Promise<number> {
  const engines = await startEngines(bin, root, "floor", ENGINES);
  const script = join(root, "floor.sh");
  writeFileSync(script, engines.map((e) => `kill ${e.pid}; rm -rf ${e.dir}`).join("\n") + "\n");
  const t0 = performance.now();
  await exited(start("bash", [script]));
  return cleanedAfter(engines, t0);
}

interface RunSpec {
  name: string;
  containment: "auto" | "none";
  /** Another build's dist/src/main.js (BENCH_BEFORE), or this build's. */
  reaperd?: string | undefined;
}

async function reaperRun(
  bin: string,
  root: string,
  spec: RunSpec,
): Promise<{ ms: number; finishedMs: number; clean: number }> {
  const engines = await startEngines(bin, root, `reaped-${spec.name.replace(/\W+/g, "-")}`, ENGINES);
  const dir = tempDir();
  const daemon = await startReaperd({
    dir,
    ...(spec.reaperd === undefined ? {} : { reaperd: spec.reaperd }),
    toml: `[reaper]\nconcurrency = ${CONCURRENCY}\n[profiles.default]\nallowed_roots = ["${root}"]\nheartbeat_timeout_sec = ${TIMEOUT_SEC}\ncontainment = "${spec.containment}"\n`,
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
  // Where a reap's time goes: each step's median and maximum duration, from the audit lines.
  const steps = new Map<string, number[]>();
  for (const l of logLines(daemon.logFile)) {
    if (l.event !== "reap.step" || typeof l.step !== "string" || typeof l.durationMs !== "number") continue;
    steps.set(l.step, [...(steps.get(l.step) ?? []), l.durationMs]);
  }
  const pct = (xs: number[], q: number): number => [...xs].sort((a, b) => a - b)[Math.floor(q * (xs.length - 1))] ?? 0;
  say(
    `  steps (ms, median / p90 / max): ${[...steps]
      .map(([name, xs]) => `${name} ${fmt(pct(xs, 0.5))}/${fmt(pct(xs, 0.9))}/${fmt(Math.max(...xs))}`)
      .join(", ")}`,
  );
  await daemon.stop();
  return { ms, finishedMs, clean: finished.filter((l) => l.outcome === "clean").length };
}

const BEFORE = process.env.BENCH_BEFORE || undefined;

async function main(): Promise<number> {
  const bin = compileEngine();
  const root = tempDir("sr-bench-engines-");
  const specs: RunSpec[] = [
    { name: "contained (cgroup)", containment: "auto" },
    { name: "uncontained", containment: "none" },
    ...(BEFORE === undefined
      ? []
      : [
          { name: "before: contained", containment: "auto" as const, reaperd: BEFORE },
          { name: "before: uncontained", containment: "none" as const, reaperd: BEFORE },
        ]),
  ];
  // The floor before, between and after the daemon's runs: its spread is part of the result.
  const floors: number[] = [];
  const floor = async (): Promise<void> => {
    const ms = await shellFloor(bin, root);
    floors.push(ms);
    say(`shell loop: ${ENGINES} engines gone, ports free, dirs deleted in ${fmt(ms)} ms`);
  };
  await floor();
  const results: { spec: RunSpec; ms: number; finishedMs: number; clean: number }[] = [];
  for (const spec of specs) {
    const r = await reaperRun(bin, root, spec);
    say(`reaperd, ${spec.name}: ${fmt(r.ms)} ms (last reap.finished after ${fmt(r.finishedMs)} ms), ${r.clean} clean`);
    results.push({ spec, ...r });
    await floor();
  }
  const sorted = [...floors].sort((a, b) => a - b);
  const median = sorted[Math.floor(sorted.length / 2)] as number;
  const spread = `${fmt((sorted[0] as number) / 1000)}-${fmt((sorted[sorted.length - 1] as number) / 1000)} s over ${floors.length} runs`;
  return report(
    "Figure 4: reap throughput",
    [
      ...results.map((r) => ({
        figure: `${ENGINES} engines gone, ports free, dirs deleted (s), ${r.spec.name}, concurrency ${CONCURRENCY}`,
        baseline: `${fmt(median / 1000)} (shell loop kill + rm -rf, median; ${spread})`,
        result: `${fmt(r.ms / 1000)} (${fmt((ENGINES * 1000) / r.ms)} reaps/s; last reap.finished ${fmt(r.finishedMs / 1000)} s); ${r.clean}/${ENGINES} clean`,
        ratio: fmt(r.ms / median),
        // The other build (BENCH_BEFORE) is shown beside this one, not judged.
        goal: r.spec.reaperd === undefined ? "all clean, ≤ 3 × the floor" : "(the other build: not judged)",
        pass: r.spec.reaperd !== undefined ? null : r.clean === ENGINES && r.ms <= 3 * median,
        noise: "the floor's spread",
      })),
    ],
    [
      "each reap: tree snapshot, socket snapshot, SIGTERM, verified exit, port checks (no listener, test bind), dir removed through the openat path as the engine's uid, every step journaled, the verification pass (tree or cgroup, cookie, ports, paths, IPC)",
    ],
  );
}

runFigure(main, cleanupAll);
