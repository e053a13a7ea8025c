import assert from "node:assert/strict";
import { execFileSync, spawn, spawnSync, type ChildProcess } from "node:child_process";
import { chmodSync, chownSync, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { fileURLToPath } from "node:url";
import { callApi } from "../../src/client/transport.js";
import { readStat, readUid } from "../../src/proc/stat.js";
import {
  exited,
  isGone,
  spawnDaemon,
  startDaemon,
  tempDir,
  testConfig,
  testUser,
  until,
  writeDaemonConfig,
  type TestUser,
} from "../helpers.js";

type SessionJson = {
  outcome: string;
  leftovers: { kind: string; item: string; detail: string }[];
  steps: { name: string; detail: Record<string, unknown> }[];
};

/** SysV shared memory segment ids, read from /proc by the test itself. */
function shmIds(): Set<string> {
  const rows = readFileSync("/proc/sysvipc/shm", "latin1").trim().split("\n").slice(1);
  return new Set(rows.map((r) => r.trim().split(/\s+/)[1] as string));
}

/**
 * An engine as a test user that makes what PostgreSQL leaves after a SIGKILL: a SysV segment
 * (shmget, so its creator pid is the engine) and a file in /dev/shm; prints the segment id
 * and sleeps.
 */
async function ipcEngine(
  t: TestContext,
  user: TestUser,
  name: string,
): Promise<{ pid: number; shmid: string; file: string }> {
  const file = `/dev/shm/${name}`;
  const code = `
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
shmid = libc.shmget(0, 4096, 0o600 | 0o1000)
open(${JSON.stringify(file)}, "w").write("x")
print(shmid, flush=True)
time.sleep(300)
`;
  const child = spawn("python3", ["-c", code], { uid: user.uid, gid: user.gid, stdio: ["ignore", "pipe", "inherit"] });
  t.after(() => void child.kill("SIGKILL"));
  const shmid = await new Promise<string>((resolve, reject) => {
    child.stdout.setEncoding("utf8").once("data", (d: string) => resolve(d.trim()));
    child.once("exit", (c) => reject(new Error(`engine exited ${c}`)));
  });
  t.after(() => {
    spawn("ipcrm", ["-m", shmid], { stdio: "ignore" });
    spawn("rm", ["-f", file], { stdio: "ignore" });
  });
  return { pid: child.pid as number, shmid, file };
}

test("IPC a SIGKILLed engine leaves (SysV shm, /dev/shm) is reported, and removed with remove_ipc", async (t) => {
  const dir = tempDir(t);
  const user = testUser(t);
  const d = await startDaemon(
    t,
    testConfig(dir, {
      profiles: { default: { allowed_uids: [user.uid] }, tidy: { remove_ipc: true } },
    }),
  );
  for (const [profile, removed] of [
    ["default", false],
    ["tidy", true],
  ] as const) {
    const e = await ipcEngine(t, user, `sr-ipc-test-${profile}-${process.pid}`);
    assert.ok(shmIds().has(e.shmid) && existsSync(e.file));
    const reg = await d.api<{ id: string }>("POST", "/v1/sessions", { profile, engine: { pid: e.pid } });
    assert.equal(reg.status, 201, JSON.stringify(reg.body));
    process.kill(e.pid, "SIGKILL"); // as a postmaster dies: nothing of its own cleanup runs
    const finished = await d.reaped(reg.body.id);
    assert.equal(finished.reason, "engine_gone");
    const s = (await d.api<SessionJson>("GET", `/v1/sessions/${reg.body.id}`)).body;
    const ipc = s.leftovers.filter((l) => l.kind === "ipc").map((l) => l.item);
    if (removed) {
      await until(() => !shmIds().has(e.shmid), 5_000, "segment removed");
      assert.equal(existsSync(e.file), false);
      assert.deepEqual(ipc, []);
      assert.equal(finished.outcome, "clean", JSON.stringify(s.leftovers));
    } else {
      // Reported, left in place: the test's own look at /proc and /dev/shm agrees.
      assert.ok(shmIds().has(e.shmid));
      assert.ok(existsSync(e.file));
      assert.deepEqual(ipc.sort(), [`posix_shm ${e.file}`, `sysv_shm ${e.shmid}`].sort());
      assert.equal(finished.outcome, "partial");
    }
  }
});

// --- IPC is the session's by identity, never by a pid alone (a creator pid is recycled) ---

// recycled_pid.py is not compiled: from dist/test/reaper/ go back to the source tree.
const RECYCLED_PID = fileURLToPath(new URL("../../../test/fixtures/recycled_pid.py", import.meta.url));
let python: string | undefined;
/**
 * The interpreter itself, resolved once: a version manager's python3 shim costs ~70 ms a start
 * (seconds on a busy host; resolved in a test, not while the file registers its tests).
 */
function pythonPath(): string {
  python ??= execFileSync("python3", ["-c", "import sys; sys.stdout.write(sys.executable)"], { encoding: "utf8" });
  return python;
}

interface Account {
  readonly name: string;
  readonly uid: number;
  readonly gid: number;
}

function nobody(): Account {
  const id = (flag: string): number => Number(execFileSync("id", [flag, "nobody"], { encoding: "utf8" }).trim());
  return { name: "nobody", uid: id("-u"), gid: id("-g") };
}

/** The rows of /proc/sysvipc/shm, keyed by the header's names. */
function shmRows(): Record<string, string>[] {
  const [header, ...rows] = readFileSync("/proc/sysvipc/shm", "latin1").trim().split("\n");
  const keys = (header ?? "").trim().split(/\s+/);
  return rows.map((r) => {
    const cells = r.trim().split(/\s+/);
    return Object.fromEntries(keys.map((k, i) => [k, cells[i] ?? ""]));
  });
}

/** A row of /proc/sysvipc/shm by its shmid; undefined once removed. */
function shmRow(shmid: string): Record<string, string> | undefined {
  return shmRows().find((r) => r.shmid === shmid);
}

/** A SysV segment made by `as` with ipcmk (its creator pid is ipcmk's, which exits); removed when the test ends. */
function segmentBy(t: TestContext, as: Account): { shmid: string; cpid: number; ctime: number } {
  const out = execFileSync(
    "setpriv",
    ["--reuid", String(as.uid), "--regid", String(as.gid), "--clear-groups", "ipcmk", "-M", "64"],
    { encoding: "utf8" },
  );
  const shmid = /(\d+)\s*$/.exec(out.trim())?.[1] ?? "";
  t.after(() => void spawnSync("ipcrm", ["-m", shmid], { stdio: "ignore" }));
  const row = shmRow(shmid);
  assert.ok(row !== undefined, `ipcmk said: ${out}`);
  assert.equal(Number(row.cuid), as.uid);
  return { shmid, cpid: Number(row.cpid), ctime: Number(row.ctime) };
}

/**
 * Starts `argv` as `as` under the pid `pid` (test/fixtures/recycled_pid.py); resolves with the
 * fixture (the command's parent, which waits for it) once the command runs, or null when the
 * pid could not be had (another process holds it). Killed when the test ends.
 */
async function underPid(
  t: TestContext,
  pid: number,
  as: Account,
  argv: string[],
): Promise<{ fixture: ChildProcess; done: Promise<void>; stderr: () => string } | null> {
  const fixture = spawn(pythonPath(), [RECYCLED_PID, String(pid), String(as.uid), String(as.gid), ...argv], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  t.after(() => {
    fixture.kill("SIGKILL");
    if (readStat(pid) !== null && readStat(pid)?.ppid === fixture.pid) process.kill(pid, "SIGKILL");
  });
  let out = "";
  let err = "";
  fixture.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
  fixture.stderr.setEncoding("utf8").on("data", (d: string) => (err += d));
  const done = new Promise<void>((r) => fixture.once("exit", () => r()));
  await Promise.race([until(() => out.includes("\n"), 15_000, "the fixture's pid"), done]);
  const got = Number(out.split("\n")[0]);
  if (got === pid) return { fixture, done, stderr: () => err };
  assert.equal(got, 0, `recycled_pid.py said: ${out} ${err}`);
  return null;
}

test("a segment made before a session engine was born under its creator's recycled pid is not the session's: kept, never listed", async (t) => {
  const dir = tempDir(t);
  const user = testUser(t);
  const d = await startDaemon(
    t,
    testConfig(dir, {
      profiles: { default: { allowed_uids: [user.uid] }, tidy: { remove_ipc: true } },
    }),
  );
  // Another user's segment (what the issue saw removed), and one of the engine's own user,
  // which only its creation time (before the engine's birth) tells from the session's.
  const cases = [
    { creator: nobody(), profile: "tidy" },
    { creator: user, profile: "tidy" },
    { creator: nobody(), profile: "default" },
  ] as const;
  for (const [i, c] of cases.entries()) {
    let seg: ReturnType<typeof segmentBy> | undefined;
    let engine: Awaited<ReturnType<typeof underPid>> = null;
    for (let round = 0; round < 5 && engine === null; round++) {
      seg = segmentBy(t, c.creator);
      // Born in a later second than the segment's ctime (whole seconds): not the boundary second.
      const after = (seg.ctime + 1) * 1000 + 200;
      await new Promise((r) => setTimeout(r, Math.max(0, after - Date.now())));
      engine = await underPid(t, seg.cpid, user, ["sleep", "600"]);
      if (engine === null) spawnSync("ipcrm", ["-m", seg.shmid]); // its pid was taken meanwhile: another segment
    }
    assert.ok(seg !== undefined && engine !== null, "no engine was born under the segment's creator pid");
    const pid = seg.cpid;
    assert.equal(readUid(pid), user.uid);
    // The premise: the kernel names the engine's pid as the segment's creator.
    assert.equal(shmRow(seg.shmid)?.cpid, String(pid));

    const id = `recycled-${i}`;
    const reg = await d.api("POST", "/v1/sessions", { id, profile: c.profile, engine: { pid } });
    assert.equal(reg.status, 201, JSON.stringify(reg.body));
    assert.equal((await d.api("POST", `/v1/sessions/${id}/reap`)).status, 202);
    const finished = await d.reaped(id);
    const s = (await d.api<SessionJson>("GET", `/v1/sessions/${id}`)).body;
    const what = `${c.creator.name}'s segment, ${c.profile}: ${JSON.stringify(s.leftovers)} ${JSON.stringify(s.steps)}`;
    assert.ok(isGone(pid), "the engine was reaped");
    assert.ok(shmIds().has(seg.shmid), `removed: ${what}`);
    assert.deepEqual(
      s.leftovers.filter((l) => l.kind === "ipc"),
      [],
      what,
    );
    const ipc = s.steps.find((x) => x.name === "remove-paths")?.detail.ipc as { item: string }[] | undefined;
    assert.equal(ipc?.some((o) => o.item === seg.shmid) ?? false, false, what);
    assert.equal(finished.outcome, "clean", what);
    spawnSync("ipcrm", ["-m", seg.shmid]);
  }
});

test("a segment another user made under the recycled pid of a session process that died is not the session's (creator uid)", async (t) => {
  const dir = tempDir(t);
  const user = testUser(t);
  const { file, socket } = writeDaemonConfig(
    dir,
    `[profiles.default]
allowed_uids = [${user.uid}]
remove_ipc = true
grace_period_sec = 1
step_timeout_sec = 5
allowed_roots = ["${dir}"]
`,
  );
  // The reap stops after terminate (the engine is dead, its identity journaled); its pid is
  // then another user's segment's creator, made after the engine started; a second daemon
  // resumes the reap at the next step.
  const first = await spawnDaemon(t, file, socket, { REAPER_FAILPOINTS: "after-terminate" });
  const engine = spawn("sleep", ["600"], { uid: user.uid, gid: user.gid, stdio: "ignore" });
  t.after(() => void engine.kill("SIGKILL"));
  const pid = engine.pid as number;
  const reg = await callApi(socket, "POST", "/v1/sessions", { id: "reused", engine: { pid } });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  await callApi(socket, "POST", "/v1/sessions/reused/reap").catch(() => undefined);
  assert.equal(await first.exit, null, "the daemon should have died at the failpoint");
  await exited(engine); // reaped by this process: its pid is free

  const other = nobody();
  let made: NonNullable<Awaited<ReturnType<typeof underPid>>> | null = null;
  for (let i = 0; i < 5 && made === null; i++) made = await underPid(t, pid, other, ["ipcmk", "-M", "64"]);
  assert.ok(made !== null, "no ipcmk was born under the engine's pid");
  await made.done;
  // The premise: the engine's pid is the creator of another user's segment, younger than the engine.
  const row = shmRows().find((r) => r.cpid === String(pid) && r.cuid === String(other.uid));
  assert.ok(row !== undefined, `no segment of ${other.name} by pid ${pid}; ipcmk said: ${made.stderr()}`);
  const shmid = row.shmid ?? "";
  t.after(() => void spawnSync("ipcrm", ["-m", shmid], { stdio: "ignore" }));

  await spawnDaemon(t, file, socket);
  let s: SessionJson & { state: string } = { state: "", outcome: "", leftovers: [], steps: [] };
  await until(
    async () => {
      s = (await callApi<SessionJson & { state: string }>(socket, "GET", "/v1/sessions/reused")).body;
      return s.state === "reaped";
    },
    15_000,
    "reap finished after restart",
  );
  const what = `${JSON.stringify(s.leftovers)} ${JSON.stringify(s.steps)}`;
  assert.ok(shmIds().has(shmid), `removed: ${what}`);
  assert.deepEqual(
    s.leftovers.filter((l) => l.kind === "ipc"),
    [],
    what,
  );
  assert.equal(s.outcome, "clean", what);
});

test("a /dev/shm file of the engine's uid made before the engine was born is not the session's: kept, never listed", async (t) => {
  const dir = tempDir(t);
  const user = testUser(t);
  const d = await startDaemon(
    t,
    testConfig(dir, { profiles: { default: { allowed_uids: [user.uid], remove_ipc: true } } }),
  );
  const file = `/dev/shm/sr-ipc-before-${process.pid}-${Date.now()}`;
  writeFileSync(file, "x");
  chownSync(file, user.uid, user.gid);
  t.after(() => void spawnSync("rm", ["-f", file]));
  // Born well within a second of the file (the old one-second slack took it), well after it.
  await new Promise((r) => setTimeout(r, 300));
  const engine = spawn("sleep", ["600"], { uid: user.uid, gid: user.gid, stdio: "ignore" });
  t.after(() => void engine.kill("SIGKILL"));
  const reg = await d.api("POST", "/v1/sessions", { id: "posix-before", engine: { pid: engine.pid } });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  assert.equal((await d.api("POST", "/v1/sessions/posix-before/reap")).status, 202);
  const finished = await d.reaped("posix-before");
  const s = (await d.api<SessionJson>("GET", "/v1/sessions/posix-before")).body;
  const what = JSON.stringify(s.leftovers);
  assert.ok(existsSync(file), `removed: ${JSON.stringify(s.steps)}`);
  assert.deepEqual(
    s.leftovers.filter((l) => l.kind === "ipc"),
    [],
    what,
  );
  assert.equal(finished.outcome, "clean", what);
});

test("what a process outside the session maps or made is not the session's, though it uses a registered path", async (t) => {
  const dir = tempDir(t);
  chmodSync(dir, 0o755);
  const user = testUser(t);
  const outsider = testUser(t);
  const d = await startDaemon(
    t,
    testConfig(dir, { profiles: { default: { allowed_uids: [user.uid], remove_ipc: true } } }),
  );
  const work = join(dir, "work");
  mkdirSync(work, { mode: 0o755 });
  chownSync(work, user.uid, user.gid);
  const engine = spawn("sleep", ["600"], { uid: user.uid, gid: user.gid, stdio: "ignore" });
  t.after(() => void engine.kill("SIGKILL"));
  const reg = await d.api("POST", "/v1/sessions", { id: "outsider", engine: { pid: engine.pid }, paths: [work] });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  // Both made after the engine started: only who they belong to tells them from the session's.
  const file = `/dev/shm/sr-ipc-outsider-${process.pid}-${Date.now()}`;
  writeFileSync(file, "x".repeat(4096), { mode: 0o644 });
  chownSync(file, user.uid, user.gid);
  t.after(() => void spawnSync("rm", ["-f", file]));
  // Another user's process working in the session's directory: its segment, and the engine
  // user's file it maps.
  const code = `
import ctypes, mmap, os, sys, time
os.chdir(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
shmid = libc.shmget(0, 4096, 0o600 | 0o1000)
f = open(sys.argv[2], "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
print(shmid, flush=True)
time.sleep(300)
`;
  // python3 by PATH: the interpreter pythonPath() finds lives under root's home, closed to the user.
  const other = spawn("python3", ["-c", code, work, file], {
    uid: outsider.uid,
    gid: outsider.gid,
    stdio: ["ignore", "pipe", "inherit"],
  });
  t.after(() => void other.kill("SIGKILL"));
  const shmid = await new Promise<string>((resolve, reject) => {
    other.stdout.setEncoding("utf8").once("data", (s: string) => resolve(s.trim()));
    other.once("exit", (c) => reject(new Error(`outsider exited ${c}`)));
  });
  t.after(() => void spawnSync("ipcrm", ["-m", shmid], { stdio: "ignore" }));
  assert.equal(shmRow(shmid)?.cuid, String(outsider.uid));

  assert.equal((await d.api("POST", "/v1/sessions/outsider/reap")).status, 202);
  const finished = await d.reaped("outsider");
  const s = (await d.api<SessionJson>("GET", "/v1/sessions/outsider")).body;
  const what = JSON.stringify(s.leftovers);
  assert.equal(isGone(other.pid as number), false, "a process outside the session is never signalled");
  // The directory it works in is reported (in use), and nothing of its IPC.
  assert.ok(
    s.leftovers.some((l) => l.kind === "path" && l.item === work),
    what,
  );
  assert.deepEqual(
    s.leftovers.filter((l) => l.kind === "ipc"),
    [],
    what,
  );
  assert.ok(shmIds().has(shmid) && existsSync(file), what);
  assert.equal(finished.outcome, "partial", what);
});
