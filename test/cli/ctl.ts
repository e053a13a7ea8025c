/** Runs the real reaperctl binary (dist/src/cli/reaperctl.js) as a child process. */
import { spawn, type ChildProcess } from "node:child_process";
import { REAPERCTL } from "../helpers.js";

export interface CtlResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface RunningCtl {
  proc: ChildProcess & { pid: number };
  stdout(): string;
  stderr(): string;
  /** Resolves with the first complete stdout line (e.g. the engine fixture's ready line). */
  firstLine: Promise<string>;
  done: Promise<CtlResult>;
}

/** Starts reaperctl; killed (SIGKILL) when the test ends if still running. */
export function startCtl(
  t: { after: (fn: () => void) => void } | null,
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; input?: string } = {},
): RunningCtl {
  const proc = spawn(process.execPath, [REAPERCTL, ...args], {
    env: { ...process.env, ...opts.env },
    stdio: ["pipe", "pipe", "pipe"],
  });
  if (proc.pid === undefined) throw new Error("could not start reaperctl");
  t?.after(() => void proc.kill("SIGKILL"));
  let stdout = "";
  let stderr = "";
  let resolveLine: (line: string) => void = () => undefined;
  const firstLine = new Promise<string>((r) => (resolveLine = r));
  proc.stdout.setEncoding("utf8").on("data", (d: string) => {
    stdout += d;
    const nl = stdout.indexOf("\n");
    if (nl >= 0) resolveLine(stdout.slice(0, nl));
  });
  proc.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  proc.stdin.on("error", () => undefined);
  proc.stdin.end(opts.input ?? "");
  const done = new Promise<CtlResult>((resolve) =>
    proc.on("close", (code, signal) => resolve({ code, signal, stdout, stderr })),
  );
  return { proc: proc as ChildProcess & { pid: number }, stdout: () => stdout, stderr: () => stderr, firstLine, done };
}

/** Runs reaperctl to its end. */
export function ctl(args: string[], env: NodeJS.ProcessEnv = {}, input?: string): Promise<CtlResult> {
  return startCtl(null, args, { env, input }).done;
}
