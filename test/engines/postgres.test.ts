/**
 * PostgreSQL sessions reaped by a real daemon; what is left is checked without the daemon's
 * code (/proc, ss, lstat), and the daemon's report must match it: anything left must be a
 * leftover naming it, and never an outcome of `clean`.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import type { Session } from "../../src/client/index.js";
import { spawnDaemon, startDaemon, tempDir, testConfig, testUser, until, writeDaemonConfig } from "../helpers.js";
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
  pathGone,
  pgCtlCommand,
  postgresIpcOf,
  procAlive,
  procId,
  procInfo,
  processesOf,
  psOf,
  reportProblems,
  summary,
  startPostgres,
  PG_BIN,
  type BusyBackend,
  type ProcId,
} from "./lib.js";
import { cwdOf, establishedOn, removeCgroupBaseAfter, sleep, socketApi, unreportedIpc } from "./checks.js";

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
// registers, and pg_ctl may exit before its server listens; see docs/operations.md, Known limits).
test("contained, reaperctl run --path BASE -- pg_ctl start: the daemonized postmaster is reaped whole", (t) =>
  pgCtlUnderRun(t, "auto"));

test("uncontained, reaperctl run --path BASE -- pg_ctl start: no data dir deleted under a live postmaster", (t) =>
  pgCtlUnderRun(t, "none"));

/** The /dev/shm files a process maps (/proc/<pid>/maps), e.g. PostgreSQL's dynamic shared memory. */
function shmMapped(pid: number): string[] {
  try {
    const files = readFileSync(`/proc/${pid}/maps`, "latin1")
      .split("\n")
      .map((l) => l.slice(l.indexOf("/")))
      .filter((f) => f.startsWith("/dev/shm/"))
      .map((f) => f.replace(/ \(deleted\)$/, ""));
    return [...new Set(files)];
  } catch {
    return [];
  }
}

/**
 * The contained test above without containment (`containment = "none"`): no cgroup, no
 * liveness pass, and the backend, born after the registration and setsid'd, is in no snapshot
 * of the tree. It survives the reap; the verification must find it (its cwd is in the data dir,
 * it holds an ESTABLISHED connection on the registered port) and say `partial`, and the data dir
 * must be kept under it. With `remove_ipc`, the /dev/shm segments it still maps must be kept too.
 */
async function uncontainedSigkill(t: TestContext, removeIpc: boolean): Promise<void> {
  const dir = tempDir(t);
  const user = testUser(t);
  const d = await startDaemon(
    t,
    testConfig(dir, {
      detect: NO_LIVENESS_PASS,
      profiles: { default: { containment: "none", remove_ipc: removeIpc } },
    }),
  );
  const pg = await startPostgres(t, user, { parent: dir });
  removeCgroupBaseAfter(t, join(dir, "reaper.db")); // made at the daemon's start, even if unused
  const reg = await d.api<Session>("POST", "/v1/sessions", {
    engine: { pid: pg.postmasterPid },
    ports: [pg.port],
    paths: [pg.base],
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  assert.equal(reg.body.containment?.kind, "none", JSON.stringify(reg.body.containment));
  const id = reg.body.id;
  const backend = await busyBackend(pg);
  await sleep(300);
  const before = psOf(user.uid);
  process.kill(pg.postmasterPid, "SIGKILL");

  const finished = await d.reaped(id, 30_000);
  assert.equal(finished.reason, "engine_gone");
  const s = (await d.api<Session>("GET", `/v1/sessions/${id}`)).body;
  t.diagnostic(summary(s));
  t.diagnostic(`verified: ${JSON.stringify(finished.detail?.verified)}`);
  const found = leftBehind(user.uid, [pg.port], [pg.base]);
  const problems = reportProblems(s, found);
  const alive = procAlive(backend.id);
  const extra = `before the SIGKILL:\n${before}\nbusy backend: ${backend.pid}; alive now: ${alive}`;
  t.diagnostic(`busy backend ${backend.pid} alive after the reap: ${alive}`);
  if (alive) {
    // What /proc and ss show of the survivor, on their own.
    const cwd = cwdOf(backend.pid) ?? "";
    const conns = establishedOn(pg.port).filter((c) => c.pid === backend.pid);
    const shm = shmMapped(backend.pid);
    t.diagnostic(
      `backend ${backend.pid}: cwd ${cwd}; ESTABLISHED on ${pg.port}: ${conns.length}; maps ${shm.join(" ")}`,
    );
    if (!(cwd === pg.dataDir || cwd.startsWith(pg.dataDir + "/")))
      problems.push(`premise: the backend's cwd is ${cwd}, not in ${pg.dataDir}`);
    if (conns.length === 0) problems.push(`premise: the backend holds no ESTABLISHED socket on ${pg.port}`);
    if (!existsSync(pg.dataDir)) problems.unshift(`${pg.dataDir} was deleted under backend ${backend.pid}`);
    if (s.outcome !== "partial") problems.push(`outcome ${s.outcome} with backend ${backend.pid} alive`);
    const named = s.leftovers.find((l) => l.kind === "process" && l.item === String(backend.pid));
    const why = (named as { why?: string } | undefined)?.why ?? "";
    if (named !== undefined && !/^cwd under |^port \d+ \(tcp ESTABLISHED\)$/.test(why))
      problems.push(`the backend's leftover says why "${why}": neither its cwd nor its connection`);
    const path = s.leftovers.find((l) => l.kind === "path" && l.item === pg.base);
    if (path === undefined || !String(path.detail).startsWith("in use, not deleted"))
      problems.push(`no "in use, not deleted" leftover for ${pg.base}: ${JSON.stringify(path)}`);
    if (removeIpc) {
      for (const f of shm) {
        if (pathGone(f)) problems.push(`${f} was removed while backend ${backend.pid} still maps it`);
        const l = s.leftovers.find((x) => x.kind === "ipc" && x.item === `posix_shm ${f}`);
        if (l !== undefined && !/in use/.test(String(l.detail)))
          problems.push(`${f}, mapped by the live backend, is reported as ${JSON.stringify(l.detail)}`);
      }
    }
  } else {
    if (!nothingLeft(found)) problems.push("the backend is gone, yet something else is left");
    if (!s.leftovers.every((l) => l.kind === "ipc"))
      problems.push("the backend is gone, yet leftovers other than ipc are reported");
  }
  // Once nothing runs, every PostgreSQL IPC object of the user left must be an ipc leftover.
  if (!alive) problems.push(...unreportedIpc(s, user.uid, { posix: false }));
  t.diagnostic(`PostgreSQL IPC of the user now: ${JSON.stringify(postgresIpcOf(user.uid))}`);
  assert.deepEqual(problems, [], explain(problems, s, user.uid, extra));
}

test("uncontained, postmaster SIGKILLed 0.3 s into a backend's CPU loop: the backend is reported, its data dir kept", (t) =>
  uncontainedSigkill(t, false));

test("uncontained, remove_ipc, postmaster SIGKILLed: the /dev/shm segments the surviving backend maps are kept", (t) =>
  uncontainedSigkill(t, true));

/** The tree the daemon last made durable for a session (read with sqlite3; the daemon may be running). */
function storedTree(db: string, id: string): { pid: number; startTime: number }[] | null {
  const r = spawnSync("sqlite3", ["-readonly", "-json", db, `SELECT tree FROM sessions WHERE id = '${id}'`], {
    encoding: "utf8",
    timeout: 5_000,
  });
  if (r.status !== 0 || r.stdout.trim() === "") return null;
  const rows = JSON.parse(r.stdout) as { tree: string | null }[];
  return rows[0]?.tree ? (JSON.parse(rows[0].tree) as { pid: number; startTime: number }[]) : null;
}

/**
 * A real reaperd, stopped (SIGTERM) while a postgres session with a busy backend is live; the
 * postmaster is SIGKILLed while no daemon runs; the daemon started again on the same config
 * must reap the session at once (`engine_gone`) and the backend with it: contained, with the
 * cgroup; uncontained, from the durable tree, once a liveness pass (every 2 s by default) saw
 * it there before the stop, else it is found by the verification and reported (`partial`).
 * `remove_ipc = true`, so that an outcome of `clean` is possible and means something.
 */
async function restartAfterSigkill(
  t: TestContext,
  containment: "auto" | "none",
  opts: { livenessPass: boolean } = { livenessPass: true },
): Promise<void> {
  const dir = tempDir(t);
  const user = testUser(t);
  const cfg = writeDaemonConfig(
    dir,
    [
      "flush_interval_ms = 50",
      "[log]",
      'level = "warn"',
      ...(opts.livenessPass ? [] : ["[detect]", `liveness_schedule = "${NO_LIVENESS_PASS.liveness_schedule}"`]),
      "[profiles.default]",
      "grace_period_sec = 1",
      "step_timeout_sec = 5",
      `allowed_roots = [${JSON.stringify(dir)}]`,
      `containment = "${containment}"`,
      "remove_ipc = true",
      "",
    ].join("\n"),
  );
  const pg = await startPostgres(t, user, { parent: dir });
  const first = await spawnDaemon(t, cfg.file, cfg.socket);
  removeCgroupBaseAfter(t, cfg.db);
  const api = socketApi(cfg.socket);
  const reg = await api.api<Session>("POST", "/v1/sessions", {
    engine: { pid: pg.postmasterPid },
    ports: [pg.port],
    paths: [pg.base],
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  const id = reg.body.id;
  t.diagnostic(`containment: ${JSON.stringify(reg.body.containment)}`);
  if (containment === "none") assert.equal(reg.body.containment?.kind, "none");
  const backend = await busyBackend(pg);
  // Until a liveness pass has made the backend part of the durable tree (or 5 s); without
  // passes, 2.5 s in which nothing should have seen it.
  let durable = false;
  if (opts.livenessPass)
    await until(
      () => (durable = storedTree(cfg.db, id)?.some((p) => p.pid === backend.pid) ?? false),
      5_000,
      "the backend in the stored tree",
    ).catch(() => undefined);
  else await sleep(2_500);
  t.diagnostic(`the backend ${backend.pid} in the durable tree before the stop: ${durable}`);

  first.proc.kill("SIGTERM");
  assert.equal(await within(first.exit, 15_000, "reaperd's graceful stop"), 0, first.output());
  const stored = storedTree(cfg.db, id) ?? [];
  durable = stored.some((p) => p.pid === backend.pid);
  process.kill(pg.postmasterPid, "SIGKILL");
  await until(() => !procAlive(pg.postmaster), 5_000, "the postmaster gone");
  // The auxiliary processes notice and exit; the backend, in its loop, does not.
  await until(() => processesOf(user.uid).every((p) => p.pid === backend.pid), 10_000, "only the backend left");
  const before = psOf(user.uid);
  assert.ok(procAlive(backend.id), `premise: the backend outlives its postmaster\n${before}`);
  const mapped = shmMapped(backend.pid);

  const second = await spawnDaemon(t, cfg.file, cfg.socket);
  const s = await api.reaped(id, 30_000);
  t.diagnostic(summary(s));
  const events = await api.events(id);
  const expired = events.find((e) => e.event === "session.expired");
  const finished = events.find((e) => e.event === "reap.finished");
  t.diagnostic(`expired: ${JSON.stringify(expired?.detail)}; verified: ${JSON.stringify(finished?.detail?.verified)}`);
  const found = leftBehind(user.uid, [pg.port], [pg.base]);
  const problems = reportProblems(s, found);
  if (s.reason !== "engine_gone") problems.push(`reason ${s.reason}, not engine_gone`);
  if (finished?.outcome !== s.outcome)
    problems.push(`reap.finished says ${finished?.outcome}, the session ${s.outcome}`);
  const alive = procAlive(backend.id);
  if (alive && containment === "auto" && s.containment?.kind === "cgroup")
    problems.push(`backend ${backend.pid} survived the reap of a contained session`);
  if (alive && durable)
    problems.push(`backend ${backend.pid} survived, though the durable tree held it: ${JSON.stringify(stored)}`);
  if (alive && s.outcome !== "partial") problems.push(`outcome ${s.outcome} with backend ${backend.pid} alive`);
  if (alive && !existsSync(pg.dataDir)) problems.unshift(`${pg.dataDir} was deleted under backend ${backend.pid}`);
  if (alive && !s.leftovers.some((l) => l.kind === "path" && l.item === pg.base && /^in use/.test(String(l.detail))))
    problems.push(`no "in use" path leftover for ${pg.base} with backend ${backend.pid} alive in it`);
  if (alive)
    // Asserted by the uncontained remove_ipc test above; diagnosed here.
    t.diagnostic(
      `/dev/shm the live backend maps: ${mapped.map((f) => `${f} (${pathGone(f) ? "REMOVED" : "kept"})`).join(", ")}`,
    );
  // Every IPC object left must be removed (remove_ipc) or reported.
  if (!alive) problems.push(...unreportedIpc(s, user.uid, { posix: true }));
  t.diagnostic(`PostgreSQL IPC of the user now: ${JSON.stringify(postgresIpcOf(user.uid))}`);
  const extra = `before the restart:\n${before}\nbusy backend ${backend.pid}, alive now: ${alive}; in the durable tree: ${durable}\nreaperd (1st):\n${first.output()}\nreaperd (2nd):\n${second.output()}`;
  assert.deepEqual(problems, [], explain(problems, s, user.uid, extra));

  second.proc.kill("SIGTERM");
  assert.equal(await within(second.exit, 15_000, "reaperd's second stop"), 0, second.output());
}

test("reaperd restarted after the postmaster was SIGKILLed while it was down, contained: the backend dies with the cgroup", (t) =>
  restartAfterSigkill(t, "auto"));

test("reaperd restarted after the postmaster was SIGKILLed while it was down, uncontained: the backend is reaped from the durable tree", (t) =>
  restartAfterSigkill(t, "none"));

test("reaperd restarted after the postmaster was SIGKILLed while it was down, uncontained, no liveness pass: the backend is reported", (t) =>
  restartAfterSigkill(t, "none", { livenessPass: false }));

/** A process's CPU time so far (utime + stime, /proc/<pid>/stat fields 14 and 15), in clock ticks. */
function cpuTicks(pid: number): number | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return Number(f[11]) + Number(f[12]);
  } catch {
    return null;
  }
}
/** USER_HZ: what /proc/<pid>/stat counts CPU time in. */
const CLK_TCK = Number(spawnSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).stdout.trim()) || 100;

/**
 * busy_cpu_percent counts the session's CPU as a whole. For each way of counting it (contained:
 * the session cgroup's cpu.stat; uncontained, profile `uncontained`: the sum over the tracked
 * tree), two clusters, one with a backend in a CPU loop, one idle, each run by a user of its own;
 * every session heartbeats "idle" every second (alive, but not active). With idle_timeout_sec
 * = 4, the idle ones are reaped `idle_timeout` and the busy ones stay live: their postmasters
 * idle, and only their backend's CPU (born after the registration) can count as activity. Then
 * they are closed. One daemon and one 8 s window for both: the four clusters run side by side.
 */
test("busy_cpu_percent, contained and not: a backend's CPU keeps its session live; the idle cluster's is reaped idle_timeout", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(
    t,
    testConfig(dir, {
      detect: { liveness_schedule: "* * * * * *" },
      profiles: {
        default: { idle_timeout_sec: 4, busy_cpu_percent: 20 },
        uncontained: { containment: "none" },
      },
    }),
  );
  const kinds = [
    { profile: "default", containment: "cgroup" },
    { profile: "uncontained", containment: "none" },
  ] as const;
  const clusters = await Promise.all(
    kinds.flatMap(({ profile }) =>
      (["idle", "busy"] as const).map(async (role) => {
        const user = testUser(t);
        return { profile, role, user, pg: await startPostgres(t, user, { parent: dir }) };
      }),
    ),
  );
  removeCgroupBaseAfter(t, join(dir, "reaper.db"));
  const sessions = [];
  for (const c of clusters) {
    const r = await d.api<Session>("POST", "/v1/sessions", {
      profile: c.profile,
      engine: { pid: c.pg.postmasterPid },
      ports: [c.pg.port],
      paths: [c.pg.base],
    });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    const kind = kinds.find((k) => k.profile === c.profile)?.containment;
    assert.equal(r.body.containment?.kind, kind, `${c.profile}: ${JSON.stringify(r.body.containment)}`);
    sessions.push({ ...c, s: r.body, answers: [] as number[] });
  }
  const registeredAt = Date.now();
  const backends = new Map<string, { backend: BusyBackend; ticks0: number }>();
  for (const x of sessions.filter((x) => x.role === "busy")) {
    const backend = await busyBackend(x.pg);
    backends.set(x.s.id, { backend, ticks0: cpuTicks(backend.pid) ?? 0 });
  }
  const t0 = Date.now();

  // Heartbeats "idle" every second, for 8 s after the registrations.
  while (Date.now() - registeredAt < 8_000) {
    for (const x of sessions) {
      if (x.answers.at(-1) === 409) continue; // fenced: reaped, or being reaped
      x.answers.push((await d.api("POST", `/v1/sessions/${x.s.id}/heartbeat`, { activity: "idle" })).status);
    }
    await sleep(1_000);
  }
  const seconds = (Date.now() - t0) / 1000;
  const now = new Map<string, Session>();
  for (const x of sessions) now.set(x.s.id, (await d.api<Session>("GET", `/v1/sessions/${x.s.id}`)).body);

  for (const x of sessions) {
    const name = `${x.profile}/${x.role}`;
    const cur = now.get(x.s.id) as Session;
    t.diagnostic(
      `${name}: heartbeats ${JSON.stringify(x.answers)}; at 8 s: state ${cur.state} ${cur.reason ?? ""}, lastActivityAt ${cur.lastActivityAt} (${((Date.parse(cur.lastActivityAt ?? "") - registeredAt) / 1000).toFixed(1)} s after the registrations)`,
    );
    if (x.role === "idle") {
      // Reaped for idleness, and nothing of it left.
      const done = await d.reaped(x.s.id, 10_000);
      const end = (await d.api<Session>("GET", `/v1/sessions/${x.s.id}`)).body;
      t.diagnostic(`${name}: ${summary(end)}`);
      assert.equal(done.reason, "idle_timeout", explain([name], end, x.user.uid));
      const found = leftBehind(x.user.uid, [x.pg.port], [x.pg.base]);
      const problems = reportProblems(end, found);
      assert.deepEqual(problems, [], explain([name, ...problems], end, x.user.uid));
      assert.ok(nothingLeft(found), explain([`${name}: something is left`], end, x.user.uid));
    } else {
      // Still live, kept so by its backend's CPU alone.
      const { backend, ticks0 } = backends.get(x.s.id) as { backend: BusyBackend; ticks0: number };
      const cpu = (((cpuTicks(backend.pid) ?? 0) - ticks0) / CLK_TCK / seconds) * 100;
      t.diagnostic(`${name}: the backend's own CPU over the window (/proc): ${cpu.toFixed(0)} % of a core`);
      assert.ok(cpu > 20, `premise: ${name}'s backend used only ${cpu.toFixed(0)} % of a core (a shared host)`);
      assert.equal(cur.state, "live", explain([`${name} is ${cur.state} (${cur.reason})`], cur, x.user.uid));
      assert.ok(procAlive(x.pg.postmaster) && procAlive(backend.id), psOf(x.user.uid));
      assert.ok(
        Date.parse(cur.lastActivityAt ?? "") > Date.parse(x.s.lastActivityAt ?? "") + 4_000,
        `${name}: its activity did not move: registered ${x.s.lastActivityAt}, now ${cur.lastActivityAt}`,
      );
      assert.ok(!x.answers.some((c) => c !== 200), `${name}: heartbeats answered ${JSON.stringify(x.answers)}`);
    }
  }

  // Then the busy ones are closed: nothing of them is left either.
  for (const x of sessions.filter((x) => x.role === "busy")) {
    const name = `${x.profile}/${x.role}`;
    assert.equal((await d.api("DELETE", `/v1/sessions/${x.s.id}`)).status, 202);
    const done = await d.reaped(x.s.id, 30_000);
    const end = (await d.api<Session>("GET", `/v1/sessions/${x.s.id}`)).body;
    t.diagnostic(`${name}: ${summary(end)}`);
    const found = leftBehind(x.user.uid, [x.pg.port], [x.pg.base]);
    const problems = reportProblems(end, found);
    assert.deepEqual(problems, [], explain([name, ...problems], end, x.user.uid));
    assert.ok(nothingLeft(found), explain([`${name}: something is left`], end, x.user.uid));
    assert.equal(done.reason, "closed");
    assert.equal(done.outcome, "clean", explain([name], end, x.user.uid));
  }
});

/**
 * Two clusters of one user (one `postgres` account, several clusters, as on any host): the
 * reap of the first must neither claim nor remove the second's IPC. The second starts after
 * the first's registration, so its /dev/shm segments are owned by the same uid and born during
 * the first's session; the first is closed (a fast shutdown removes its own IPC, so it leaves
 * none). Without `remove_ipc` the other's segments must not be reported as this session's; with
 * it, they must not be unlinked, and the other cluster must still accept connections.
 */
async function twoClustersOneUser(t: TestContext, removeIpc: boolean): Promise<void> {
  const dir = tempDir(t);
  const user = testUser(t);
  const d = await startDaemon(t, testConfig(dir, { profiles: { default: { remove_ipc: removeIpc } } }));
  const a = await startPostgres(t, user, { parent: dir });
  const reg = await d.api<Session>("POST", "/v1/sessions", {
    engine: { pid: a.postmasterPid },
    ports: [a.port],
    paths: [a.base],
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  const id = reg.body.id;
  const mine = new Set(postgresIpcOf(user.uid).files);
  const b = await startPostgres(t, user, { parent: dir });
  removeCgroupBaseAfter(t, join(dir, "reaper.db"));
  assert.equal(await b.psql("SELECT 1"), "1");
  const theirs = postgresIpcOf(user.uid).files.filter((f) => !mine.has(f));
  const mapped = new Set(shmMapped(b.postmasterPid));
  t.diagnostic(
    `/dev/shm of the closed cluster: ${[...mine].join(" ")}; of the other: ${theirs.map((f) => (mapped.has(f) ? `${f} (mapped by its postmaster)` : f)).join(" ")}`,
  );
  assert.ok(theirs.length > 0, "premise: the other cluster has /dev/shm segments of its own");

  assert.equal((await d.api("DELETE", `/v1/sessions/${id}`)).status, 202);
  await d.reaped(id, 30_000);
  const s = (await d.api<Session>("GET", `/v1/sessions/${id}`)).body;
  t.diagnostic(summary(s));
  const ipc = s.steps?.find((x) => x.name === "remove-paths")?.detail.ipc;
  t.diagnostic(`remove-paths ipc: ${JSON.stringify(ipc)}`);
  const problems: string[] = [];
  if (procAlive(a.postmaster)) problems.push("the closed cluster's postmaster still runs");
  for (const f of theirs) {
    if (s.leftovers.some((l) => l.kind === "ipc" && l.item === `posix_shm ${f}`))
      problems.push(`${f}, the other cluster's, is reported as this session's leftover`);
    if (pathGone(f)) problems.push(`${f}, the other cluster's, was removed`);
  }
  if (!procAlive(b.postmaster)) problems.push("the other cluster's postmaster is gone");
  try {
    await b.psql("SELECT 1");
  } catch (err) {
    problems.push(`the other cluster refuses connections now: ${(err as Error).message.trim()}`);
  }
  assert.deepEqual(problems, [], explain(problems, s, user.uid));
}

test("two clusters of one user: closing one does not report the other's /dev/shm as its leftovers", (t) =>
  twoClustersOneUser(t, false));

test("two clusters of one user, remove_ipc: closing one leaves the other's /dev/shm, and the other keeps working", (t) =>
  twoClustersOneUser(t, true));

/**
 * A cluster registered a while after its start (as `POST /v1/sessions` with an existing pid
 * is): its postmaster SIGKILLed, it leaves its SysV segment and its /dev/shm/PostgreSQL.*
 * files. Each must be removed (`remove_ipc`) or reported; an outcome of `clean` with them left
 * is a lie.
 */
test("postmaster registered 2 s after its start, then SIGKILLed, remove_ipc: its /dev/shm segments are removed or reported", async (t) => {
  const dir = tempDir(t);
  const user = testUser(t);
  const d = await startDaemon(t, testConfig(dir, { profiles: { default: { remove_ipc: true } } }));
  const pg = await startPostgres(t, user, { parent: dir });
  removeCgroupBaseAfter(t, join(dir, "reaper.db"));
  await sleep(2_000);
  const reg = await d.api<Session>("POST", "/v1/sessions", {
    engine: { pid: pg.postmasterPid },
    ports: [pg.port],
    paths: [pg.base],
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  const id = reg.body.id;
  const ipc = postgresIpcOf(user.uid);
  t.diagnostic(`PostgreSQL IPC of the user at the SIGKILL: ${JSON.stringify(ipc)}`);
  assert.ok(ipc.files.length > 0 && ipc.shmids.length > 0, "premise: the postmaster has SysV and POSIX segments");
  process.kill(pg.postmasterPid, "SIGKILL");
  const finished = await d.reaped(id, 30_000);
  const s = (await d.api<Session>("GET", `/v1/sessions/${id}`)).body;
  t.diagnostic(summary(s));
  t.diagnostic(`remove-paths ipc: ${JSON.stringify(s.steps?.find((x) => x.name === "remove-paths")?.detail.ipc)}`);
  const found = leftBehind(user.uid, [pg.port], [pg.base]);
  const problems = [...reportProblems(s, found), ...unreportedIpc(s, user.uid, { posix: true })];
  const left = postgresIpcOf(user.uid);
  if (finished.outcome === "clean" && left.files.length + left.shmids.length > 0)
    problems.push(`the outcome is "clean" with ${JSON.stringify(left)} left`);
  assert.deepEqual(problems, [], explain(problems, s, user.uid));
});

test("a templated close hook stops postgres with pg_ctl -m fast: the log shows it, terminate finds nothing, outcome clean", async (t) => {
  const dir = tempDir(t);
  const user = testUser(t);
  const d = await startDaemon(
    t,
    testConfig(dir, {
      profiles: {
        default: {
          close_hook: [join(PG_BIN, "pg_ctl"), "-D", "{label:pgdata}", "-m", "fast", "-w", "stop"],
          grace_period_sec: 10,
          step_timeout_sec: 20,
        },
      },
    }),
  );
  const pg = await startPostgres(t, user, { parent: dir });
  const reg = await d.api<{ id: string }>("POST", "/v1/sessions", {
    engine: { pid: pg.postmasterPid },
    ports: [pg.port],
    labels: { pgdata: pg.dataDir },
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  const id = reg.body.id;
  assert.equal((await d.api("DELETE", `/v1/sessions/${id}`)).status, 202);
  const finished = await d.reaped(id, 60_000);
  const s = (await d.api<Session>("GET", `/v1/sessions/${id}`)).body;
  t.diagnostic(summary(s));
  const close = s.steps?.find((x) => x.name === "close-environment");
  assert.equal(close?.outcome, "ok", JSON.stringify(close?.detail));
  assert.deepEqual((close?.detail as { argv?: string[] }).argv?.slice(1, 3), ["-D", pg.dataDir]);
  const terminate = s.steps?.find((x) => x.name === "terminate")?.detail as { skipped?: string };
  assert.equal(terminate.skipped, "engine already gone", JSON.stringify(terminate));
  // PostgreSQL's own word: a fast shutdown, completed.
  const log = readFileSync(pg.logFile, "utf8");
  assert.match(log, /received fast shutdown request/);
  assert.match(log, /database system is shut down/);
  const found = leftBehind(user.uid, [pg.port], []);
  assert.deepEqual(reportProblems(s, found), [], explain([], s, user.uid));
  assert.ok(nothingLeft(found), explain(["something is left"], s, user.uid));
  assert.equal(finished.outcome, "clean", explain([], s, user.uid));
  // A clean shutdown leaves no shared memory behind (a SIGKILLed postmaster would).
  assert.deepEqual(postgresIpcOf(user.uid).shmids, []);
});
