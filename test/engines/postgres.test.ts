/**
 * PostgreSQL sessions reaped by a real daemon; what is left is checked without the daemon's
 * code (/proc, ss, lstat), and the daemon's report must match it: anything left must be a
 * leftover naming it, and never an outcome of `clean`.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { test, type TestContext } from "node:test";
import type { Session } from "../../src/client/index.js";
import { startDaemon, tempDir, testConfig, testUser, until } from "../helpers.js";
import {
  busyBackend,
  ctlAs,
  diagnose,
  within,
  explain,
  initCluster,
  killAfter,
  leftBehind,
  listening,
  nothingLeft,
  pgCtlCommand,
  postgresIpcOf,
  procAlive,
  procId,
  procInfo,
  psOf,
  reportProblems,
  summary,
  startPostgres,
  type ProcId,
} from "./lib.js";

/**
 * No periodic liveness pass during the test (once a year): its tree snapshot, every 2 s by
 * default, would see a child only by luck of timing. The daemon must find an engine's
 * processes by itself when the engine dies or its launcher exits.
 */
const NO_LIVENESS_PASS = { liveness_schedule: "0 0 0 1 1 *" };

test("DELETE of a postgres session with a busy backend: nothing is left", async (t) => {
  const dir = tempDir(t);
  const user = testUser(t);
  const d = await startDaemon(t, testConfig(dir));
  const pg = await startPostgres(t, user, { parent: dir });
  const backend = await busyBackend(pg);
  assert.equal(procInfo(backend.pid)?.ppid, pg.postmasterPid, "the backend is the postmaster's child");
  diagnose(t, "postgres tree at the reap:", psOf(user.uid));
  const reg = await d.api<{ id: string }>("POST", "/v1/sessions", {
    engine: { pid: pg.postmasterPid },
    ports: [pg.port],
    paths: [pg.base],
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  const id = reg.body.id;

  assert.equal((await d.api("DELETE", `/v1/sessions/${id}`)).status, 202);
  const finished = await d.reaped(id, 30_000);
  const s = (await d.api<Session>("GET", `/v1/sessions/${id}`)).body;
  t.diagnostic(summary(s));
  const found = leftBehind(user.uid, [pg.port], [pg.base]);
  const problems = reportProblems(s, found);
  assert.deepEqual(problems, [], explain(problems, s, user.uid));
  assert.ok(nothingLeft(found), explain(["something is left"], s, user.uid));
  assert.equal(procAlive(backend.id), false);
  assert.equal(finished.outcome, "clean", explain([], s, user.uid));
  // Not asserted: how the postmaster went (a SIGKILLed one leaves its shared memory behind).
  const term = s.steps?.find((x) => x.name === "terminate")?.detail ?? {};
  t.diagnostic(`terminate: ${JSON.stringify({ sigterm: term.sigterm, sigstop: term.sigstop, sigkill: term.sigkill })}`);
  t.diagnostic(`postgres shared memory left: ${JSON.stringify(postgresIpcOf(user.uid))}`);
});

test("postmaster SIGKILLed 0.3 s into a backend's CPU loop: the backend is reaped, or reported", async (t) => {
  const dir = tempDir(t);
  const user = testUser(t);
  const d = await startDaemon(t, testConfig(dir, { detect: NO_LIVENESS_PASS }));
  const pg = await startPostgres(t, user, { parent: dir });
  const reg = await d.api<{ id: string }>("POST", "/v1/sessions", {
    engine: { pid: pg.postmasterPid },
    ports: [pg.port],
    paths: [pg.base],
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  const id = reg.body.id;
  const backend = await busyBackend(pg);
  await new Promise((r) => setTimeout(r, 300));
  const before = psOf(user.uid);
  process.kill(pg.postmasterPid, "SIGKILL");

  const finished = await d.reaped(id, 30_000);
  assert.equal(finished.reason, "engine_gone");
  const s = (await d.api<Session>("GET", `/v1/sessions/${id}`)).body;
  t.diagnostic(summary(s));
  const found = leftBehind(user.uid, [pg.port], [pg.base]);
  const problems = reportProblems(s, found);
  const extra = `before the SIGKILL:\n${before}\nbusy backend: ${backend.pid}; alive now: ${procAlive(backend.id)}`;
  assert.deepEqual(problems, [], explain(problems, s, user.uid, extra));
  if (procAlive(backend.id)) assert.equal(s.outcome, "partial", explain([], s, user.uid, extra));
  else assert.ok(nothingLeft(found), explain(["something is left"], s, user.uid, extra));
});

/**
 * `reaperctl run --path BASE -- pg_ctl start`, run by the cluster's user: pg_ctl, the registered engine,
 * forks the postmaster into a session of its own, waits until it is ready and exits 0; the
 * session then ends (engine_gone or closed) with the postmaster still running. Whatever the
 * daemon makes of that, it must not delete the data dir under a live postmaster, and if the
 * postmaster survives, the outcome is `partial` and names it.
 */
async function pgCtlUnderRun(t: TestContext, containment: "auto" | "none"): Promise<void> {
  const dir = tempDir(t);
  const user = testUser(t);
  // The user runs reaperctl (pg_ctl refuses root), so the socket is open to every user.
  const d = await startDaemon(
    t,
    testConfig(dir, { detect: NO_LIVENESS_PASS, api: { socket_mode: "0666" }, profiles: { default: { containment } } }),
  );
  const c = await initCluster(t, user, { parent: dir });
  const id = "pg-ctl";
  const run = ctlAs(t, user, [
    "run",
    "--socket",
    d.socket,
    "--id",
    id,
    "--path",
    c.base,
    "--wait-reap",
    "30s",
    "--",
    ...pgCtlCommand(c),
  ]);
  // The postmaster, found independently (whoever listens on the port), while it runs.
  let postmaster: ProcId | undefined;
  let tree = "";
  const watch = until(
    () => {
      const l = listening(c.port).find((x) => x.pid > 0);
      if (l === undefined) return run.proc.exitCode !== null; // reaperctl ended: stop looking
      postmaster = procId(l.pid);
      killAfter(t, postmaster);
      tree = psOf(user.uid);
      return true;
    },
    40_000,
    "a listener on the cluster's port",
  );
  const r = await within(run.done, 45_000, "reaperctl run");
  await watch;
  diagnose(t, "pg_ctl's tree while it waited for the postmaster:", tree);
  assert.ok(postmaster, `no postmaster was ever seen listening; reaperctl: ${r.code} ${r.stderr}`);
  const extra = [
    `reaperctl exited ${r.code}; stdout: ${r.stdout.trim()}; stderr: ${r.stderr.trim()}`,
    `postmaster ${postmaster.pid}, alive now: ${procAlive(postmaster)}; data dir exists: ${existsSync(c.dataDir)}`,
    `the tree while pg_ctl waited:\n${tree}`,
  ].join("\n");
  const got = await d.api<Session>("GET", `/v1/sessions/${id}`);
  assert.equal(
    got.status,
    200,
    `the session was never registered, and the postmaster runs on unregistered\n${extra}\n/proc now:\n${psOf(user.uid)}`,
  );
  const s = got.body;
  t.diagnostic(summary(s));
  assert.equal(s.state, "reaped", extra);
  const found = leftBehind(user.uid, [], [c.base]);
  const problems = reportProblems(s, found);
  if (procAlive(postmaster)) {
    if (!existsSync(c.dataDir))
      problems.unshift(`${c.dataDir} was deleted under postmaster ${postmaster.pid}, which still runs`);
    if (s.outcome !== "partial") problems.push(`outcome ${s.outcome} with the postmaster alive`);
  }
  assert.deepEqual(problems, [], explain(problems, s, user.uid, extra));
}

// Registered at the gate (no --port: `reaperctl run --port` starts the command before it
// registers, and pg_ctl may exit before its server listens; see README, Known limits).
test("contained, reaperctl run --path BASE -- pg_ctl start: the daemonized postmaster is reaped whole", (t) =>
  pgCtlUnderRun(t, "auto"));

test("uncontained, reaperctl run --path BASE -- pg_ctl start: no data dir deleted under a live postmaster", (t) =>
  pgCtlUnderRun(t, "none"));
