import assert from "node:assert/strict";
import type { ChildProcess } from "node:child_process";
import { test } from "node:test";
import { sleeper } from "../helpers.js";
import { pino } from "pino";
import { bootId, identify, liveness } from "../../src/proc/identity.js";
import { signalProcess } from "../../src/proc/signal.js";
import { readStat } from "../../src/proc/stat.js";

const log = pino({ level: "silent" });

function exitOf(child: ChildProcess): Promise<NodeJS.Signals | null> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(child.signalCode);
  return new Promise((r) => child.once("exit", (_code, sig) => r(sig)));
}

test("pid 1 and pids <= 1 are refused", () => {
  // SIGCONT: harmless even if the guard were broken.
  const init = readStat(1);
  assert.ok(init);
  const id = { pid: 1, startTime: init.startTime, bootId: bootId(), uid: 0 };
  assert.equal(signalProcess(id, "SIGCONT", log, 0), "refused");
  for (const pid of [0, -1, -100, 1.5]) {
    assert.equal(signalProcess({ ...id, pid }, "SIGCONT", log, 0), "refused", String(pid));
  }
});

test("the daemon's own pid is refused and not signalled", async (t) => {
  const child = sleeper(t);
  const id = identify(child.pid, "engine.pid", 0);
  assert.equal(signalProcess(id, "SIGKILL", log, child.pid), "refused");
  assert.equal(liveness(id), "alive");
  assert.equal(child.exitCode, null);
  assert.equal(child.signalCode, null);
  // And it is signalled once it is not the daemon.
  assert.equal(signalProcess(id, "SIGKILL", log, process.pid), "sent");
  assert.equal(await exitOf(child), "SIGKILL");
});

test("a kernel thread is refused", () => {
  const kthreadd = readStat(2);
  // Fail rather than pass vacuously: the suite needs the host's pid namespace.
  assert.equal(kthreadd?.comm, "kthreadd", "no kthreadd at pid 2: run the suite in the host's pid namespace");
  assert.equal(
    signalProcess({ pid: 2, startTime: kthreadd.startTime, bootId: bootId(), uid: 0 }, "SIGCONT", log, 0),
    "refused",
  );
});

test("an identity whose start time does not match is gone, and the real process is not signalled", (t) => {
  const child = sleeper(t);
  const id = identify(child.pid, "engine.pid", 0);
  assert.equal(signalProcess({ ...id, startTime: id.startTime + 1 }, "SIGKILL", log, 0), "gone");
  assert.equal(signalProcess({ ...id, bootId: "00000000-0000-0000-0000-000000000000" }, "SIGKILL", log, 0), "gone");
  assert.equal(liveness(id), "alive");
  assert.notEqual(readStat(child.pid)?.state, "Z");
  assert.equal(child.exitCode, null);
  assert.equal(child.signalCode, null);
});

test("a real child is signalled (sent) and exits; once gone, signalling it again is gone", async (t) => {
  const child = sleeper(t);
  const id = identify(child.pid, "engine.pid", process.pid);
  assert.equal(signalProcess(id, "SIGTERM", log, process.pid), "sent");
  assert.equal(await exitOf(child), "SIGTERM");
  assert.equal(signalProcess(id, "SIGTERM", log, process.pid), "gone");
});
