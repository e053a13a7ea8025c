import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { readFileSync, readdirSync, symlinkSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import {
  isExited,
  isKernelThread,
  listStats,
  pageSize,
  parseStat,
  readStat,
  readUid,
  type ProcStat,
} from "../../src/proc/stat.js";
import { tempDir, until } from "../helpers.js";

/** A /proc/<pid>/stat line (52 fields) with the given values; the rest are zeros. */
function statLine(
  pid: number,
  comm: string,
  f: { state?: string; ppid?: number; flags?: number; start?: number; rss?: number },
) {
  const fields: (string | number)[] = new Array<number>(52 - 2).fill(0);
  // fields[0] is field 3 (state)
  fields[0] = f.state ?? "S";
  fields[1] = f.ppid ?? 1; // 4
  fields[2] = 700; // 5 pgrp
  fields[3] = 800; // 6 session
  fields[4] = 34816; // 7 tty_nr
  fields[5] = -1; // 8 tpgid
  fields[6] = f.flags ?? 4194560; // 9 flags
  fields[19] = f.start ?? 123456; // 22 starttime
  fields[21] = f.rss ?? 321; // 24 rss (pages)
  return `${pid} (${comm}) ${fields.join(" ")}\n`;
}

test("parseStat reads the fields after a comm holding spaces and parentheses", () => {
  const st = parseStat(statLine(4321, "(a) (b)", { state: "R", ppid: 99, flags: 64, start: 987654321, rss: 2048 }));
  assert.deepEqual(st, {
    pid: 4321,
    comm: "(a) (b)",
    state: "R",
    ppid: 99,
    pgrp: 700,
    sid: 800,
    flags: 64,
    startTime: 987654321,
    rssPages: 2048,
  });
});

test("parseStat survives a comm that imitates the fields after it", () => {
  const st = parseStat(statLine(77, ") Z 1 2 (", { state: "S", ppid: 5, start: 42 }));
  assert.equal(st?.comm, ") Z 1 2 (");
  assert.equal(st?.state, "S");
  assert.equal(st?.ppid, 5);
  assert.equal(st?.startTime, 42);
});

test("parseStat returns null for garbage", () => {
  assert.equal(parseStat(""), null);
  assert.equal(parseStat("no parentheses at all"), null);
  assert.equal(parseStat("12 ) S 1 ("), null);
});

test("readStat of this process", () => {
  const st = readStat(process.pid);
  assert.ok(st);
  assert.equal(st.pid, process.pid);
  assert.equal(st.ppid, process.ppid);
  assert.ok(["R", "S"].includes(st.state), st.state);
  assert.ok(st.comm.length > 0);
  assert.ok(Number.isSafeInteger(st.startTime) && st.startTime > 0);
  assert.equal(readStat(process.pid)?.startTime, st.startTime, "start time is stable");
  assert.equal(isKernelThread(st), false);
  assert.equal(isExited(st), false);
});

test("readStat of a pid that does not exist is null", () => {
  assert.equal(readStat(2 ** 22 + 1), null); // above the largest possible pid_max
  assert.equal(readUid(2 ** 22 + 1), null);
});

test("readStat of a real process whose comm holds spaces and parentheses", async (t) => {
  const dir = tempDir(t);
  const exe = join(dir, "(a) (b)");
  symlinkSync("/bin/sleep", exe); // comm is the basename of the path given to execve
  const child = spawn(exe, ["30"], { stdio: "ignore" });
  t.after(() => child.kill("SIGKILL"));
  await until(() => readStat(child.pid as number)?.comm === "(a) (b)", 5000, "exec of the renamed sleep");
  const st = readStat(child.pid as number);
  assert.equal(st?.pid, child.pid);
  assert.equal(st?.ppid, process.pid);
  assert.ok(st && !isExited(st), st?.state);
});

test("rssPages is the resident set that VmRSS reports, within the kernel's per-CPU counter slack", async (t) => {
  // A process holding 64 MB: stat's rss is read from per-CPU counters without summing them
  // (VmRSS sums them), so it may lag by a bounded amount (well under 2 MB on small hosts).
  const child = spawn(
    process.execPath,
    ["-e", "globalThis.b = Buffer.alloc(64 << 20, 1); setInterval(() => {}, 1000)"],
    {
      stdio: "ignore",
    },
  );
  t.after(() => child.kill("SIGKILL"));
  const vmRssKb = (): number =>
    Number(/^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${child.pid}/status`, "latin1"))?.[1] ?? 0);
  await until(() => vmRssKb() > 64 * 1024, 10_000, "the child's 64 MB resident");
  // Compared while the child's resident set holds still (it may still be starting up).
  let compared: { statKb: number; statusKb: number } | null = null;
  for (let i = 0; i < 50 && compared === null; i++) {
    const before = vmRssKb();
    const statKb = ((readStat(child.pid as number)?.rssPages ?? 0) * pageSize()) / 1024;
    if (vmRssKb() === before) compared = { statKb, statusKb: before };
    else await new Promise((r) => setTimeout(r, 100));
  }
  assert.ok(compared !== null, "the child's resident set never held still");
  assert.ok(
    Math.abs(compared.statKb - compared.statusKb) < 2048,
    `stat ${compared.statKb} kB, VmRSS ${compared.statusKb} kB`,
  );
  assert.equal(pageSize(), Number(execFileSync("getconf", ["PAGESIZE"], { encoding: "utf8" })));
});

test("readStat (bytes parsed in place) gives parseStat's result for every process on the host", async (t) => {
  const dir = tempDir(t);
  const exe = join(dir, ") Z 1 2 (");
  symlinkSync("/bin/sleep", exe);
  const child = spawn(exe, ["30"], { stdio: "ignore" });
  t.after(() => child.kill("SIGKILL"));
  await until(() => readStat(child.pid as number)?.comm === ") Z 1 2 (", 5000, "exec of the renamed sleep");
  let compared = 0;
  for (const name of readdirSync("/proc").filter((n) => /^\d+$/.test(n))) {
    let text: string;
    try {
      text = readFileSync(`/proc/${name}/stat`, "latin1");
    } catch {
      continue; // gone meanwhile
    }
    const st = readStat(Number(name));
    if (st === null) continue;
    const expected = parseStat(text);
    // Only the state and resident pages of a running process may change between the two reads.
    const settled = (x: ProcStat | null) => (x === null ? null : { ...x, state: "", rssPages: 0 });
    assert.deepEqual(settled(st), settled(expected), text);
    compared++;
  }
  assert.ok(compared > 2);
});

test("pid 2 (kthreadd) and its children are kernel threads; pid 1 and this process are not", () => {
  const kthreadd = readStat(2);
  assert.equal(kthreadd?.comm, "kthreadd", "no kthreadd at pid 2: run the suite in the host's pid namespace");
  if (kthreadd) {
    assert.equal(isKernelThread(kthreadd), true);
    assert.notEqual(kthreadd.flags & 0x00200000, 0, "PF_KTHREAD set");
    const kids = listStats().filter((s) => s.ppid === 2);
    assert.ok(kids.length > 0);
    for (const k of kids) assert.equal(isKernelThread(k), true, k.comm);
  }
  const init = readStat(1);
  assert.ok(init);
  assert.equal(isKernelThread(init), false);
});

test("isExited is true for Z, X and x only", () => {
  for (const [state, exited] of [
    ["Z", true],
    ["X", true],
    ["x", true],
    ["R", false],
    ["S", false],
    ["D", false],
    ["T", false],
    ["I", false],
  ] as const) {
    assert.equal(isExited(parseStat(statLine(10, "p", { state })) as ProcStat), exited, state);
  }
});

test("readUid reads the real uid and gid of this process", () => {
  assert.equal(readUid(process.pid), process.getuid?.());
  assert.equal(readUid(process.pid, "Gid"), process.getgid?.());
});

test("listStats includes this process and pid 1, and only numeric entries", () => {
  const all = listStats();
  assert.ok(all.some((s) => s.pid === process.pid));
  assert.ok(all.some((s) => s.pid === 1));
  assert.ok(all.every((s) => Number.isSafeInteger(s.pid) && s.pid > 0));
});
