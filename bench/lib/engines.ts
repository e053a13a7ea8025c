/**
 * The C engine of figures 4, 7 and 8 (bench/fixtures/engine-lite.c): one process each,
 * listening on a loopback port and owning a temp dir with a file; and the checks, made without
 * the daemon's code, that a set of them is gone, its ports free and its dirs deleted.
 */
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import { isExited, readStat } from "../../src/proc/stat.js";
import { sleep } from "./report.js";
import { start, startGroup, tempDir } from "./resources.js";

const ENGINE_SOURCE = fileURLToPath(new URL("../../../bench/fixtures/engine-lite.c", import.meta.url));
const GIVE_UP_MS = 10 * 60_000;

export interface Engine {
  pid: number;
  port: number;
  dir: string;
}

export function compileEngine(): string {
  const bin = join(tempDir(), "engine-lite");
  execFileSync("cc", ["-O2", "-o", bin, ENGINE_SOURCE]);
  return bin;
}

export async function startEngines(bin: string, root: string, tag: string, count: number): Promise<Engine[]> {
  const out: Engine[] = [];
  for (let i = 0; i < count; i++) {
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

/**
 * `count` engines forked by one launcher (`engine-lite --many`), not by this process: each is a
 * process of its own with its own port and dir ROOT/e-I, and this process holds one child
 * handle for all of them. The launcher leads a process group of its own (killed whole at
 * cleanup) and ignores SIGCHLD, so an engine that is killed vanishes instead of staying a
 * zombie. Rejects if any engine could not start.
 */
export async function startManyEngines(
  bin: string,
  root: string,
  count: number,
): Promise<{ engines: Engine[]; launcherPid: number }> {
  const launcher = startGroup(bin, ["--many", String(count), root], { stdio: ["ignore", "pipe", "inherit"] });
  const engines: Engine[] = [];
  const errors: string[] = [];
  await new Promise<void>((resolve, reject) => {
    let buffered = "";
    const onExit = (code: number | null, signal: string | null): void =>
      reject(new Error(`engine launcher exited (${code ?? signal}) before all engines were up`));
    launcher.once("exit", onExit);
    launcher.stdout?.setEncoding("utf8").on("data", (d: string) => {
      buffered += d;
      let nl;
      while ((nl = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        const m = /^(\d+) (\d+) (.+)$/.exec(line);
        if (m !== null) engines.push({ pid: Number(m[1]), port: Number(m[2]), dir: m[3] as string });
        else if (line.startsWith("ready ")) {
          launcher.off("exit", onExit);
          resolve();
        } else errors.push(line);
      }
    });
  });
  launcher.stdout?.destroy(); // nothing more comes; one handle less here
  if (engines.length !== count || errors.length > 0) {
    throw new Error(
      `${engines.length} of ${count} engines started; ${errors.length} errors: ${errors.slice(0, 5).join("; ")}`,
    );
  }
  return { engines, launcherPid: launcher.pid as number };
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

export function allCleaned(engines: readonly Engine[]): boolean {
  for (const e of engines) {
    const st = readStat(e.pid);
    if (st !== null && !isExited(st)) return false;
  }
  const listening = listeningPorts();
  return engines.every((e) => !listening.has(e.port) && !existsSync(e.dir));
}

/** Polls until every engine is gone, its port free and its dir deleted; ms after `from`. */
export async function cleanedAfter(engines: readonly Engine[], from: number): Promise<number> {
  while (!allCleaned(engines)) {
    if (performance.now() - from > GIVE_UP_MS) throw new Error("engines not cleaned within 10 minutes");
    await sleep(50);
  }
  return performance.now() - from;
}
