/**
 * A Redis session reaped by a real daemon while a BGSAVE child is writing; what is left is
 * checked without the daemon's code (/proc, ss, lstat).
 */
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import type { Session } from "../../src/client/index.js";
import { startDaemon, tempDir, testConfig, testUser } from "../helpers.js";
import {
  bgsave,
  diagnose,
  explain,
  leftBehind,
  nothingLeft,
  procAlive,
  procInfo,
  psOf,
  reportProblems,
  summary,
  startRedis,
} from "./lib.js";
import { NO_LIVENESS_PASS, removeCgroupBaseAfter } from "./checks.js";

test("DELETE of a redis session with a BGSAVE in flight: child included, nothing is left", async (t) => {
  const dir = tempDir(t);
  const user = testUser(t);
  const d = await startDaemon(t, testConfig(dir));
  const redis = await startRedis(t, user, { parent: dir });
  const reg = await d.api<{ id: string }>("POST", "/v1/sessions", {
    engine: { pid: redis.pid },
    ports: [redis.port],
    paths: [redis.dir],
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  const id = reg.body.id;
  const child = await bgsave(redis);
  assert.equal(procInfo(child.pid)?.ppid, redis.pid);
  assert.ok(
    readdirSync(redis.dir).some((f) => f === `temp-${child.pid}.rdb`),
    "the child is writing its temp file",
  );
  diagnose(t, "redis tree at the reap:", psOf(user.uid));

  assert.equal((await d.api("DELETE", `/v1/sessions/${id}`)).status, 202);
  const finished = await d.reaped(id, 30_000);
  const s = (await d.api<Session>("GET", `/v1/sessions/${id}`)).body;
  t.diagnostic(summary(s));
  const found = leftBehind(user.uid, [redis.port], [redis.dir]);
  const problems = reportProblems(s, found);
  assert.deepEqual(problems, [], explain(problems, s, user.uid));
  assert.equal(procAlive(child.id), false, "the BGSAVE child is gone");
  assert.equal(procAlive(redis.id), false, "redis-server is gone");
  assert.ok(nothingLeft(found), explain(["something is left"], s, user.uid));
  assert.equal(finished.outcome, "clean", explain([], s, user.uid));
});

/**
 * The BGSAVE child without a cgroup (`containment = "none"`): it is a plain fork of the
 * server, so the tree (parent pid) and the server's process group and session (it leads
 * both: started detached) name it, and it must be terminated with it. Closed by DELETE, or
 * with the server SIGKILLed and no liveness pass: then the child is re-parented to pid 1, and
 * only the group and session it kept still tie it to the session.
 */
async function uncontainedBgsave(t: TestContext, end: "delete" | "sigkill"): Promise<void> {
  const dir = tempDir(t);
  const user = testUser(t);
  const d = await startDaemon(
    t,
    testConfig(dir, {
      ...(end === "sigkill" ? { detect: NO_LIVENESS_PASS } : {}),
      profiles: { default: { containment: "none" } },
    }),
  );
  const redis = await startRedis(t, user, { parent: dir });
  removeCgroupBaseAfter(t, join(dir, "reaper.db")); // made at the daemon's start, even if unused
  const reg = await d.api<Session>("POST", "/v1/sessions", {
    engine: { pid: redis.pid },
    ports: [redis.port],
    paths: [redis.dir],
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  assert.equal(reg.body.containment?.kind, "none", JSON.stringify(reg.body.containment));
  const id = reg.body.id;
  // Forked after the registration: in no snapshot the daemon took.
  const child = await bgsave(redis);
  const c = procInfo(child.pid);
  assert.ok(c && c.ppid === redis.pid && c.pgid === redis.pid && c.sid === redis.pid, JSON.stringify(c));
  assert.ok(readdirSync(redis.dir).includes(`temp-${child.pid}.rdb`), "the child is writing its temp file");
  const before = psOf(user.uid);
  diagnose(t, "redis tree at the reap:", before);

  if (end === "delete") assert.equal((await d.api("DELETE", `/v1/sessions/${id}`)).status, 202);
  else process.kill(redis.pid, "SIGKILL");
  const finished = await d.reaped(id, 30_000);
  const s = (await d.api<Session>("GET", `/v1/sessions/${id}`)).body;
  t.diagnostic(summary(s));
  const term = s.steps?.find((x) => x.name === "terminate")?.detail ?? {};
  const handled = (term.processes as { pid: number }[] | undefined)?.map((p) => p.pid) ?? [];
  t.diagnostic(
    `terminate: ${JSON.stringify({ sigterm: term.sigterm, sigstop: term.sigstop, sigkill: term.sigkill, skipped: term.skipped })}, the child among its processes: ${handled.includes(child.pid)}`,
  );
  assert.equal(finished.reason, end === "delete" ? "closed" : "engine_gone");
  const found = leftBehind(user.uid, [redis.port], [redis.dir]);
  const problems = reportProblems(s, found);
  const extra = `before the ${end}:\n${before}\nBGSAVE child ${child.pid}, alive now: ${procAlive(child.id)}`;
  assert.deepEqual(problems, [], explain(problems, s, user.uid, extra));
  assert.equal(procAlive(child.id), false, explain(["the BGSAVE child runs on"], s, user.uid, extra));
  assert.equal(procAlive(redis.id), false, "redis-server is gone");
  assert.ok(nothingLeft(found), explain(["something is left"], s, user.uid, extra));
  assert.equal(finished.outcome, "clean", explain([], s, user.uid, extra));
}

test("uncontained, DELETE of a redis session with a BGSAVE in flight: the child is terminated with the tree", (t) =>
  uncontainedBgsave(t, "delete"));

test("uncontained, redis-server SIGKILLed mid-BGSAVE, no liveness pass: the re-parented child is found by its group", (t) =>
  uncontainedBgsave(t, "sigkill"));

test("a templated close hook shuts redis down gracefully: terminate finds nothing to signal, outcome clean", async (t) => {
  const dir = tempDir(t);
  const user = testUser(t);
  const d = await startDaemon(
    t,
    testConfig(dir, {
      profiles: { default: { close_hook: ["redis-cli", "-h", "127.0.0.1", "-p", "{port}", "shutdown", "nosave"] } },
    }),
  );
  const redis = await startRedis(t, user, { parent: dir });
  // Only the port: redis's own log (in its dir) is read after the reap.
  const reg = await d.api<Session>("POST", "/v1/sessions", { engine: { pid: redis.pid }, ports: [redis.port] });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  const id = reg.body.id;
  assert.equal((await d.api("DELETE", `/v1/sessions/${id}`)).status, 202);
  const finished = await d.reaped(id, 30_000);
  const s = (await d.api<Session>("GET", `/v1/sessions/${id}`)).body;
  t.diagnostic(summary(s));
  const close = s.steps?.find((x) => x.name === "close-environment");
  assert.deepEqual(
    (close?.detail as { argv?: string[] }).argv,
    ["redis-cli", "-h", "127.0.0.1", "-p", String(redis.port), "shutdown", "nosave"],
    "the journal shows the argv as run, {port} expanded",
  );
  assert.equal(close?.outcome, "ok", JSON.stringify(close?.detail));
  assert.equal((close?.detail as { engineExited?: boolean }).engineExited, true);
  const terminate = s.steps?.find((x) => x.name === "terminate");
  assert.equal((terminate?.detail as { skipped?: string }).skipped, "engine already gone", JSON.stringify(terminate));
  // The engine's own word: redis logged a requested shutdown, not a signal.
  const log = readFileSync(join(redis.dir, "redis.log"), "utf8");
  assert.match(log, /User requested shutdown/);
  assert.match(log, /ready to exit, bye bye/);
  assert.doesNotMatch(log, /Received SIGTERM/);
  const found = leftBehind(user.uid, [redis.port], []);
  assert.deepEqual(reportProblems(s, found), [], explain([], s, user.uid));
  assert.equal(procAlive(redis.id), false);
  assert.equal(finished.outcome, "clean", explain([], s, user.uid));
});
