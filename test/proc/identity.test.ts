import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { sleeper, exited } from "../helpers.js";
import { ReaperError } from "../../src/errors.js";
import { bootId, identify, liveness } from "../../src/proc/identity.js";
import { listStats, readStat } from "../../src/proc/stat.js";
import { until } from "../helpers.js";

type Cleanup = { after: (fn: () => void) => void };

/** A real zombie: the shell backgrounds `true`, then execs sleep, which never waits for it. */
async function zombie(t: Cleanup): Promise<{ pid: number; parent: number }> {
  const parent = sleeper(t, "sh", ["-c", "true & exec sleep 30"]);
  let pid = 0;
  await until(
    () => {
      const z = listStats().find((s) => s.ppid === parent.pid && s.state === "Z");
      pid = z?.pid ?? 0;
      return pid !== 0;
    },
    5000,
    "a zombie child",
  );
  return { pid, parent: parent.pid };
}

function assertCode(code: string): (err: unknown) => boolean {
  return (err: unknown) => {
    assert.ok(err instanceof ReaperError, `expected a ReaperError, got ${String(err)}`);
    assert.equal(err.code, code);
    return true;
  };
}

test("bootId is this boot's id", () => {
  assert.equal(bootId(), readFileSync("/proc/sys/kernel/random/boot_id", "latin1").trim());
  assert.match(bootId(), /^[0-9a-f-]{36}$/);
});

test("pid 0, 1, negative and non-integer pids are SR_INVALID_PID", () => {
  for (const pid of [0, 1, -5, -1, 1.5, Number.NaN, Number.POSITIVE_INFINITY, 2 ** 53]) {
    assert.throws(() => identify(pid, "engine.pid", 0), assertCode("SR_INVALID_PID"), String(pid));
  }
});

test("the daemon's own pid is SR_INVALID_PID", (t) => {
  assert.throws(() => identify(process.pid, "engine.pid", process.pid), assertCode("SR_INVALID_PID"));
  const child = sleeper(t);
  assert.throws(() => identify(child.pid, "engine.pid", child.pid), assertCode("SR_INVALID_PID"));
});

test("a kernel thread is SR_INVALID_PID", () => {
  const kthreadd = readStat(2);
  // Fail rather than pass vacuously: the suite needs the host's pid namespace.
  assert.equal(kthreadd?.comm, "kthreadd", "no kthreadd at pid 2: run the suite in the host's pid namespace");
  assert.throws(() => identify(2, "engine.pid", 0), assertCode("SR_INVALID_PID"));
  const kworker = listStats().find((s) => s.ppid === 2);
  assert.ok(kworker, "kthreadd has no children");
  assert.throws(() => identify(kworker.pid, "engine.pid", 0), assertCode("SR_INVALID_PID"));
});

test("a pid that does not exist is SR_PROCESS_NOT_FOUND", () => {
  const pidMax = Number(readFileSync("/proc/sys/kernel/pid_max", "latin1"));
  assert.throws(() => identify(pidMax + 1, "engine.pid", 0), assertCode("SR_PROCESS_NOT_FOUND"));
});

test("a zombie is SR_PROCESS_NOT_FOUND and its liveness is gone", async (t) => {
  const z = await zombie(t);
  const st = readStat(z.pid);
  assert.equal(st?.state, "Z");
  assert.throws(() => identify(z.pid, "engine.pid", 0), assertCode("SR_PROCESS_NOT_FOUND"));
  assert.equal(liveness({ pid: z.pid, startTime: st?.startTime ?? -1, bootId: bootId(), uid: 0 }), "gone");
});

test("identify records pid, start time, boot id and uid of a real child", (t) => {
  const child = sleeper(t);
  const id = identify(child.pid, "engine.pid", process.pid);
  assert.deepEqual(id, {
    pid: child.pid,
    startTime: readStat(child.pid)?.startTime,
    bootId: bootId(),
    uid: process.getuid?.(),
  });
  assert.equal(liveness(id), "alive");
});

test("liveness: a wrong start time (pid reuse) or another boot is gone", (t) => {
  const child = sleeper(t);
  const id = identify(child.pid, "engine.pid", 0);
  assert.equal(liveness({ ...id, startTime: id.startTime + 1 }), "gone");
  assert.equal(liveness({ ...id, startTime: id.startTime - 1 }), "gone");
  assert.equal(liveness({ ...id, bootId: "00000000-0000-0000-0000-000000000000" }), "gone");
  assert.equal(liveness(id), "alive", "the real process is still alive");
});

test("liveness: a process that exited is gone", async (t) => {
  const child = sleeper(t);
  const id = identify(child.pid, "engine.pid", 0);
  assert.equal(liveness(id), "alive");
  child.kill("SIGKILL");
  await exited(child);
  assert.equal(liveness(id), "gone");
});
