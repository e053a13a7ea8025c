import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { addLine, newTrail, renderReport, verifyTrail, type VerifyReport } from "../../src/cli/audit-verify.js";
import { sleeper, startDaemon, startEngine, tempDir, testConfig } from "../helpers.js";
import { ctl } from "./ctl.js";

/**
 * A real trail: four sessions registered; one closed, one force-reaped, one reaped as
 * engine_gone (with files, so "path deleted" and "signal sent" lines are in it too), one
 * left live. Log level info, so the operational lines are there to be skipped.
 */
async function realTrail(t: TestContext) {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir, { log: { level: "info" } }));
  const engine = await startEngine(t, [], join(dir, "engine"));
  await d.api("POST", "/v1/sessions", { id: "closed-1", engine: { pid: engine.pid }, paths: [engine.dir] });
  await d.api("POST", "/v1/sessions", { id: "forced-1", engine: { pid: sleeper(t).pid } });
  const short = sleeper(t, "sleep", ["0.3"]);
  await d.api("POST", "/v1/sessions", { id: "gone-1", engine: { pid: short.pid } });
  await d.api("POST", "/v1/sessions", { id: "live-1", engine: { pid: sleeper(t).pid } });
  await d.api("DELETE", "/v1/sessions/closed-1");
  await d.api("POST", "/v1/sessions/forced-1/reap");
  for (const id of ["closed-1", "forced-1", "gone-1"]) await d.reaped(id);
  return {
    dir,
    d,
    lines: d.lines
      .join("")
      .split("\n")
      .filter((l) => l !== ""),
  };
}

function write(dir: string, name: string, lines: string[]): string {
  const file = join(dir, name);
  writeFileSync(file, lines.join("\n") + "\n");
  return file;
}

function report(stdout: string): VerifyReport {
  return JSON.parse(stdout) as VerifyReport;
}

test("audit verify: a complete trail from a real daemon, from a file and from stdin", async (t) => {
  const { dir, d, lines } = await realTrail(t);
  const file = write(dir, "audit.log", lines);

  const r = await ctl(["audit", "verify", file, "--socket", d.socket]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /^sessions seen\s+4$/m);
  assert.match(r.stdout, /^reaped\s+3$/m);
  assert.match(r.stdout, /^still live\s+1$/m);
  assert.match(r.stdout, /^missing reap\.finished\s+0$/m);
  assert.match(r.stdout, /^daemon\s+4 sessions cross-checked with the daemon/m);
  assert.match(r.stdout, /^result\s+complete$/m);

  // journalctl -o cat -u session-reaper | reaperctl audit verify
  const piped = await ctl(["audit", "verify", "--json", "--socket", d.socket], {}, lines.join("\n") + "\n");
  assert.equal(piped.code, 0, piped.stderr);
  const rep = report(piped.stdout);
  assert.equal(rep.complete, true);
  assert.equal(rep.source, "stdin");
  assert.deepEqual(rep.sessions, { seen: 4, live: 1, reaped: 3, missing: 0 });
  assert.ok(rep.nonAudit > 0, "operational lines (signal sent, path deleted) were skipped");
  assert.deepEqual(rep.daemon, { status: "checked", socket: d.socket, sessions: 4 });

  // journalctl's default format prefixes each line: still verified.
  const prefixed = write(
    dir,
    "journal.txt",
    lines.map((l) => `Nov 22 06:46:41 host node[42]: ${l}`),
  );
  assert.equal((await ctl(["audit", "verify", prefixed, "--offline"])).code, 0);

  // `npm start > reaper.log`: npm's banner before the daemon's lines is not the daemon's.
  const npm = write(dir, "npm-start.log", [
    "",
    "> session-reaper@0.1.0 start",
    "> node dist/src/main.js",
    "",
    ...lines,
  ]);
  const fromNpm = await ctl(["audit", "verify", npm, "--offline", "--json"]);
  assert.equal(fromNpm.code, 0, fromNpm.stdout);
  assert.deepEqual(report(fromNpm.stdout).malformed, []);

  // The daemon is not running: the log alone is verified, and that is no error.
  const alone = await ctl(["audit", "verify", file, "--socket", join(dir, "absent.sock")]);
  assert.equal(alone.code, 0, alone.stdout);
  assert.match(
    alone.stdout,
    /^daemon\s+not cross-checked: cannot reach the daemon at .*; the log was verified alone$/m,
  );
});

test("audit verify: a session whose reap.finished line is missing", async (t) => {
  const { dir, d, lines } = await realTrail(t);
  const isFinish = (l: string): boolean =>
    l.includes('"event":"reap.finished"') && l.includes('"sessionId":"closed-1"');
  assert.equal(lines.filter(isFinish).length, 1);
  const file = write(
    dir,
    "cut.log",
    lines.filter((l) => !isFinish(l)),
  );

  const offline = await ctl(["audit", "verify", file, "--offline"]);
  assert.equal(offline.code, 5, offline.stdout + offline.stderr);
  assert.match(offline.stdout, /^missing reap\.finished\s+1$/m);
  assert.match(offline.stdout, /^result\s+INCOMPLETE$/m);
  assert.match(offline.stdout, /^Sessions that left live without reap\.finished:$/m);
  assert.match(offline.stdout, /^closed-1\s+closed\s+reap\.step\s+\d+\s+not checked$/m);

  // The daemon still holds the reap.finished: the session did finish, the log lost a line.
  const checked = await ctl(["audit", "verify", file, "--json", "--socket", d.socket]);
  assert.equal(checked.code, 5);
  const rep = report(checked.stdout);
  assert.deepEqual(rep.missing, []);
  assert.deepEqual(rep.mismatches, [
    { sessionId: "closed-1", detail: "the log lacks the reap.finished the daemon holds" },
  ]);

  // A log from another daemon (another database): its sessions are unknown here.
  const other = await startDaemon(t, testConfig(tempDir(t)));
  const foreign = report(
    (await ctl(["audit", "verify", write(dir, "all.log", lines), "--json", "--socket", other.socket])).stdout,
  );
  assert.equal(foreign.complete, false);
  assert.deepEqual(foreign.mismatches.map((m) => m.sessionId).sort(), ["closed-1", "forced-1", "gone-1"]);
});

test("audit verify: garbage, unknown events and operational lines", async (t) => {
  const { dir, lines } = await realTrail(t);
  const long = "x".repeat(200);
  const file = write(dir, "garbage.log", [
    lines[0]!,
    "this is not json",
    '{"level":"info","audit":true,"event":"reap.fin',
    '{"level":"info","audit":true,"event":"session.teleported","sessionId":"closed-1"}',
    '{"level":"info","msg":"signal sent","pid":4242}',
    '{"level":"info","audit":true,"msg":"an audit line without its event"}',
    '{"level":"info","audit":true,"event":"reap.step"}',
    "[1,2,3]",
    long,
    "",
    ...lines.slice(1),
  ]);
  const r = await ctl(["audit", "verify", file, "--offline", "--json"]);
  assert.equal(r.code, 5, r.stderr);
  const rep = report(r.stdout);
  assert.deepEqual(
    rep.malformed.map((m) => m.line),
    [2, 3, 6, 7, 8, 9],
  );
  assert.equal(rep.malformed.find((m) => m.line === 9)?.text, "x".repeat(80));
  assert.deepEqual(rep.unknown, [{ line: 4, event: "session.teleported", sessionId: "closed-1" }]);
  assert.deepEqual(rep.missing, []);
  assert.deepEqual(rep.sessions, { seen: 4, live: 1, reaped: 3, missing: 0 });

  const human = await ctl(["audit", "verify", file, "--offline"]);
  assert.equal(human.code, 5);
  assert.match(human.stdout, /^malformed lines\s+6$/m);
  assert.match(human.stdout, /^unknown events\s+1$/m);
  assert.match(human.stdout, /^2\s+this is not json$/m);
  assert.match(human.stdout, /^4\s+session\.teleported\s+closed-1$/m);
});

test("audit verify: usage and unreadable input", async (t) => {
  const dir = tempDir(t);
  const missing = await ctl(["audit", "verify", join(dir, "nope.log"), "--offline"]);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /^reaperctl: cannot read .*nope\.log: ENOENT/);
  assert.equal((await ctl(["audit", "verify", "a", "b"])).code, 2);
  assert.equal((await ctl(["audit"])).code, 2);
  assert.equal((await ctl(["audit", "check"])).code, 2);
  // An empty trail proves nothing is missing.
  const empty = await ctl(["audit", "verify", "-", "--offline"], {}, "");
  assert.equal(empty.code, 0);
});

test("a clean verified by less than the session's containment allowed is listed (not counted against complete)", () => {
  const trail = newTrail();
  const line = (o: Record<string, unknown>): void => addLine(trail, JSON.stringify({ audit: true, ...o }));
  const reap = (id: string, contained: boolean | null, verified: string[] | undefined): void => {
    line({
      event: "session.registered",
      sessionId: id,
      detail: contained === null ? {} : { containment: contained ? { kind: "cgroup" } : { kind: "none" } },
    });
    line({ event: "session.closed", sessionId: id, reason: "closed" });
    line({
      event: "reap.finished",
      sessionId: id,
      outcome: "clean",
      detail: verified === undefined ? {} : { verified },
    });
  };
  const all = ["tree", "cookie", "ports", "paths", "ipc"];
  reap("contained-full", true, ["cgroup", ...all]);
  reap("contained-no-cgroup", true, all);
  reap("uncontained-full", false, all);
  reap("old-line", null, undefined);
  const r = verifyTrail(trail, "test", { status: "skipped" }, new Map());
  assert.equal(r.complete, true);
  assert.deepEqual(r.weaklyVerified, [
    { sessionId: "contained-no-cgroup", verified: all, missing: ["cgroup"] },
    { sessionId: "old-line", verified: null, missing: all },
  ]);
  assert.match(renderReport(r), /clean, weakly verified\s+2/);
  assert.match(renderReport(r), /^contained-no-cgroup\s+tree,cookie,ports,paths,ipc\s+cgroup$/m);
});

test("the audit lines a daemon.lines_dropped names count as written; unnamed ones leave the trail incomplete", () => {
  const trailOf = (unnamed: number): VerifyReport => {
    const trail = newTrail();
    const line = (o: Record<string, unknown>): void => addLine(trail, JSON.stringify({ audit: true, ...o }));
    line({ event: "session.registered", sessionId: "s1" });
    line({ event: "session.expired", sessionId: "s1", reason: "heartbeat_timeout" });
    // The disk filled: the reap's last lines and s2's whole trail were dropped, then named.
    line({
      event: "daemon.lines_dropped",
      detail: {
        lines: 6,
        auditLines: 4 + unnamed,
        events: [
          { event: "reap.finished", sessionId: "s1" },
          { event: "session.registered", sessionId: "s2" },
          { event: "session.closed", sessionId: "s2" },
          { event: "reap.finished", sessionId: "s2" },
        ],
        unnamed,
        error: "ENOSPC",
        from: "2026-12-01T00:00:00.000Z",
        to: "2026-12-01T00:00:01.000Z",
      },
    });
    line({ event: "daemon.lines_dropped", detail: { lines: "many" } });
    return verifyTrail(trail, "test", { status: "skipped" }, new Map());
  };
  const named = trailOf(0);
  assert.deepEqual(named.sessions, { seen: 2, live: 0, reaped: 2, missing: 0 });
  assert.deepEqual(named.droppedLines, { records: 1, lines: 6, auditLines: 4, unnamed: 0 });
  assert.deepEqual(
    named.malformed.map((m) => m.line),
    [4],
    "a daemon.lines_dropped of another shape is malformed",
  );
  assert.match(
    renderReport(named),
    /^dropped lines\s+6 \(log full; 4 audit lines named by 1 daemon\.lines_dropped\)$/m,
  );

  const unnamed = trailOf(2);
  assert.equal(unnamed.complete, false);
  assert.deepEqual(unnamed.sessions, { seen: 2, live: 0, reaped: 2, missing: 0 });
  assert.match(
    renderReport(unnamed),
    /6 \(log full; 6 audit lines named by 1 daemon\.lines_dropped, 2 of them UNNAMED\)/,
  );
  assert.match(renderReport(unnamed), /2 audit lines were dropped with no name kept/);
});

test("audit verify: clean reaps tracked by snapshots only are listed, and the exit code stays as it was", async (t) => {
  const dir = tempDir(t);
  // Started before the daemon, uncontained: tracked by walks of /proc only ("snapshots").
  const before = ["snap-1", "snap-2", "snap-3"].map((id) => ({ id, pid: sleeper(t).pid }));
  const d = await startDaemon(
    t,
    testConfig(dir, { log: { level: "info" }, profiles: { default: { containment: "none" } } }),
  );
  // Born after the daemon: lineage where the host gives it, else snapshots too.
  const sessions = [...before, { id: "late-1", pid: sleeper(t).pid }];
  for (const { id, pid } of sessions) {
    assert.equal((await d.api("POST", "/v1/sessions", { id, engine: { pid } })).status, 201);
  }
  for (const { id } of sessions) await d.api("POST", `/v1/sessions/${id}/reap`);
  for (const { id } of sessions) await d.reaped(id);
  const api = new Map<string, { tracking: string; outcome: string }>();
  for (const { id } of sessions) {
    api.set(id, (await d.api<{ tracking: string; outcome: string }>("GET", `/v1/sessions/${id}`)).body);
  }
  for (const { id } of before) {
    assert.equal(api.get(id)?.tracking, "snapshots", id);
    assert.equal(api.get(id)?.outcome, "clean", id);
  }

  const lines = d.lines
    .join("")
    .split("\n")
    .filter((l) => l !== "");
  // snap-3's reap.finished as a build from before tracking wrote it: no detail.tracking.
  const isFinish = (l: string, id: string): boolean =>
    l.includes('"event":"reap.finished"') && l.includes(`"sessionId":"${id}"`);
  const older = lines.map((l) => {
    if (!isFinish(l, "snap-3")) return l;
    const rec = JSON.parse(l) as { detail: { tracking?: string } };
    assert.equal(rec.detail.tracking, "snapshots");
    delete rec.detail.tracking;
    return JSON.stringify(rec);
  });
  const file = write(dir, "audit.log", older);
  const snapshots = sessions
    .map((s) => s.id)
    .filter((id) => id !== "snap-3" && api.get(id)?.tracking === "snapshots" && api.get(id)?.outcome === "clean");
  assert.ok(snapshots.includes("snap-1") && snapshots.includes("snap-2"));

  const human = await ctl(["audit", "verify", file, "--socket", d.socket]);
  assert.equal(human.code, 0, human.stdout + human.stderr);
  assert.match(human.stdout, /^result\s+complete$/m);
  assert.match(human.stdout, new RegExp(`^clean, snapshots only\\s+${snapshots.length}$`, "m"));
  assert.match(human.stdout, /^clean, tracking unknown\s+1 \(reap\.finished from an older build, without tracking\)$/m);
  assert.match(
    human.stdout,
    new RegExp(
      `^Clean, but tracked by snapshots only: ${snapshots.length}\\. Their clean is only as good as walks of /proc:\\n` +
        "a process born and re-parented between two walks, carrying no cookie, could have been missed\\.\\n" +
        `  ${snapshots.join(", ")}\\n`,
      "m",
    ),
  );

  const json = await ctl(["audit", "verify", file, "--json", "--socket", d.socket]);
  assert.equal(json.code, 0, json.stderr);
  const rep = report(json.stdout);
  assert.equal(rep.complete, true);
  assert.deepEqual(rep.snapshotsOnlyCleanReaps, { count: snapshots.length, sessions: snapshots });
  assert.deepEqual(rep.trackingUnknownCleanReaps, { count: 1, sessions: ["snap-3"] });

  // A trail with a reap.finished missing still exits 5, snapshots or not.
  const cut = write(
    dir,
    "cut.log",
    older.filter((l) => !isFinish(l, "late-1")),
  );
  const incomplete = await ctl(["audit", "verify", cut, "--offline", "--json"]);
  assert.equal(incomplete.code, 5, incomplete.stdout);
  assert.deepEqual(
    report(incomplete.stdout).snapshotsOnlyCleanReaps.sessions,
    snapshots.filter((id) => id !== "late-1"),
  );
});

test("audit verify: the human report names the first 20 snapshots-only clean reaps, then how many more", async (t) => {
  const dir = tempDir(t);
  const lines: string[] = [];
  const reap = (id: string, outcome: string, tracking?: string): void => {
    lines.push(JSON.stringify({ level: 30, audit: true, event: "session.registered", sessionId: id, detail: {} }));
    lines.push(JSON.stringify({ level: 30, audit: true, event: "reap.started", sessionId: id, reason: "forced" }));
    lines.push(
      JSON.stringify({
        level: 30,
        audit: true,
        event: "reap.finished",
        sessionId: id,
        reason: "forced",
        outcome,
        detail: { verified: ["tree", "cookie", "ports", "paths", "ipc"], ...(tracking ? { tracking } : {}) },
      }),
    );
  };
  const ids = Array.from({ length: 23 }, (_, i) => `session-${String(i + 1).padStart(2, "0")}`);
  for (const id of ids) reap(id, "clean", "snapshots");
  reap("partial-snap", "partial", "snapshots"); // not clean: not listed
  reap("cgroup-1", "clean", "cgroup");
  reap("lineage-1", "clean", "lineage");
  reap("old-1", "clean");
  const file = write(dir, "many.log", lines);

  const human = await ctl(["audit", "verify", file, "--offline"]);
  assert.equal(human.code, 0, human.stdout + human.stderr);
  assert.match(human.stdout, /^clean, snapshots only\s+23$/m);
  assert.match(human.stdout, /^clean, tracking unknown\s+1 /m);
  const section = human.stdout.slice(human.stdout.indexOf("Clean, but tracked by snapshots only: 23."));
  const listed = [...section.matchAll(/session-\d\d/g)].map((m) => m[0]);
  assert.deepEqual(listed, ids.slice(0, 20));
  assert.match(section, /^ {2}and 3 more \(--json lists them all\)$/m);
  for (const l of section.split("\n")) assert.ok(l.length <= 100, l);
  assert.doesNotMatch(human.stdout, /partial-snap|cgroup-1|lineage-1/);

  const rep = report((await ctl(["audit", "verify", file, "--offline", "--json"])).stdout);
  assert.deepEqual(rep.snapshotsOnlyCleanReaps, { count: 23, sessions: ids });
  assert.deepEqual(rep.trackingUnknownCleanReaps, { count: 1, sessions: ["old-1"] });

  // Nothing snapshots-only: no section, a zero in the summary.
  const none = await ctl(["audit", "verify", write(dir, "none.log", lines.slice(-9)), "--offline"]);
  assert.equal(none.code, 0);
  assert.match(none.stdout, /^clean, snapshots only\s+0$/m);
  assert.match(none.stdout, /^clean, tracking unknown\s+1 /m);
  assert.doesNotMatch(none.stdout, /tracked by snapshots only/);
});
