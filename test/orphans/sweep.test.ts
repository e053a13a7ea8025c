import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chownSync, existsSync, mkdirSync, symlinkSync, utimesSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import BetterSqlite3 from "better-sqlite3";
import { FakeClock } from "../../src/clock.js";
import type { OrphanJson } from "../../src/http/present.js";
import { readUid } from "../../src/proc/stat.js";
import {
  isGone,
  portFree,
  sleeper,
  startDaemon,
  startEngine,
  tempDir,
  testConfig,
  until,
  type TestDaemon,
} from "../helpers.js";

const MIN_AGE_SEC = 60;
/** Past the matcher's age: the fake clock moves, the processes and files stay as they are. */
const OLD_MS = (MIN_AGE_SEC + 5) * 1000;
const PYTHON = execFileSync("python3", ["-c", "import sys; sys.stdout.write(sys.executable)"], { encoding: "utf8" });

/** A marker only this test's engines carry in their command line (other tests run alongside). */
const newTag = (): string => randomBytes(6).toString("hex");

/**
 * The default profile recognises engines by the node binary and the tag, root's only, and
 * temp dirs below `dir/engines/`. The schedule is once a year: the tests sweep by hand (and
 * the daemon sweeps once at start).
 */
function orphanConfig(dir: string, tag: string, orphans: Record<string, unknown> = {}) {
  return testConfig(dir, {
    orphans: { schedule: "0 0 1 1 *" },
    profiles: {
      default: {
        heartbeat_timeout_sec: 3600,
        orphans: {
          mode: "report",
          exe: process.execPath,
          cmdline: `--tag ${tag}( |$)`,
          uids: [0],
          min_age_sec: MIN_AGE_SEC,
          paths: [join(dir, "engines", "*")],
          ...orphans,
        },
      },
    },
  });
}

async function findings(d: TestDaemon): Promise<OrphanJson[]> {
  const res = await d.api<{ enabled: boolean; sweptAt: string | null; findings: OrphanJson[] }>("GET", "/v1/orphans");
  assert.equal(res.status, 200);
  assert.equal(res.body.enabled, true);
  assert.notEqual(res.body.sweptAt, null);
  return res.body.findings;
}

/** The orphan.found lines the daemon wrote. */
function orphanLines(d: TestDaemon): { sessionId?: string; detail: Record<string, unknown> }[] {
  return d.lines
    .map((l) => JSON.parse(l) as { event?: string; sessionId?: string; detail: Record<string, unknown> })
    .filter((l) => l.event === "orphan.found");
}

function only<T>(list: readonly T[], pred: (x: T) => boolean, what: string): T {
  const hits = list.filter(pred);
  assert.equal(hits.length, 1, `${what}: ${JSON.stringify(list)}`);
  return hits[0] as T;
}

test("report mode: an engine started but never registered and its temp dir are found once; nothing is signalled or deleted", async (t) => {
  const dir = tempDir(t);
  const tag = newTag();
  const temp = join(dir, "engines", "e1");
  const engine = await startEngine(t, ["--tag", tag, "--fork", "1"], temp, { detached: true });
  const clock = new FakeClock(Date.now());
  const d = await startDaemon(t, orphanConfig(dir, tag), clock);

  // The start-up sweep (after recovery) ran and left everything this young alone.
  assert.deepEqual(await findings(d), []);

  clock.advance(OLD_MS);
  d.daemon.orphans.sweep();
  const found = await findings(d);
  assert.equal(found.length, 2, JSON.stringify(found));
  const proc = only(found, (f) => f.kind === "process", "one process finding");
  assert.equal(proc.pid, engine.pid);
  assert.equal(proc.profile, "default");
  assert.equal(proc.action, "report");
  assert.equal(proc.adopted, false);
  assert.equal(proc.uid, 0);
  assert.equal(proc.exe, process.execPath);
  assert.match(proc.cmdline ?? "", new RegExp(`--tag ${tag}`));
  assert.ok(proc.ageSec >= MIN_AGE_SEC, String(proc.ageSec));
  assert.match(proc.sessionId, /^orphan-[0-9a-f]{8}-\d+-\d+$/);
  // Its forked child matches too, but goes with it: one finding, whose tree reap would end.
  assert.deepEqual([...proc.processes].sort(), [engine.pid, ...engine.children].sort());
  assert.ok(proc.ports.includes(engine.port), `ports ${proc.ports.join(",")}`);
  const path = only(found, (f) => f.kind === "path", "one path finding");
  assert.equal(path.path, temp);
  assert.equal(path.action, "report");
  assert.match(path.sessionId, /^orphan-path-[0-9a-f]{16}$/);

  // One orphan.found per finding, concerning no session.
  const lines = orphanLines(d);
  assert.equal(lines.length, 2);
  assert.ok(lines.every((l) => l.sessionId === undefined));
  assert.deepEqual(lines.map((l) => l.detail.kind).sort(), ["path", "process"]);
  assert.equal(lines.find((l) => l.detail.kind === "process")?.detail.pid, engine.pid);

  // Still present at the next sweep: listed, not reported again.
  clock.advance(60_000);
  d.daemon.orphans.sweep();
  const again = await findings(d);
  assert.deepEqual(again.map((f) => [f.kind, f.firstSeenAt]).sort(), found.map((f) => [f.kind, f.firstSeenAt]).sort());
  assert.equal(orphanLines(d).length, 2);

  for (const pid of [engine.pid, ...engine.children]) assert.ok(!isGone(pid), `process ${pid} was signalled`);
  assert.ok(existsSync(join(temp, "engine.log")) && existsSync(join(temp, "nested/deeper/spill.bin")));
  const metrics = await d.api<string>("GET", "/metrics");
  assert.match(metrics.body, /session_reaper_orphans_found_total\{[^}]*kind="process"[^}]*\} 1\n/);
  assert.match(metrics.body, /session_reaper_orphans_found_total\{[^}]*kind="path"[^}]*\} 1\n/);
  assert.match(metrics.body, /session_reaper_orphans\{[^}]*kind="process"[^}]*\} 1\n/);
  assert.deepEqual((await d.api<{ sessions: unknown[] }>("GET", "/v1/sessions")).body.sessions, []);

  // The engine crashes: its finding disappears; its temp dir stays a finding, not re-reported.
  process.kill(-engine.pid, "SIGKILL");
  await until(() => [engine.pid, ...engine.children].every(isGone), 10_000, "engine gone");
  d.daemon.orphans.sweep();
  const left = await findings(d);
  assert.deepEqual(
    left.map((f) => f.kind),
    ["path"],
  );
  assert.equal(orphanLines(d).length, 2);
});

test("reap mode: an unregistered engine and its temp dir become sessions reaped as orphaned by the one pipeline", async (t) => {
  const dir = tempDir(t);
  const tag = newTag();
  const temp = join(dir, "engines", "e2");
  const engine = await startEngine(t, ["--tag", tag, "--fork", "1"], temp, { detached: true });
  const clock = new FakeClock(Date.now());
  const d = await startDaemon(t, orphanConfig(dir, tag, { mode: "reap" }), clock);
  clock.advance(OLD_MS);
  d.daemon.orphans.sweep();

  const found = await findings(d);
  const proc = only(found, (f) => f.kind === "process", "one process finding");
  const path = only(found, (f) => f.kind === "path", "one path finding");
  assert.equal(proc.action, "reap");
  assert.equal(proc.adopted, true);
  assert.equal(path.adopted, true);

  const finished = await d.reaped(proc.sessionId);
  assert.equal(finished.reason, "orphaned");
  assert.equal(finished.outcome, "clean", JSON.stringify(finished.detail));
  assert.equal((await d.reaped(path.sessionId)).outcome, "clean");
  for (const pid of [engine.pid, ...engine.children]) assert.ok(isGone(pid), `process ${pid} still running`);
  assert.ok(await portFree(engine.port), `port ${engine.port} still taken`);
  assert.ok(!existsSync(temp), `${temp} still exists`);

  type SessionJson = {
    state: string;
    reason: string;
    engine: { pid: number };
    ports: number[];
    paths: string[];
    labels: Record<string, string>;
    steps: { name: string; outcome: string; detail: Record<string, unknown> }[];
  };
  const s = (await d.api<SessionJson>("GET", `/v1/sessions/${proc.sessionId}`)).body;
  assert.equal(s.state, "reaped");
  assert.equal(s.reason, "orphaned");
  assert.equal(s.engine.pid, engine.pid);
  assert.ok(s.ports.includes(engine.port));
  assert.deepEqual(s.labels, { orphan: "process" });
  assert.deepEqual(
    s.steps.map((x) => [x.name, x.outcome]),
    [
      ["fence", "ok"],
      ["close-environment", "ok"],
      ["terminate", "ok"],
      ["release-connections-and-ports", "ok"],
      ["remove-paths", "ok"],
      ["finish", "ok"],
    ],
  );
  const events = await d.api<{ events: { event: string; reason: string | null }[] }>(
    "GET",
    `/v1/sessions/${proc.sessionId}/events`,
  );
  assert.deepEqual(
    events.body.events.map((e) => e.event),
    ["orphan.found", "session.expired", "reap.started", ...Array<string>(5).fill("reap.step"), "reap.finished"],
  );
  assert.equal(events.body.events[1]?.reason, "orphaned");

  // The leftover dir's session has no engine process: those steps found it already gone.
  const p = (await d.api<SessionJson>("GET", `/v1/sessions/${path.sessionId}`)).body;
  assert.equal(p.engine.pid, 0);
  assert.deepEqual(p.paths, [temp]);
  assert.equal(p.steps.find((x) => x.name === "terminate")?.detail.skipped, "engine already gone");
  assert.deepEqual(p.steps.find((x) => x.name === "remove-paths")?.detail.paths, [{ path: temp, status: "removed" }]);

  // Both went through the audit trail with their session; the next sweep finds nothing.
  assert.deepEqual(
    orphanLines(d)
      .map((l) => l.sessionId)
      .sort(),
    [proc.sessionId, path.sessionId].sort(),
  );
  d.daemon.orphans.sweep();
  assert.deepEqual(await findings(d), []);
});

test("a session deleted from the table while its engine lives is found by the start-up sweep", async (t) => {
  const dir = tempDir(t);
  const tag = newTag();
  const engine = await startEngine(t, ["--tag", tag, "--fork", "1"], undefined, { detached: true });
  const config = orphanConfig(dir, tag, { paths: [] });
  const clock = new FakeClock(Date.now());
  const first = await startDaemon(t, config, clock);
  const reg = await first.api("POST", "/v1/sessions", { id: "lost", engine: { pid: engine.pid } });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  clock.advance(OLD_MS);
  assert.deepEqual(first.daemon.orphans.sweep(), [], "a live session's engine and its tree are claimed");
  await first.stop();

  const db = new BetterSqlite3(config.store.path);
  assert.equal(db.prepare("DELETE FROM sessions WHERE id = 'lost'").run().changes, 1);
  db.close();

  // (In process, not over HTTP: the client's keep-alive pool may still hold a connection to
  // the first daemon's socket.)
  const second = await startDaemon(t, config, new FakeClock(Date.now() + OLD_MS));
  const found = second.daemon.orphans.current().findings;
  const proc = only(found, (f) => f.kind === "process", "the lost engine");
  assert.equal(proc.pid, engine.pid);
  assert.equal(proc.action, "report");
  assert.equal(orphanLines(second).length, 1);
  assert.ok(!isGone(engine.pid));
});

test("a temp dir left by a crashed engine is reaped; claimed, younger, other uids' and symlinked paths are left alone", async (t) => {
  const dir = tempDir(t);
  const tag = newTag();
  const engines = join(dir, "engines");
  const crashed = join(engines, "crashed");
  const engine = await startEngine(t, ["--tag", tag], crashed);
  process.kill(engine.pid, "SIGKILL");
  await engine.exited;

  const claimed = join(engines, "claimed"); // a live session's path
  const holder = join(engines, "holder"); // holds a live session's path
  const young = join(engines, "young");
  const nobody = join(engines, "nobody");
  const link = join(engines, "link");
  for (const p of [claimed, join(holder, "inner"), young, nobody]) mkdirSync(p, { recursive: true });
  writeFileSync(join(claimed, "spill"), "x"); // below a claimed path
  chownSync(nobody, 65534, 65534);
  symlinkSync(tempDir(t), link);

  const config = orphanConfig(dir, tag, { mode: "reap", paths: [join(engines, "*"), join(claimed, "*")] });
  const clock = new FakeClock(Date.now());
  const d = await startDaemon(t, config, clock);
  const owner = sleeper(t);
  const reg = await d.api("POST", "/v1/sessions", {
    id: "holds-paths",
    engine: { pid: owner.pid },
    paths: [claimed, join(holder, "inner")],
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  clock.advance(OLD_MS);
  utimesSync(young, clock.now() / 1000, clock.now() / 1000);
  d.daemon.orphans.sweep();

  const found = await findings(d);
  assert.deepEqual(
    found.map((f) => [f.kind, f.path, f.adopted]),
    [["path", crashed, true]],
  );
  const finished = await d.reaped(only(found, () => true, "crashed").sessionId);
  assert.equal(finished.reason, "orphaned");
  assert.equal(finished.outcome, "clean", JSON.stringify(finished.detail));
  assert.ok(!existsSync(crashed));
  for (const p of [join(claimed, "spill"), join(holder, "inner"), young, nobody, link]) assert.ok(existsSync(p), p);
  assert.equal((await d.api<{ state: string }>("GET", "/v1/sessions/holds-paths")).body.state, "live");
});

test("a matching process younger than min_age_sec is left alone, and found once it is old enough", async (t) => {
  const dir = tempDir(t);
  const tag = newTag();
  const engine = await startEngine(t, ["--tag", tag], undefined, { detached: true });
  const clock = new FakeClock(Date.now());
  const d = await startDaemon(t, orphanConfig(dir, tag, { mode: "reap", paths: [] }), clock);
  clock.advance((MIN_AGE_SEC / 2) * 1000);
  d.daemon.orphans.sweep();
  assert.deepEqual(await findings(d), []);
  assert.equal(orphanLines(d).length, 0);
  assert.ok(!isGone(engine.pid), "a young process was signalled");
  assert.deepEqual((await d.api<{ sessions: unknown[] }>("GET", "/v1/sessions")).body.sessions, []);

  clock.advance(OLD_MS);
  d.daemon.orphans.sweep();
  const proc = only(await findings(d), (f) => f.kind === "process", "now old enough");
  assert.equal((await d.reaped(proc.sessionId)).reason, "orphaned");
  assert.ok(isGone(engine.pid));
});

test("a matching process of a uid the profile does not list is left alone", async (t) => {
  const dir = tempDir(t);
  const tag = newTag();
  const other = await startEngine(t, ["--tag", tag], undefined, { detached: true, uid: 65534 });
  const mine = await startEngine(t, ["--tag", tag], undefined, { detached: true });
  assert.equal(readUid(other.pid), 65534);
  const clock = new FakeClock(Date.now());
  const d = await startDaemon(t, orphanConfig(dir, tag, { mode: "reap", uids: [0], paths: [] }), clock);
  clock.advance(OLD_MS);
  d.daemon.orphans.sweep();

  const found = await findings(d);
  const proc = only(found, (f) => f.kind === "process", "root's engine only");
  assert.equal(proc.pid, mine.pid);
  await d.reaped(proc.sessionId);
  assert.ok(isGone(mine.pid));
  assert.ok(!isGone(other.pid), "another uid's process was signalled");
  assert.ok(!orphanLines(d).some((l) => l.detail.pid === other.pid));
});

test("a live session whose engine now runs as another uid is an identity_mismatch finding, reported and left live", async (t) => {
  const dir = tempDir(t);
  // Registered as root, then drops to nobody when told (SIGUSR1).
  const script = [
    "import os, signal, sys",
    "signal.signal(signal.SIGUSR1, lambda *a: (os.setgid(65534), os.setuid(65534)))",
    "print('ready', flush=True)",
    "while True: signal.pause()",
  ].join("\n");
  const engine = spawn(PYTHON, ["-c", script], { stdio: ["ignore", "pipe", "inherit"] });
  t.after(() => void engine.kill("SIGKILL"));
  await new Promise((r) => engine.stdout.once("data", r));
  const pid = engine.pid as number;

  const clock = new FakeClock(Date.now());
  const d = await startDaemon(t, orphanConfig(dir, newTag(), { mode: "reap", paths: [] }), clock);
  assert.equal((await d.api("POST", "/v1/sessions", { id: "setuid", engine: { pid } })).status, 201);
  d.daemon.orphans.sweep();
  assert.deepEqual(await findings(d), []);

  process.kill(pid, "SIGUSR1");
  await until(() => readUid(pid) === 65534, 5000, "engine dropped to uid 65534");
  d.daemon.orphans.sweep();
  const mismatch = only(await findings(d), () => true, "one finding");
  assert.equal(mismatch.kind, "identity_mismatch");
  assert.equal(mismatch.sessionId, "setuid");
  assert.equal(mismatch.action, "report"); // the sweep never acts on a registered session
  assert.equal(mismatch.pid, pid);
  assert.equal(mismatch.uid, 65534);
  assert.match(mismatch.detail ?? "", /registered as uid 0 and now runs as uid 65534/);
  assert.equal(orphanLines(d).length, 1);
  assert.equal((await d.api<{ state: string }>("GET", "/v1/sessions/setuid")).body.state, "live");
  assert.ok(!isGone(pid));
});
