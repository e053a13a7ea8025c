/**
 * A Redis session reaped by a real daemon while a BGSAVE child is writing; what is left is
 * checked without the daemon's code (/proc, ss, lstat).
 */
import assert from "node:assert/strict";
import { readdirSync } from "node:fs";
import { test } from "node:test";
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
