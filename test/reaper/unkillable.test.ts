/**
 * When a kill does not finish (docs/how-a-session-ends.md): a real process tree frozen by the
 * cgroup v1 freezer takes its SIGKILL into uninterruptible sleep (state D, the kill pending,
 * as a task stuck on a hung NFS server would). The reap ends `partial` with `unkillable`
 * leftovers that say why (state, wchan, kernel stack, cgroups, before the kill and after the
 * wait), and the profile's unkillable hook runs. Once the tree is thawed it dies at once, and
 * the daemon, watching by pidfd, resolves the reap: the session's cgroup removed, its port and
 * path steps run again, the host verified, `reap.resolved`, outcome clean. The watch survives
 * a restart of the daemon, whether the tree dies while it is down or after it is back.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import type { RecordedAuditEvent } from "../../src/audit/audit.js";
import { addLine, newTrail, verifyTrail } from "../../src/cli/audit-verify.js";
import type { Leftover } from "../../src/model/session.js";
import { ENGINE, isGone, portFree, startDaemon, tempDir, testConfig, until, type TestDaemon } from "../helpers.js";

const FREEZER = "/sys/fs/cgroup/freezer";

type Step = { name: string; outcome: string; detail: Record<string, unknown> };
type SessionJson = {
  state: string;
  outcome: string;
  leftovers: Leftover[];
  steps: Step[];
  containment: { kind: string; path?: string; made?: boolean } | null;
};

interface Freezer {
  /** The cgroup's path below the freezer hierarchy ("/sr-…"), as /proc/<pid>/cgroup names it. */
  readonly name: string;
  add(pid: number): void;
  freeze(): Promise<void>;
  thaw(): void;
}

/** The pids in a v1 cgroup (none once it is removed). */
function tasks(dir: string): number[] {
  try {
    return readFileSync(join(dir, "cgroup.procs"), "latin1").split("\n").filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

/**
 * A cgroup of the host's v1 freezer for this test alone: thawed, its processes killed and the
 * cgroup removed when the test ends, pass or fail (a frozen process cannot die, not even of
 * SIGKILL, until it is thawed). Without the freezer the test fails, saying so: it cannot be
 * run another way.
 */
function freezerCgroup(t: TestContext, what: string): Freezer {
  assert.ok(
    existsSync(join(FREEZER, "cgroup.procs")),
    `this test needs the cgroup v1 freezer hierarchy mounted at ${FREEZER} (a hybrid cgroup setup, run as root): ` +
      "without it no process can be held in uninterruptible sleep on purpose, and the test cannot run",
  );
  const name = `/sr-${what}-${process.pid}-${randomBytes(3).toString("hex")}`;
  const dir = join(FREEZER, name);
  const state = join(dir, "freezer.state");
  mkdirSync(dir);
  t.after(async () => {
    try {
      writeFileSync(state, "THAWED");
    } catch {
      // removed already
    }
    for (const pid of tasks(dir)) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // gone
      }
    }
    await until(() => tasks(dir).length === 0, 15_000, `${dir} emptied`).catch(() => undefined);
    try {
      rmdirSync(dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") t.diagnostic(`${dir} not removed: ${String(err)}`);
    }
  });
  return {
    name,
    add: (pid) => writeFileSync(join(dir, "cgroup.procs"), String(pid)),
    freeze: async () => {
      writeFileSync(state, "FROZEN");
      // FREEZING until every task has stopped in the refrigerator.
      await until(() => readFileSync(state, "latin1").trim() === "FROZEN", 15_000, `${dir} frozen`);
    },
    thaw: () => writeFileSync(state, "THAWED"),
  };
}

interface FrozenEngine {
  id: string;
  /** The engine and its child. */
  pids: number[];
  port: number;
  dir: string;
}

/**
 * The engine fixture with one child, both working in `dir` (their cwd: the path is in use
 * while they live) and the engine listening on a port; registered with that port and path,
 * then frozen.
 */
async function frozenEngine(
  t: TestContext,
  d: TestDaemon,
  fz: Freezer,
  id: string,
  dir: string,
): Promise<FrozenEngine> {
  mkdirSync(dir);
  const child = spawn(process.execPath, [ENGINE, "--fork", "1"], {
    cwd: dir,
    detached: true,
    stdio: ["ignore", "pipe", "inherit"],
  });
  const ready = await new Promise<{ pid: number; port: number; children: number[] }>((resolve, reject) => {
    let out = "";
    child.stdout.setEncoding("utf8").on("data", (s: string) => {
      out += s;
      if (out.includes("\n")) resolve(JSON.parse(out.slice(0, out.indexOf("\n"))) as never);
    });
    child.once("exit", (code) => reject(new Error(`engine exited early with ${code}`)));
  });
  const pids = [ready.pid, ...ready.children];
  t.after(() => {
    for (const pid of pids) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // gone
      }
    }
  });
  const reg = await d.api("POST", "/v1/sessions", {
    id,
    engine: { pid: ready.pid },
    ports: [ready.port],
    paths: [dir],
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  for (const pid of pids) fz.add(pid);
  await fz.freeze();
  return { id, pids, port: ready.port, dir };
}

const session = async (d: TestDaemon, id: string): Promise<SessionJson> =>
  (await d.api<SessionJson>("GET", `/v1/sessions/${id}`)).body;

const step = (s: SessionJson, name: string): Step => {
  const found = s.steps.find((x) => x.name === name);
  assert.ok(found, `no step ${name}`);
  return found;
};

/** The gauge, as a scrape reads it. */
async function unkillableGauge(d: TestDaemon): Promise<number> {
  const { body } = await d.daemon.metrics.exposition();
  const m = /^session_reaper_unkillable_processes (\d+)$/m.exec(body);
  assert.ok(m, "session_reaper_unkillable_processes is exported");
  return Number(m[1]);
}

const resolvedEvent = (d: TestDaemon, id: string, timeoutMs = 30_000): Promise<RecordedAuditEvent> =>
  d.waitFor((e) => e.event === "reap.resolved" && e.sessionId === id, timeoutMs);

/** Force-reaps the frozen engine's session: partial, its two processes unkillable. */
async function reapFrozen(d: TestDaemon, e: FrozenEngine): Promise<SessionJson> {
  assert.equal((await d.api("POST", `/v1/sessions/${e.id}/reap`)).status, 202);
  const finished = await d.reaped(e.id, 60_000);
  assert.equal(finished.outcome, "partial");
  const s = await session(d, e.id);
  assert.equal(s.outcome, "partial");
  const unkillable = s.leftovers.filter((l) => l.kind === "unkillable");
  assert.deepEqual(
    unkillable.map((l) => l.pid).sort(),
    [...e.pids].sort(),
    `the engine and its child are unkillable: ${JSON.stringify(s.leftovers)}`,
  );
  for (const pid of e.pids) assert.ok(!isGone(pid), `pid ${pid} still lives (frozen)`);
  return s;
}

/** After the resolution: clean, nothing of the tree alive (by /proc), the port free, the path gone. */
async function assertResolvedClean(d: TestDaemon, e: FrozenEngine, resolved: RecordedAuditEvent): Promise<void> {
  assert.equal(resolved.outcome, "clean", JSON.stringify(resolved.detail));
  const detail = resolved.detail as {
    previousOutcome: string;
    leftovers: unknown[];
    unkillable: { pid: number }[];
    rerun: { step: string; outcome: string }[];
    cgroup?: { removed: boolean };
    verified: string[];
  };
  assert.equal(detail.previousOutcome, "partial");
  assert.deepEqual(detail.leftovers, []);
  assert.deepEqual(detail.unkillable.map((u) => u.pid).sort(), [...e.pids].sort());
  assert.deepEqual(detail.rerun, [
    { step: "release-connections-and-ports", outcome: "ok" },
    { step: "remove-paths", outcome: "ok" },
  ]);
  for (const check of ["tree", "cookie", "ports", "paths"]) assert.ok(detail.verified.includes(check), check);
  const s = await session(d, e.id);
  assert.equal(s.state, "reaped");
  assert.equal(s.outcome, "clean");
  assert.deepEqual(s.leftovers, []);
  for (const name of ["release-connections-and-ports", "remove-paths"]) {
    assert.equal(step(s, name).outcome, "ok", name);
    assert.equal(typeof step(s, name).detail.resolution, "number", `${name} is the resolution's run`);
  }
  // What terminate found stays on record.
  assert.equal(step(s, "terminate").detail.unkillable, e.pids.length);
  if (s.containment?.kind === "cgroup" && s.containment.made === true) {
    assert.equal(detail.cgroup?.removed, true);
    assert.ok(!existsSync(s.containment.path as string), "the session's cgroup is removed");
  }
  for (const pid of e.pids) assert.ok(isGone(pid), `pid ${pid} is gone from /proc`);
  assert.ok(await portFree(e.port), `port ${e.port} is free`);
  assert.ok(!existsSync(e.dir), `${e.dir} is removed`);
}

test(
  "a tree frozen in uninterruptible sleep ends partial with evidence and the hook's report; thawed, its reap is resolved clean",
  { timeout: 180_000 },
  async (t) => {
    const dir = tempDir(t);
    const fz = freezerCgroup(t, "main");
    const hookOut = join(dir, "unkillable-hook.out");
    const d = await startDaemon(
      t,
      testConfig(dir, {
        profiles: {
          default: {
            unkillable_timeout_sec: 1,
            unkillable_hook: ["sh", "-c", 'printf "%s %s\\n" "$1" "$2" >> "$3"', "sh", "{id}", "{pids}", hookOut],
          },
        },
      }),
    );
    const e = await frozenEngine(t, d, fz, "frozen-main", join(dir, "engine"));
    const s = await reapFrozen(d, e);

    // Each unkillable leftover says why, read before the kill and after the wait.
    for (const l of s.leftovers.filter((x) => x.kind === "unkillable")) {
      assert.equal(l.step, "terminate");
      assert.equal(typeof l.startTime, "number");
      const ev = l.evidence;
      assert.ok(ev, `evidence for pid ${l.pid}`);
      assert.equal(ev.after.state, "D", `state D after the wait: ${JSON.stringify(ev.after)}`);
      assert.ok(typeof ev.after.wchan === "string" && ev.after.wchan !== "", `wchan: ${ev.after.wchan}`);
      assert.ok(ev.after.stack !== null && ev.after.stack.length > 0, "a kernel stack (root reads it)");
      assert.ok(ev.after.stack.length <= 16, "the stack is cut to its innermost frames");
      assert.ok(typeof ev.after.syscall === "string", "the current system call");
      assert.ok(
        ev.after.cgroups.some((c) => c.endsWith(`:freezer:${fz.name}`)),
        `the freezer cgroup is named: ${ev.after.cgroups.join(" | ")}`,
      );
      assert.ok(ev.before !== null, "read before the kill too");
      assert.equal(ev.before.state, "D", "frozen before the kill already");
      assert.ok(ev.before.cgroups.some((c) => c.endsWith(`:freezer:${fz.name}`)));
      assert.ok(ev.before.at <= ev.after.at && ev.stateSince <= ev.after.at);
      // In D since the reading before the kill, and the wait after it was unkillable_timeout_sec.
      assert.equal(ev.stateSince, ev.before.at);
      assert.ok(ev.inStateSec >= 0.9 && ev.sinceKillSec >= 1, JSON.stringify(ev));
      assert.match(l.detail, /still alive .* after SIGKILL: state D/);
      t.diagnostic(
        `pid ${l.pid}: state ${ev.after.state}, wchan ${ev.after.wchan}, syscall ${ev.after.syscall?.split(" ")[0]}, ` +
          `${ev.after.stack.length} frames (top ${ev.after.stack[0]}), in D ${ev.inStateSec} s, ${ev.sinceKillSec} s after SIGKILL`,
      );
    }
    // Not listed twice: the verification's finding of the same processes is the unkillable leftover.
    const processLeftovers = s.leftovers.filter((l) => l.kind === "process" && e.pids.includes(Number(l.item)));
    assert.deepEqual(processLeftovers, []);
    // Their port and path are still held: those steps did not complete.
    assert.equal(step(s, "release-connections-and-ports").outcome, "failed");
    assert.equal(step(s, "remove-paths").outcome, "failed");
    assert.ok(existsSync(e.dir));

    // The hook ran once, with the session and the pids, and its report is journaled.
    const term = step(s, "terminate");
    assert.equal(term.outcome, "failed");
    assert.equal(term.detail.unkillable, 2);
    assert.equal((term.detail.unkillableHook as { outcome: string }).outcome, "ok", JSON.stringify(term.detail));
    const [line, ...more] = readFileSync(hookOut, "utf8").trim().split("\n");
    assert.deepEqual(more, [], "the hook ran once");
    const [hookId, hookPids] = (line as string).split(" ");
    assert.equal(hookId, e.id);
    assert.deepEqual((hookPids as string).split(",").map(Number).sort(), [...e.pids].sort());

    assert.equal(await unkillableGauge(d), 2);

    // Thawed: the pending SIGKILL ends them at once, and the watch resolves the reap.
    fz.thaw();
    const thawedAt = Date.now();
    const resolved = await resolvedEvent(d, e.id);
    t.diagnostic(
      `reap.resolved ${resolved.at - thawedAt} ms after the thaw (${resolved.durationMs} ms after the reap's end)`,
    );
    await assertResolvedClean(d, e, resolved);
    assert.equal(await unkillableGauge(d), 0);

    // reaperctl audit verify, on the daemon's own lines: complete, and the clean is backed.
    const trail = newTrail();
    for (const l of d.lines) addLine(trail, l);
    const report = verifyTrail(trail, "test", { status: "skipped" }, new Map());
    assert.equal(report.complete, true, JSON.stringify(report));
    assert.deepEqual(report.unknown, []);
    assert.ok(!report.weaklyVerified.some((w) => w.sessionId === e.id), JSON.stringify(report.weaklyVerified));
    assert.equal(trail.sessions.get(e.id)?.outcome, "clean");
  },
);

test(
  "the watch survives a restart: a tree that died while the daemon was down resolves at start, one thawed later when it dies",
  { timeout: 240_000 },
  async (t) => {
    const dir = tempDir(t);
    const fzA = freezerCgroup(t, "down");
    const fzB = freezerCgroup(t, "after");
    const config = testConfig(dir, { profiles: { default: { unkillable_timeout_sec: 1 } } });
    const first = await startDaemon(t, config);
    const a = await frozenEngine(t, first, fzA, "frozen-a", join(dir, "a"));
    const b = await frozenEngine(t, first, fzB, "frozen-b", join(dir, "b"));
    await Promise.all([reapFrozen(first, a), reapFrozen(first, b)]);
    assert.equal(await unkillableGauge(first), 4);
    await first.stop();

    // While no daemon runs, A's tree is thawed and dies unwatched.
    fzA.thaw();
    await until(() => a.pids.every(isGone), 15_000, "A's tree gone");

    const second = await startDaemon(t, config);
    const started = await second.waitFor((e) => e.event === "daemon.started");
    // Both reaps are found by the store; only B's processes are still there to watch.
    assert.deepEqual((started.detail as { unkillable: unknown }).unkillable, { sessions: 2, processes: 2 });
    await assertResolvedClean(second, a, await resolvedEvent(second, a.id));
    assert.equal(await unkillableGauge(second), 2);
    for (const pid of b.pids) assert.ok(!isGone(pid), `B's pid ${pid} is still frozen`);
    assert.ok(
      !(await second.api<{ events: { event: string }[] }>("GET", `/v1/sessions/${b.id}/events`)).body.events.some(
        (e) => e.event === "reap.resolved",
      ),
      "B is not resolved while its processes live",
    );

    // B's tree is thawed with the new daemon watching.
    fzB.thaw();
    await assertResolvedClean(second, b, await resolvedEvent(second, b.id));
    assert.equal(await unkillableGauge(second), 0);
    // Each reap was resolved once, by one daemon or the other.
    for (const id of [a.id, b.id]) {
      const events = (await second.api<{ events: { event: string }[] }>("GET", `/v1/sessions/${id}/events`)).body
        .events;
      assert.equal(events.filter((e) => e.event === "reap.resolved").length, 1, id);
      assert.equal(events.filter((e) => e.event === "reap.finished").length, 1, id);
    }
  },
);
