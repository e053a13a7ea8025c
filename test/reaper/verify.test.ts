import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, readdirSync, readlinkSync } from "node:fs";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { SESSION_COOKIE } from "../../src/proc/users.js";
import { isGone, sleeper, startDaemon, tempDir, testConfig, until } from "../helpers.js";

type Leftover = { step: string; kind: string; item: string; detail: string; pid?: number; why?: string };
type SessionJson = {
  state: string;
  outcome: string;
  leftovers: Leftover[];
  steps: { name: string; detail: Record<string, unknown> }[];
};

/** Pids of processes (not zombies) whose environment carries the cookie, read from /proc by the test itself. */
function carriers(id: string): number[] {
  const out: number[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const env = readFileSync(`/proc/${name}/environ`, "latin1").split("\0");
      if (env.includes(`${SESSION_COOKIE}=${id}`) && !isGone(Number(name))) out.push(Number(name));
    } catch {
      // gone
    }
  }
  return out;
}

/**
 * On SIGTERM the engine double-forks a sleeper out of its tree, then exits: no snapshot ever
 * saw the sleeper, and it is re-parented to init in a session of its own; it ignores SIGTERM.
 */
async function escapeeSession(t: TestContext, containment: "auto" | "none") {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir, { profiles: { default: { grace_period_sec: 2, containment } } }));
  const id = `escapee-${containment}`;
  // The escapee ignores SIGTERM too (SIG_IGN survives fork and exec): only SIGKILL ends it.
  // It is ignored before the escapee is forked, not by the escapee itself: lineage finds a
  // newborn at once, and a SIGTERM that came before its own `trap` would end it (a loaded host).
  const escape = `trap "" TERM; setsid -f sleep 301`;
  const engine = spawn(
    "sh",
    ["-c", `trap '${escape.replace(/'/g, "'\\''")}; exit 0' TERM; while :; do sleep 0.1; done`],
    {
      stdio: "ignore",
      env: { ...process.env, [SESSION_COOKIE]: id },
    },
  );
  t.after(() => void engine.kill("SIGKILL"));
  t.after(() => {
    for (const pid of carriers(id)) process.kill(pid, "SIGKILL");
  });
  const reg = await d.api<{ containment: { kind: string; path?: string; why?: string } }>("POST", "/v1/sessions", {
    id,
    engine: { pid: engine.pid },
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  assert.equal((await d.api("DELETE", `/v1/sessions/${id}`)).status, 202);
  const finished = await d.reaped(id);
  const s = (await d.api<SessionJson>("GET", `/v1/sessions/${id}`)).body;
  return { d, id, finished, s, containment: reg.body.containment };
}

test("without containment, the cookie reaches an escapee born at the reap: found, killed, clean verified", async (t) => {
  const { id, finished, s, containment } = await escapeeSession(t, "none");
  assert.deepEqual(containment, { kind: "none", why: 'profile "default" sets containment = "none"' });
  // What /proc says, on its own: nothing carries the cookie any more.
  assert.deepEqual(carriers(id), []);
  assert.equal(finished.outcome, "clean", JSON.stringify(s.leftovers));
  // Found by its cookie (no snapshot ever saw it: it was born during the grace period and
  // re-parented to init), then SIGKILLed, since it ignores SIGTERM.
  const terminate = s.steps.find((x) => x.name === "terminate");
  assert.ok(Number(terminate?.detail.sigkill) >= 1, JSON.stringify(terminate?.detail));
  // The engine was born after the daemon started: every fork of it is known from the kernel.
  assert.equal((finished.detail as { tracking: string }).tracking, "lineage");
  assert.deepEqual((finished.detail as { verified: string[] }).verified, [
    "lineage",
    "tree",
    "cookie",
    "ports",
    "paths",
    "ipc",
  ]);
});

test("contained (a cgroup per session, where the host gives one): the escapee is killed with the cgroup, and clean is verified", async (t) => {
  const { id, finished, s, containment } = await escapeeSession(t, "auto");
  // This machine's cgroup v2 tree (pure or hybrid) is writable by root: the session gets one.
  assert.equal(containment.kind, "cgroup", JSON.stringify(containment));
  const path = containment.path as string;
  assert.equal(carriers(id).length, 0, "the escapee outlived cgroup.kill");
  assert.equal(finished.outcome, "clean", JSON.stringify(s.leftovers));
  assert.deepEqual((finished.detail as { verified: string[] }).verified, [
    "cgroup",
    "lineage",
    "tree",
    "cookie",
    "ports",
    "paths",
    "ipc",
  ]);
  const terminate = s.steps.find((x) => x.name === "terminate");
  const cg = terminate?.detail.cgroup as { path: string; kill: string; removed: boolean };
  assert.deepEqual({ ...cg, kill: undefined }, { path, kill: undefined, removed: true });
  // The escapee ignores SIGTERM: cgroup.kill ended it, or (when it was born after the cgroup
  // was found empty, as on a busy host) lineage found it and SIGKILL did.
  assert.ok(cg.kill === "sent" || Number(terminate?.detail.sigkill) >= 1, JSON.stringify(terminate?.detail));
  assert.equal(existsSync(path), false, "the session's cgroup was left behind");
});

test("a directory a process outside the session still uses is not deleted, and the outcome names that process", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  const data = join(dir, "data");
  mkdirSync(data);
  const engine = sleeper(t);
  // Not the engine's: a process that only has its working directory there (a postmaster
  // started by a launcher the session never knew).
  const user = spawn("sleep", ["302"], { cwd: data, stdio: "ignore" });
  t.after(() => void user.kill("SIGKILL"));
  await until(() => readlinkSafe(`/proc/${user.pid}/cwd`) === data, 5_000, "the outsider's cwd");
  const reg = await d.api<{ id: string }>("POST", "/v1/sessions", { engine: { pid: engine.pid }, paths: [data] });
  assert.equal(reg.status, 201);
  const id = reg.body.id;
  await d.api("DELETE", `/v1/sessions/${id}`);
  const finished = await d.reaped(id);
  assert.ok(existsSync(data), "deleted under a live process");
  assert.ok(isGone(engine.pid));
  assert.equal(isGone(user.pid as number), false);
  assert.equal(finished.outcome, "partial");
  const s = (await d.api<SessionJson>("GET", `/v1/sessions/${id}`)).body;
  const path = s.leftovers.find((l) => l.kind === "path");
  assert.ok(path, JSON.stringify(s.leftovers));
  assert.match(path.detail, new RegExp(`^in use, not deleted: sleep \\(pid ${user.pid}, uid 0\\): cwd under ${data}$`));
  const proc = s.leftovers.find((l) => l.pid === user.pid);
  assert.equal(proc?.why, `cwd under ${data}`);

  // Once the outsider is gone, the same kind of session is clean and its directory deleted.
  user.kill("SIGKILL");
  await until(() => isGone(user.pid as number), 5_000, "outsider gone");
  const engine2 = sleeper(t);
  const reg2 = await d.api<{ id: string }>("POST", "/v1/sessions", { engine: { pid: engine2.pid }, paths: [data] });
  await d.api("DELETE", `/v1/sessions/${reg2.body.id}`);
  const second = await d.reaped(reg2.body.id);
  assert.equal(second.outcome, "clean", JSON.stringify(second.detail));
  assert.ok(!existsSync(data));
});

function readlinkSafe(p: string): string | null {
  try {
    return readlinkSync(p);
  } catch {
    return null;
  }
}
