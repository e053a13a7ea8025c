import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { test, type TestContext } from "node:test";
import { startDaemon, tempDir, testConfig, testUser, until, type TestUser } from "../helpers.js";

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
