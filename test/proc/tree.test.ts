import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { test } from "node:test";
import { identify } from "../../src/proc/identity.js";
import { readStat } from "../../src/proc/stat.js";
import { ProcessTable, processTree } from "../../src/proc/tree.js";
import { killIfSame, startTimeOf, until } from "../helpers.js";

/** `sh` that starts a grandchild `sleep`, prints its pid and waits; both killed when the test ends. */
async function parentWithGrandchild(
  t: { after: (fn: () => void) => void },
  detached = false,
): Promise<{ child: ChildProcess & { pid: number }; grandchild: number }> {
  const child = spawn("sh", ["-c", "sleep 30 & echo $!; wait"], { stdio: ["ignore", "pipe", "ignore"], detached });
  assert.ok(child.pid);
  const grandchild = await new Promise<number>((resolve, reject) => {
    child.stdout.setEncoding("utf8").once("data", (line: string) => resolve(Number(line.trim())));
    child.once("exit", () => reject(new Error("sh exited early")));
  });
  const started = [child.pid, grandchild].map((pid) => ({ pid, startTime: startTimeOf(pid) }));
  t.after(() => {
    for (const p of started) killIfSame(p.pid, p.startTime);
  });
  // The grandchild has exec'd sleep once its parent is the shell and its comm is sleep.
  await until(() => readStat(grandchild)?.comm === "sleep", 5000, "grandchild exec");
  return { child: child as ChildProcess & { pid: number }, grandchild };
}

function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((r) => child.once("exit", () => r()));
}

test("a child that spawns a grandchild: both are in the tree, the caller is not", async (t) => {
  const { child, grandchild } = await parentWithGrandchild(t);
  const engine = identify(child.pid, "engine.pid", process.pid);
  const tree = processTree(engine);
  const pids = tree.map((p) => p.pid).sort((a, b) => a - b);
  assert.deepEqual(
    pids,
    [child.pid, grandchild].sort((a, b) => a - b),
  );
  const g = tree.find((p) => p.pid === grandchild);
  assert.deepEqual(g, identify(grandchild, "x", 0), "the grandchild's identity is taken from /proc");
});

test("ProcessTable.find matches pid and start time", async (t) => {
  const { child } = await parentWithGrandchild(t);
  const engine = identify(child.pid, "engine.pid", 0);
  const table = new ProcessTable();
  assert.equal(table.find(engine)?.pid, child.pid);
  assert.equal(table.find({ ...engine, startTime: engine.startTime + 1 }), undefined);
  assert.equal(table.find({ ...engine, bootId: "another-boot" }), undefined);
});

test("a grandchild re-parented after its parent died is still found through the earlier snapshot", async (t) => {
  const { child, grandchild } = await parentWithGrandchild(t);
  const engine = identify(child.pid, "engine.pid", 0);
  const before = processTree(engine);
  assert.ok(before.some((p) => p.pid === grandchild));

  child.kill("SIGKILL");
  await exited(child);
  await until(() => readStat(grandchild)?.ppid !== child.pid, 5000, "re-parenting");

  const after = processTree(engine, before);
  assert.deepEqual(
    after.map((p) => p.pid),
    [grandchild],
  );
});

test("members of a detached engine's process group are found once the engine is gone", async (t) => {
  const { child, grandchild } = await parentWithGrandchild(t, true);
  const engine = identify(child.pid, "engine.pid", 0);
  assert.equal(readStat(grandchild)?.pgrp, child.pid);
  child.kill("SIGKILL");
  await exited(child);
  await until(() => readStat(grandchild)?.ppid !== child.pid, 5000, "re-parenting");
  assert.deepEqual(
    processTree(engine).map((p) => p.pid),
    [grandchild],
  );
  // An identity of another boot (or the orphan sweep's pid 0 of no boot) has no group here:
  // after a reboot, a group with the old engine's number belongs to someone else.
  assert.deepEqual(processTree({ ...engine, bootId: "an-earlier-boot" }), []);
  assert.deepEqual(processTree({ pid: 0, startTime: 0, bootId: "", uid: 0 }), []);
});
