/**
 * Issue 22: a damaged row (a JSON column cut short, a hand edit, a value of the wrong type:
 * nothing SQLite's quick_check sees) is a finding, never a crash. A real reaperd on a real
 * unix socket; the rows damaged with the sqlite3 CLI, while the daemon runs or between two runs.
 */
import BetterSqlite3 from "better-sqlite3";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { callApi } from "../../src/client/transport.js";
import { FakeClock } from "../../src/clock.js";
import type { OrphanJson } from "../../src/http/present.js";
import { ctl } from "../cli/ctl.js";
import {
  isGone,
  sleeper,
  spawnDaemon,
  startDaemon,
  tempDir,
  testConfig,
  until,
  writeDaemonConfig,
} from "../helpers.js";
import { auditLines, metric, register } from "./lib.js";

type Damage = { table: string; row: Record<string, string | number>; column: string; error: string };
type Step = { name: string; outcome: string; detail: Record<string, unknown>; damage?: Damage };
type Session = {
  id: string;
  state: string;
  reason: string | null;
  outcome: string | null;
  ports: number[];
  paths: string[];
  labels: Record<string, string>;
  containment: { kind: string } | null;
  leftovers: { kind: string; item: string }[];
  damage: Damage[];
  steps?: Step[];
};

const profile = (dir: string): string => `[profiles.default]
allowed_roots = ["${dir}"]
grace_period_sec = 0.5
step_timeout_sec = 5
`;

/** An edit of the database by the sqlite3 CLI (a second process, as an operator's would be). */
function sql(db: string, statement: string): void {
  const r = spawnSync("sqlite3", ["-cmd", ".timeout 5000", db, statement], { encoding: "utf8" });
  assert.equal(r.status, 0, `sqlite3: ${r.stderr}`);
}

const get = async (socket: string, id: string): Promise<Session> =>
  (await callApi<Session>(socket, "GET", `/v1/sessions/${id}`)).body;

const columns = (damage: readonly Damage[] | undefined): string[] =>
  (damage ?? []).map((d) => `${d.table}.${d.column}`).sort();

async function reaped(socket: string, id: string): Promise<Session> {
  await until(async () => (await get(socket, id)).state === "reaped", 20_000, `session ${id} reaped`);
  return get(socket, id);
}

test("bad JSON in a live session's containment and tree: reaperd starts, names the damage, keeps watching the engine and serves every other session", async (t) => {
  const dir = tempDir(t);
  const { file, socket, db } = writeDaemonConfig(dir, profile(dir));
  const first = await spawnDaemon(t, file, socket);
  const bad = sleeper(t, "sleep", ["120"]);
  const ok = sleeper(t, "sleep", ["120"]);
  assert.equal((await register(socket, "bad", bad.pid)).status, 201);
  assert.equal((await register(socket, "ok", ok.pid)).status, 201);
  first.proc.kill("SIGTERM");
  assert.equal(await first.exit, 0);
  sql(db, `UPDATE sessions SET containment = '{"kind":"cgroup","path":"/sys/fs', tree = '[{"pid":1' WHERE id = 'bad'`);

  // Before issue 22: exit 70 ("Unterminated string in JSON", or "malformed JSON"), a crash loop.
  const second = await spawnDaemon(t, file, socket);
  const s = await get(socket, "bad");
  assert.equal(s.state, "live", "its engine is identified: watched as usual");
  assert.deepEqual(columns(s.damage), ["sessions.containment"], "GET names what it reads of the row");
  const event = auditLines(second.output()).find((e) => e.event === "session.damaged" && e.sessionId === "bad");
  assert.ok(event, `a session.damaged event; output: ${second.output().slice(-1500)}`);
  assert.equal(event.detail?.action, "watched");
  assert.deepEqual(columns(event.detail?.damage as Damage[]), ["sessions.containment", "sessions.tree"]);
  for (const d of event.detail?.damage as Damage[]) {
    assert.equal(d.row.id, "bad");
    assert.equal(typeof d.row.seq, "number");
  }
  assert.match(second.output(), /a stored value cannot be read: sessions\.tree of the row seq \d+, id \\"bad\\"/);
  assert.equal(await metric(socket, "session_reaper_store_damage_total"), 2);

  // Every other session is served as before; the damaged one still takes heartbeats.
  assert.deepEqual(columns((await get(socket, "ok")).damage), []);
  const list = await callApi<{ sessions: Session[] }>(socket, "GET", "/v1/sessions");
  assert.deepEqual([list.status, list.body.sessions.map((x) => x.id)], [200, ["bad", "ok"]]);
  for (const id of ["bad", "ok"]) {
    assert.equal((await callApi(socket, "POST", `/v1/sessions/${id}/heartbeat`)).status, 200);
  }

  // Its engine is still watched: its death is seen, and the reap ends, never clean.
  bad.kill("SIGKILL");
  const end = await reaped(socket, "bad");
  assert.deepEqual([end.reason, end.outcome], ["engine_gone", "partial"]);
  const finished = auditLines(second.output()).find((e) => e.event === "reap.finished" && e.sessionId === "bad");
  assert.deepEqual(columns(finished?.detail?.damage as Damage[]), ["sessions.containment"]);
  assert.equal((await get(socket, "ok")).state, "live");
});

test("bad JSON in ports, labels and paths: GET and list answer with what is readable, PATCH is refused, a force-reap ends with the engine gone and no path deleted", async (t) => {
  const dir = tempDir(t);
  const { file, socket, db } = writeDaemonConfig(dir, profile(dir));
  const daemon = await spawnDaemon(t, file, socket);
  const kept = join(dir, "scratch");
  mkdirSync(kept);
  const bad = sleeper(t, "sleep", ["120"]);
  const ok = sleeper(t, "sleep", ["120"]);
  const reg = await register(socket, "bad", bad.pid, { paths: [kept], labels: { team: "data" } });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  assert.equal((await register(socket, "ok", ok.pid)).status, 201);
  sql(db, `UPDATE sessions SET ports = '[40', labels = '{"team":', paths = '["/tm' WHERE id = 'bad'`);

  // Before issue 22: 400 SR_INVALID_JSON, as if the caller had sent bad JSON.
  const one = await callApi<Session>(socket, "GET", "/v1/sessions/bad");
  assert.equal(one.status, 200, JSON.stringify(one.body));
  assert.deepEqual(columns(one.body.damage), ["sessions.labels", "sessions.paths", "sessions.ports"]);
  assert.deepEqual([one.body.ports, one.body.paths, one.body.labels], [[], [], {}]);
  const list = await callApi<{ sessions: Session[] }>(socket, "GET", "/v1/sessions");
  assert.deepEqual([list.status, list.body.sessions.map((x) => x.id)], [200, ["bad", "ok"]]);

  // An update would rewrite the damaged values whole (and forget the paths): refused.
  const patch = await callApi<{ error: { code: string } }>(socket, "PATCH", "/v1/sessions/bad", {
    labels: { more: "x" },
  });
  assert.deepEqual([patch.status, patch.body.error.code], [409, "SR_SESSION_DAMAGED"]);

  // Before issue 22: "reap pipeline crashed", reaping forever, the engine alive.
  assert.equal((await callApi(socket, "POST", "/v1/sessions/bad/reap")).status, 202);
  const end = await reaped(socket, "bad");
  assert.equal(end.outcome, "partial");
  await until(() => isGone(bad.pid), 5_000, "engine terminated");
  assert.ok(existsSync(kept), "a path the session may have registered is never deleted unseen");
  const removePaths = end.steps?.find((x) => x.name === "remove-paths");
  assert.equal(removePaths?.outcome, "failed");
  assert.match(String(removePaths?.detail.unreadable), /sessions\.paths .*none was deleted/);
  const release = end.steps?.find((x) => x.name === "release-connections-and-ports");
  assert.equal(release?.outcome, "failed");
  assert.match(String(release?.detail.unreadable), /sessions\.ports .*none was verified free/);
  const finished = auditLines(daemon.output()).find((e) => e.event === "reap.finished" && e.sessionId === "bad");
  assert.deepEqual(columns(finished?.detail?.damage as Damage[]), [
    "sessions.labels",
    "sessions.paths",
    "sessions.ports",
  ]);
  assert.ok(!/"reap pipeline crashed"/.test(daemon.output()));

  assert.equal((await get(socket, "ok")).state, "live");
  assert.equal((await callApi(socket, "POST", "/v1/sessions/ok/heartbeat")).status, 200);
});

test("an engine identity that cannot be read: the session is damaged, nothing is signalled, list and audit verify name it, and a force-reap ends it failed", async (t) => {
  const dir = tempDir(t);
  const { file, socket, db } = writeDaemonConfig(dir, profile(dir));
  const first = await spawnDaemon(t, file, socket);
  const engine = sleeper(t, "sleep", ["120"]);
  assert.equal((await register(socket, "q", engine.pid)).status, 201);
  first.proc.kill("SIGTERM");
  assert.equal(await first.exit, 0);
  sql(db, `UPDATE sessions SET engine_start_time = 'unreadable' WHERE id = 'q'`);

  const second = await spawnDaemon(t, file, socket);
  const s = await get(socket, "q");
  // Before issue 22: its engine "gone" (a start time that matches nothing), reaped at start,
  // and killed with its cgroup.
  assert.equal(s.state, "damaged");
  assert.deepEqual(columns(s.damage), ["sessions.engine_start_time"]);
  assert.ok(!isGone(engine.pid), "nothing is signalled for an engine that cannot be identified");
  const hb = await callApi<{ error: { code: string } }>(socket, "POST", "/v1/sessions/q/heartbeat");
  assert.deepEqual([hb.status, hb.body.error.code], [409, "SR_SESSION_DAMAGED"]);
  const byState = async (state: string): Promise<string[]> =>
    (await callApi<{ sessions: Session[] }>(socket, "GET", `/v1/sessions?state=${state}`)).body.sessions.map(
      (x) => x.id,
    );
  assert.deepEqual([await byState("damaged"), await byState("live")], [["q"], []]);
  const counts = (await callApi<{ counts: Record<string, number> }>(socket, "GET", "/v1/daemon")).body.counts;
  assert.equal(counts.damaged, 1);
  const event = auditLines(second.output()).find((e) => e.event === "session.damaged" && e.sessionId === "q");
  assert.equal(event?.detail?.action, "quarantined");

  // The trail says a session left live for an operator, and which.
  const trail = second.output();
  const verify = await ctl(["--socket", socket, "audit", "verify", "-"], {}, trail);
  assert.equal(verify.code, 5, verify.stdout + verify.stderr);
  assert.match(verify.stdout, /q +sessions\.engine_start_time +unidentified: quarantined +no/);

  // The operator's force-reap ends it: nothing run, signalled or deleted; what is alive is listed.
  assert.equal((await callApi(socket, "POST", "/v1/sessions/q/reap")).status, 202);
  const end = await reaped(socket, "q");
  assert.equal(end.outcome, "failed");
  for (const name of ["close-environment", "terminate", "release-connections-and-ports", "remove-paths"]) {
    const x = end.steps?.find((y) => y.name === name);
    assert.equal(x?.outcome, "failed", name);
    assert.match(String(x?.detail.notRun), /engine cannot be identified .*engine_start_time/, name);
  }
  assert.ok(!isGone(engine.pid), "still never signalled");
  if (end.containment?.kind === "cgroup") {
    assert.ok(
      end.leftovers.some((l) => l.kind === "process" && l.item === String(engine.pid)),
      `the engine, found in the session's cgroup, is a leftover: ${JSON.stringify(end.leftovers)}`,
    );
  }
  const after = await ctl(["--socket", socket, "audit", "verify", "-"], {}, second.output());
  assert.equal(after.code, 0, after.stdout + after.stderr);
});

test("a reap resumed on a damaged journal record: the step runs again, the reap ends, and the damaged audit detail is served", async (t) => {
  const dir = tempDir(t);
  const { file, socket, db } = writeDaemonConfig(dir, profile(dir));
  const first = await spawnDaemon(t, file, socket, { REAPER_FAILPOINTS: "after-fence" });
  const engine = sleeper(t, "sleep", ["120"]);
  assert.equal((await register(socket, "j", engine.pid)).status, 201);
  // The daemon dies (SIGKILL) right after the fence, inside this request.
  await callApi(socket, "POST", "/v1/sessions/j/reap").catch(() => undefined);
  assert.equal(await first.exit, null);
  sql(db, `UPDATE reap_steps SET detail = '{"v":2,"processes":[' WHERE session_id = 'j' AND name = 'fence'`);
  sql(db, `UPDATE audit_events SET detail = '{"profile":' WHERE session_id = 'j' AND event = 'session.registered'`);

  // Before issue 22: "reap pipeline crashed" at every start, reaping forever.
  const second = await spawnDaemon(t, file, socket);
  const end = await reaped(socket, "j");
  await until(() => isGone(engine.pid), 5_000, "engine terminated");
  assert.equal(end.outcome, "partial");
  const fence = end.steps?.find((x) => x.name === "fence");
  assert.deepEqual(
    [fence?.damage?.table, fence?.damage?.column, fence?.damage?.row],
    ["reap_steps", "detail", { session_id: "j", name: "fence" }],
  );
  const finished = auditLines(second.output()).find((e) => e.event === "reap.finished" && e.sessionId === "j");
  assert.deepEqual(columns(finished?.detail?.damage as Damage[]), ["reap_steps.detail"]);

  const events = await callApi<{ events: { event: string; detail: unknown; damage?: Damage }[] }>(
    socket,
    "GET",
    "/v1/sessions/j/events",
  );
  assert.equal(events.status, 200, JSON.stringify(events.body));
  const registered = events.body.events.find((e) => e.event === "session.registered");
  assert.deepEqual([registered?.detail, registered?.damage?.table], [null, "audit_events"]);
});

test("a live session whose paths cannot be read: the orphan sweep in reap mode finds its directory unclaimed, and deletes nothing", async (t) => {
  const dir = tempDir(t);
  const mine = join(dir, "engines", "mine");
  mkdirSync(mine, { recursive: true });
  const config = testConfig(dir, {
    orphans: { schedule: "0 0 1 1 *" }, // swept by hand below (and once at start)
    profiles: {
      default: {
        heartbeat_timeout_sec: 3600, // the fake clock moves past min_age_sec, not past this
        orphans: { mode: "reap", uids: [0], min_age_sec: 60, paths: [join(dir, "engines", "*")] },
      },
    },
  });
  const clock = new FakeClock(Date.now());
  const d = await startDaemon(t, config, clock);
  const engine = sleeper(t, "sleep", ["120"]);
  const reg = await d.api("POST", "/v1/sessions", { id: "holder", engine: { pid: engine.pid }, paths: [mine] });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  const editor = new BetterSqlite3(config.store.path);
  t.after(() => editor.close());
  editor.exec(`UPDATE sessions SET paths = '["/tm' WHERE id = 'holder'`);

  clock.advance(65_000); // the directory is now older than min_age_sec
  // Before issue 22: every pass fails ("Unexpected end of JSON input"); read as "no paths", the
  // session's directory would look unclaimed and be deleted.
  d.daemon.orphans.sweep();
  const found = (await d.api<{ findings: OrphanJson[] }>("GET", "/v1/orphans")).body.findings;
  assert.deepEqual(
    found.map((f) => [f.kind, f.path, f.adopted]),
    [["path", mine, false]],
  );
  assert.match(String(found[0]?.detail), /^not reaped: session holder's stored row is damaged \(sessions\.paths/);
  assert.ok(existsSync(mine));
  assert.equal((await d.api<{ state: string }>("GET", "/v1/sessions/holder")).body.state, "live");
});
