import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdirSync, readFileSync, rmdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { cgroup2Mount, cgroupPids } from "../../src/proc/cgroup.js";
import { listStats } from "../../src/proc/stat.js";
import { exited, isGone, sleeper, startDaemon, tempDir, testConfig, until } from "../helpers.js";

type Step = { name: string; outcome: string; detail: Record<string, unknown> };
type SessionJson = { state: string; reason: string; outcome: string; steps: Step[]; leftovers: unknown[] };

/**
 * Starts `sleep` with exactly this pid by setting the kernel's last allocated pid
 * (/proc/sys/kernel/ns_last_pid) just below it; retried, since any fork on the host may
 * take the pid first. Fails the test rather than pass without a real reuse.
 */
async function spawnWithPid(t: Parameters<typeof sleeper>[0], pid: number): Promise<ChildProcess & { pid: number }> {
  for (let attempt = 0; attempt < 200; attempt++) {
    writeFileSync("/proc/sys/kernel/ns_last_pid", String(pid - 1));
    const child = sleeper(t);
    if (child.pid === pid) return child;
    child.kill("SIGKILL");
    await exited(child);
  }
  throw new Error(`could not get pid ${pid} after 200 attempts`);
}

test("a decoy that took over the engine's pid while the daemon was down is never signalled", async (t) => {
  const dir = tempDir(t);
  const config = testConfig(dir);
  const first = await startDaemon(t, config);
  const engine = sleeper(t);
  await first.api("POST", "/v1/sessions", { id: "reused", engine: { pid: engine.pid } });
  await first.stop();

  engine.kill("SIGKILL");
  await exited(engine);
  const decoy = await spawnWithPid(t, engine.pid);
  assert.equal(decoy.pid, engine.pid, "the decoy wears the engine's pid");

  const second = await startDaemon(t, config);
  const finished = await second.reaped("reused");
  assert.equal(finished.reason, "engine_gone");
  const s = (await second.api<SessionJson>("GET", "/v1/sessions/reused")).body;
  const term = s.steps.find((x) => x.name === "terminate");
  assert.equal(term?.detail.skipped, "engine already gone");
  assert.ok(!isGone(decoy.pid), "the decoy was signalled");
  // And the held pidfds never watched the decoy: it lives on while the daemon runs.
  assert.equal(second.daemon.registry.size, 0);
});

test("a live session whose engine exits and whose pid is reused at once: the decoy is never signalled", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir, { profiles: { default: { close_hook: ["/bin/true"] } } }));
  const engine = sleeper(t);
  await d.api("POST", "/v1/sessions", { id: "hot", engine: { pid: engine.pid } });
  engine.kill("SIGKILL");
  await exited(engine);
  const decoy = await spawnWithPid(t, engine.pid);
  const finished = await d.reaped("hot");
  assert.equal(finished.reason, "engine_gone");
  assert.equal(finished.outcome, "clean");
  assert.ok(!isGone(decoy.pid), "the decoy was signalled");
});

test("uncontained, an engine that forks in a loop and ignores SIGTERM: frozen, then killed; nothing escapes", async (t) => {
  const dir = tempDir(t);
  // Thousands of processes to scan and signal: a step budget that fits the job on a busy
  // machine. Without a cgroup (the per-process path is what this tests).
  const d = await startDaemon(
    t,
    testConfig(dir, { profiles: { default: { grace_period_sec: 0.5, step_timeout_sec: 30, containment: "none" } } }),
  );
  // Every child ignores SIGTERM too (an ignored signal is inherited) and forks a grandchild.
  const script = `trap '' TERM; for i in $(seq 1 1500); do ( sleep 1000 & sleep 1000 ) & done; wait`;
  const engine = spawn("bash", ["-c", script], { stdio: "ignore", detached: true });
  t.after(() => {
    try {
      process.kill(-(engine.pid as number), "SIGKILL");
    } catch {
      // gone
    }
  });
  const pid = engine.pid as number;
  await until(() => listStats().filter((s) => s.pgrp === pid).length > 50, 5_000, "the loop is forking");
  await d.api("POST", "/v1/sessions", { id: "forker", engine: { pid } });
  await d.api("POST", "/v1/sessions/forker/reap");
  const finished = await d.reaped("forker", 30_000);
  const s = (await d.api<SessionJson>("GET", "/v1/sessions/forker")).body;
  const term = s.steps.find((x) => x.name === "terminate") as Step;
  t.diagnostic(
    `terminate: ${JSON.stringify({ ...term.detail, processes: (term.detail.processes as unknown[]).length })}`,
  );
  assert.equal(finished.outcome, "clean", JSON.stringify(s.leftovers));
  assert.ok((term.detail.sigstop as number) > 0, "the tree was frozen before SIGKILL");
  const left = listStats().filter((st) => st.pgrp === pid && st.state !== "Z");
  assert.deepEqual(
    left.map((st) => st.pid),
    [],
    "processes of the engine's group survived",
  );
});

test("a zombie engine counts as gone", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  // sh backgrounds a short sleep, then execs a long one that never waits for it: a real zombie.
  const parent = sleeper(t, "sh", ["-c", "sleep 0.3 & exec sleep 30"]);
  let zombie = 0;
  await until(
    () => {
      const kid = listStats().find((s) => s.ppid === parent.pid);
      zombie = kid?.pid ?? 0;
      return zombie > 0;
    },
    3_000,
    "child started",
  );
  await d.api("POST", "/v1/sessions", { id: "zombie", engine: { pid: zombie } });
  const finished = await d.reaped("zombie");
  assert.equal(finished.reason, "engine_gone");
  assert.equal(finished.outcome, "clean");
  const st = listStats().find((s) => s.pid === zombie);
  assert.equal(st?.state, "Z", "still a zombie: the reaper did not wait for it to vanish");
});

/** A fresh cgroup v2 below the mount, removed at the end. */
function makeCgroup(t: TestContext): string {
  const mount = cgroup2Mount();
  assert.ok(mount, "no cgroup v2 mounted: the cgroup tests need one");
  const dir = join(mount, `sr-test-${process.pid}-${Math.random().toString(36).slice(2, 8)}`);
  mkdirSync(dir);
  t.after(async () => {
    for (const p of cgroupPids(dir)) {
      try {
        process.kill(p, "SIGKILL");
      } catch {
        // gone
      }
    }
    await until(() => cgroupPids(dir).length === 0, 3_000, "cgroup emptied");
    rmdirSync(dir);
  });
  return dir;
}

test("an engine already alone in a cgroup of its own keeps it; cgroup.kill ends it, double-forked escapees included", async (t) => {
  const cg = makeCgroup(t);
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir, { profiles: { default: { grace_period_sec: 0.3 } } }));
  // Joins the cgroup, then starts 20 children that double-fork into new sessions (setsid -f):
  // re-parented to init at once, out of reach of any tree walk, but still in the cgroup.
  const engine = sleeper(t, "sh", [
    "-c",
    `echo $$ > ${cg}/cgroup.procs; trap '' TERM; for i in $(seq 1 20); do setsid -f sleep 1000; done; exec sleep 1000`,
  ]);
  await until(() => cgroupPids(cg).length >= 21, 5_000, "escapees started");
  const escapees = cgroupPids(cg).filter((p) => p !== engine.pid);
  const reg = await d.api<{ containment: unknown }>("POST", "/v1/sessions", { id: "cg", engine: { pid: engine.pid } });
  assert.deepEqual(reg.body.containment, { kind: "cgroup", path: cg, made: false });
  await d.api("POST", "/v1/sessions/cg/reap");
  const finished = await d.reaped("cg");
  assert.equal(finished.outcome, "clean");
  const term = (await d.api<SessionJson>("GET", "/v1/sessions/cg")).body.steps.find((x) => x.name === "terminate");
  // Not made by the daemon: killed, not removed (its maker removes it).
  assert.deepEqual(term?.detail.cgroup, { path: cg, kill: "sent", removed: false });
  await until(() => escapees.every(isGone), 3_000, "escapees gone");
  assert.deepEqual(cgroupPids(cg), []);
});

test("cgroup.kill is not used on a cgroup that holds a process older than the engine", async (t) => {
  const cg = makeCgroup(t);
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir, { profiles: { default: { grace_period_sec: 0.3 } } }));
  const elder = sleeper(t);
  writeFileSync(join(cg, "cgroup.procs"), String(elder.pid));
  await new Promise((r) => setTimeout(r, 20)); // the engine must start after the elder
  const engine = sleeper(t, "sh", ["-c", `echo $$ > ${cg}/cgroup.procs; trap '' TERM; exec sleep 1000`]);
  await until(() => readFileSync(join(cg, "cgroup.procs"), "latin1").includes(String(engine.pid)), 3_000, "joined");
  await d.api("POST", "/v1/sessions", { id: "shared", engine: { pid: engine.pid } });
  await d.api("POST", "/v1/sessions/shared/reap");
  assert.equal((await d.reaped("shared")).outcome, "clean");
  const term = (await d.api<SessionJson>("GET", "/v1/sessions/shared")).body.steps.find((x) => x.name === "terminate");
  assert.equal(term?.detail.cgroupKill, undefined);
  assert.ok(isGone(engine.pid));
  assert.ok(!isGone(elder.pid), "the elder sharing the cgroup was killed");
});
