/**
 * `npm run bench`: every figure in sequence, each in its own process (a figure's daemons,
 * engines and temp dirs are gone before the next starts); exit 1 if any goal was missed
 * beyond noise. Pass --quick (or BENCH_QUICK=1) for a short smoke run.
 */
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";

const FIGURES = [
  "heartbeat",
  "detection-lag",
  "idle-cost",
  "reap-throughput",
  "memory",
  "startup",
  "storm",
  "distinct-engines",
  "spawn",
  "fork-storm",
];
const args = process.argv.includes("--quick") ? ["--quick"] : [];
const results: string[] = [];
let failed = 0;
const t0 = Date.now();
for (const name of FIGURES) {
  const script = fileURLToPath(new URL(`./${name}.js`, import.meta.url));
  const r = spawnSync(process.execPath, [script, ...args], { stdio: "inherit" });
  const verdict = r.status === 0 ? "PASS" : r.status === 1 ? "FAIL" : `ERROR (${r.status ?? r.signal})`;
  if (r.status !== 0) failed++;
  results.push(`${name}: ${verdict}`);
}
process.stdout.write(
  `\n${results.join("\n")}\n${failed === 0 ? "all figures PASS" : `${failed} figure(s) not PASS`} in ${Math.round((Date.now() - t0) / 1000)} s\n`,
);
process.exitCode = failed === 0 ? 0 : 1;
