/**
 * How every figure is reported: a small table (baseline, subject, ratio, goal, PASS/FAIL)
 * and the exit code. Absolute numbers drift on this shared 2-core machine, so each figure is
 * measured against a baseline taken in the same run, and a goal counts as missed only when
 * it is missed by more than the figure's stated noise margin.
 */

/** BENCH_QUICK=1 or --quick: shorter runs and smaller populations (a smoke run, noisier). */
export const QUICK = process.env.BENCH_QUICK === "1" || process.argv.includes("--quick");

export interface Row {
  /** What is measured, e.g. "heartbeat req/s". */
  figure: string;
  baseline: string;
  result: string;
  /** result / baseline (or the figure's own ratio), already formatted. */
  ratio: string;
  goal: string;
  /** Whether the goal is met within the noise margin; null: reported only (no goal). */
  pass: boolean | null;
  /**
   * The goal is met only thanks to the noise margin (the measured value itself misses it):
   * reported as "PASS within noise", never as a plain PASS.
   */
  withinNoise?: boolean;
  /** The noise margin applied, stated in words. */
  noise: string;
}

export function fmt(n: number, digits = 2): string {
  if (!Number.isFinite(n)) return String(n);
  const abs = Math.abs(n);
  if (abs >= 1000) return Math.round(n).toLocaleString("en-US");
  if (abs >= 100) return n.toFixed(0);
  if (abs >= 10) return n.toFixed(1);
  return n.toFixed(digits);
}

export function say(line: string): void {
  process.stdout.write(line + "\n");
}

/** Prints the table and returns the process exit code (1 if a goal is missed beyond noise). */
export function report(title: string, rows: readonly Row[], notes: readonly string[] = []): number {
  const head = ["figure", "baseline", "result", "ratio", "goal", "verdict", "noise margin"];
  const body = rows.map((r) => [
    r.figure,
    r.baseline,
    r.result,
    r.ratio,
    r.goal,
    r.pass === null ? "report" : !r.pass ? "FAIL" : r.withinNoise === true ? "PASS within noise" : "PASS",
    r.noise,
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => (b[i] ?? "").length)));
  const line = (cells: readonly string[]): string =>
    "| " + cells.map((c, i) => c.padEnd(widths[i] ?? 0)).join(" | ") + " |";
  say("");
  say(`## ${title}${QUICK ? " (quick run)" : ""}`);
  say(line(head));
  say("|" + widths.map((w) => "-".repeat(w + 2)).join("|") + "|");
  for (const b of body) say(line(b));
  for (const n of notes) say(`  ${n}`);
  const failed = rows.filter((r) => r.pass === false);
  const marginal = rows.filter((r) => r.pass === true && r.withinNoise === true);
  say(
    failed.length > 0
      ? `verdict: FAIL (${failed.map((r) => r.figure).join(", ")})`
      : marginal.length > 0
        ? `verdict: PASS within noise only (${marginal.map((r) => r.figure).join(", ")}: the measured value misses the goal)`
        : "verdict: PASS",
  );
  return failed.length === 0 ? 0 : 1;
}

/**
 * A goal judged against a measured value and its noise margin: met outright, met only within
 * the margin (the value itself misses the goal), or missed by more than the margin (FAIL).
 */
export function judge(
  value: number,
  goal: number,
  noise: number,
  direction: "atLeast" | "atMost" | "below",
): { pass: boolean; withinNoise: boolean } {
  const met = direction === "atLeast" ? value >= goal : direction === "atMost" ? value <= goal : value < goal;
  if (met) return { pass: true, withinNoise: false };
  const nearly =
    direction === "atLeast"
      ? value >= goal - noise
      : direction === "atMost"
        ? value <= goal + noise
        : value < goal + noise;
  return { pass: nearly, withinNoise: nearly };
}

/**
 * The median absolute deviation: how far repeated measurements typically stray from their
 * median. One disturbed round (another job's burst on this shared machine) moves it little,
 * unlike the range, so a margin taken from it still lets a missed goal FAIL.
 */
export function mad(values: readonly number[]): number {
  const m = median(values);
  return median(values.map((v) => Math.abs(v - m)));
}

export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i] as number;
}

export function median(values: readonly number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  if (s.length === 0) return Number.NaN;
  return s.length % 2 === 1 ? (s[mid] as number) : ((s[mid - 1] as number) + (s[mid] as number)) / 2;
}

/** Half the range of repeated measurements: the spread this run itself showed. */
export function halfRange(values: readonly number[]): number {
  if (values.length < 2) return 0;
  return (Math.max(...values) - Math.min(...values)) / 2;
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Runs a figure's main: prints its table, sets the exit code, and always cleans up. */
export function runFigure(main: () => Promise<number>, cleanup: () => Promise<void> | void): void {
  let done = false;
  const finish = async (code: number): Promise<void> => {
    if (done) return;
    done = true;
    try {
      await cleanup();
    } catch (err) {
      process.stderr.write(`bench cleanup failed: ${String(err)}\n`);
    }
    process.exit(code);
  };
  for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
    process.once(sig, () => {
      process.stderr.write(`bench: ${sig}, cleaning up\n`);
      void finish(130);
    });
  }
  main().then(
    (code) => finish(code),
    (err: unknown) => {
      process.stderr.write(`bench failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
      void finish(2);
    },
  );
}
