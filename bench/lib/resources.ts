import { spawn, type ChildProcess, type SpawnOptions } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

/**
 * Everything a benchmark starts (processes, temp dirs) is registered here and removed when
 * the benchmark ends, also when it fails or is interrupted: `cleanupAll` runs from the
 * figure's runner, and synchronously once more on process exit as a last resort.
 */
const children = new Set<ChildProcess>();
/** Processes not started as our children (e.g. engines forked by a fixture): pid list. */
const pids = new Set<number>();
/** Process groups killed whole at cleanup (a shell engine's children outlive a SIGKILL of the shell). */
const groups = new Set<number>();
const dirs = new Set<string>();

export function tempDir(prefix = "sr-bench-"): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  dirs.add(dir);
  return dir;
}

/** Spawns a child that is SIGKILLed at cleanup if still running. */
export function start(cmd: string, args: readonly string[], opts: SpawnOptions = {}): ChildProcess {
  const child = spawn(cmd, args, { stdio: "ignore", ...opts });
  children.add(child);
  child.once("exit", () => children.delete(child));
  return child;
}

/**
 * Spawns a child as the leader of a process group of its own; the whole group is SIGKILLed at
 * cleanup, so what it forks goes with it.
 */
export function startGroup(cmd: string, args: readonly string[], opts: SpawnOptions = {}): ChildProcess {
  const child = start(cmd, args, { ...opts, detached: true });
  if (child.pid !== undefined) groups.add(child.pid);
  return child;
}

export function trackPid(pid: number): void {
  pids.add(pid);
}

export function untrackPid(pid: number): void {
  pids.delete(pid);
}

export function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((r) => child.once("exit", () => r()));
}

function killSync(): void {
  for (const c of children) {
    try {
      if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
    } catch {
      // gone
    }
  }
  for (const pid of pids) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // gone
    }
  }
  pids.clear();
  for (const pgid of groups) {
    try {
      process.kill(-pgid, "SIGKILL");
    } catch {
      // gone
    }
  }
  groups.clear();
}

export async function cleanupAll(): Promise<void> {
  const waiting = [...children].map((c) => exited(c));
  killSync();
  await Promise.race([Promise.all(waiting), new Promise((r) => setTimeout(r, 5000))]);
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
  dirs.clear();
}

process.on("exit", () => {
  killSync();
  for (const d of dirs) {
    try {
      rmSync(d, { recursive: true, force: true });
    } catch {
      // best effort
    }
  }
});
