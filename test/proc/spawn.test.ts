import assert from "node:assert/strict";
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { runProgram, SYSTEM_PATH, systemProgram } from "../../src/native/spawn.js";
import { setTimeout as sleep } from "node:timers/promises";
import { tempDir, until } from "../helpers.js";

// The daemon's own programs (rm) run through the native vfork-style spawn: these tests hold it
// to what a fork-and-exec by Node gave, and to what it promises beyond (only fds 0-2, its own
// environment, no zombie, a bounded stderr).

const SH = systemProgram("sh");

function dirFd(t: { after: (fn: () => void) => void }, path: string): number {
  const fd = openSync(path, "r");
  t.after(() => closeSync(fd));
  return fd;
}

/** A zombie or a live process with this pid: the spawn must leave neither behind. */
function present(pid: number): boolean {
  return existsSync(`/proc/${pid}`);
}

test("a program runs as the uid and gid asked, with no supplementary group, in the directory fd given", async (t) => {
  const dir = tempDir(t);
  const ran = await runProgram(SH, ["-c", 'echo "$(id -u) $(id -g) [$(id -G)] $(pwd)" >&2; exit 3'], {
    cwdFd: dirFd(t, dir),
    as: { uid: 12345, gid: 23456 },
  });
  assert.deepEqual(ran, { code: 3, signal: 0, stderr: `12345 23456 [23456] ${dir}` });
});

test("without `as` a program keeps the daemon's uid", async (t) => {
  const ran = await runProgram(SH, ["-c", "id -u >&2"], { cwdFd: dirFd(t, "/") });
  assert.equal(ran.stderr, String(process.geteuid?.()));
});

test("a program gets only fds 0-2, the system PATH, LC_ALL=C and every signal at its default", async (t) => {
  const held = openSync("/etc/hostname", "r"); // an fd of ours, close-on-exec or not
  t.after(() => closeSync(held));
  const ran = await runProgram(
    SH,
    [
      "-c",
      'ls /proc/self/fd >&2; echo "PATH=$PATH LC_ALL=$LC_ALL HOME=${HOME-unset}" >&2; ' +
        "grep -E '^(SigIgn|SigBlk)' /proc/self/status >&2",
    ],
    { cwdFd: dirFd(t, "/") },
  );
  const lines = ran.stderr.split("\n");
  // ls itself opens one fd (3) for /proc/self/fd: the shell before it held only 0-2.
  assert.deepEqual(lines.slice(0, 4), ["0", "1", "2", "3"]);
  assert.equal(lines[4], `PATH=${SYSTEM_PATH} LC_ALL=C HOME=unset`);
  assert.deepEqual(lines.slice(5), ["SigBlk:\t0000000000000000", "SigIgn:\t0000000000000000"]);
  assert.equal(ran.code, 0);
});

test("a program that cannot start rejects with the errno's name and leaves no child behind", async (t) => {
  await assert.rejects(runProgram("/nonexistent/program", [], { cwdFd: dirFd(t, "/") }), { code: "ENOENT" });
  await assert.rejects(runProgram(SH, ["-c", "true"], { cwdFd: 1_000_000 }), { code: "EBADF" });
  await assert.rejects(runProgram("relative", [], { cwdFd: -1 }), { code: "ERR_INVALID_ARG_TYPE" });
  assert.throws(() => systemProgram("no-such-program-here"), { code: "ENOENT" });
  // Every child of ours has been reaped: none is left as a zombie.
  const children = readFileSync(`/proc/${process.pid}/task/${process.pid}/children`, "latin1").trim();
  assert.equal(children, "");
});

test("aborting kills the program through its pidfd, and it is reaped", async (t) => {
  const ac = new AbortController();
  const started = runProgram(SH, ["-c", "echo started >&2; exec sleep 60"], {
    cwdFd: dirFd(t, "/"),
    signal: ac.signal,
  });
  await new Promise((r) => setTimeout(r, 200));
  const children = readFileSync(`/proc/${process.pid}/task/${process.pid}/children`, "latin1").trim().split(" ");
  assert.equal(children.length, 1);
  const pid = Number(children[0]);
  ac.abort();
  const ran = await started;
  assert.deepEqual(ran, { code: -1, signal: 9, stderr: "started" });
  assert.equal(present(pid), false, "the killed program is reaped, not left a zombie");
});

test("a program writing megabytes to stderr never blocks on it; the detail keeps its first 4 KB", async (t) => {
  const ran = await runProgram(SH, ["-c", "head -c 3000000 /dev/zero | tr '\\0' x >&2"], { cwdFd: dirFd(t, "/") });
  assert.equal(ran.code, 0);
  assert.equal(ran.stderr, "x".repeat(4096));
});

test("rm through the spawn deletes as the owner: what the owner may not delete is left, with rm's message in English", async (t) => {
  const dir = tempDir(t);
  mkdirSync(join(dir, "locked"), { mode: 0o755 });
  mkdirSync(join(dir, "locked", "inner"));
  // The dirs are root's: rm as uid 12345 may not unlink them (LC_ALL=C: the message is stable).
  const ran = await runProgram(systemProgram("rm"), ["-rf", "--one-file-system", "--", "./locked"], {
    cwdFd: dirFd(t, dir),
    as: { uid: 12345, gid: 12345 },
  });
  assert.equal(ran.code, 1);
  assert.equal(ran.stderr, "rm: cannot remove './locked': Permission denied");
  assert.ok(existsSync(join(dir, "locked", "inner")));
});

test("a running program's exit is seen even when the garbage collector runs meanwhile", async (t) => {
  setFlagsFromString("--expose-gc");
  const gc = runInNewContext("gc") as () => void;
  const running = runProgram(SH, ["-c", "sleep 0.3; exit 4"], { cwdFd: dirFd(t, "/") });
  for (let i = 0; i < 3; i++) {
    gc();
    await new Promise((r) => setTimeout(r, 20));
  }
  const outcome = await Promise.race([running, new Promise((r) => setTimeout(() => r("no exit seen"), 5_000))]);
  assert.deepEqual(outcome, { code: 4, signal: 0, stderr: "" });
});

test("at most 32 programs run at once; the others wait their turn and all run", async (t) => {
  const dir = tempDir(t);
  // Each program notes its start in a shared log and holds its slot until the gate opens, so
  // the count of those running does not depend on how fast the host schedules them.
  const runs = Array.from({ length: 80 }, (_, i) =>
    runProgram(SH, ["-c", `echo "+ ${i}" >> log; while [ ! -e gate ]; do sleep 0.02; done; echo "- ${i}" >> log`], {
      cwdFd: dirFd(t, dir),
    }),
  );
  const started = (): number =>
    existsSync(join(dir, "log")) ? (readFileSync(join(dir, "log"), "latin1").match(/^\+/gm) ?? []).length : 0;
  await until(() => started() >= 32, 30_000, "32 programs started");
  await sleep(500); // a 33rd would have started by now if the limit did not hold
  assert.equal(started(), 32, "with 32 slots held, no other program starts");
  writeFileSync(join(dir, "gate"), "");
  const results = await Promise.all(runs);
  assert.ok(results.every((r) => r.code === 0));
  let running = 0;
  let peak = 0;
  for (const line of readFileSync(join(dir, "log"), "latin1").trim().split("\n")) {
    running += line.startsWith("+") ? 1 : -1;
    peak = Math.max(peak, running);
  }
  assert.equal(running, 0);
  assert.equal(started(), 80, "every program ran");
  assert.ok(peak <= 32, `at most 32 at once, not ${peak}`);
});
