/**
 * Issue 22: a damaged stored value (bad JSON, JSON of the wrong shape, text in an INTEGER
 * column: nothing SQLite's quick_check sees) is a finding, never a throw. Real SQLite files,
 * damaged by a second connection as a hand edit or a bad copy would.
 */
import BetterSqlite3 from "better-sqlite3";
import assert from "node:assert/strict";
import { join } from "node:path";
import { test } from "node:test";
import type { Damage, Session, StepResult } from "../../src/model/session.js";
import { Store } from "../../src/store/store.js";
import { storedSession, tempDir } from "../helpers.js";

const T0 = Date.UTC(2026, 0, 1);

function openStore(t: { after: (fn: () => void) => void }): { store: Store; damage: (sql: string) => void } {
  const file = join(tempDir(t), "reaper.db");
  const store = new Store(file, T0);
  const editor = new BetterSqlite3(file);
  t.after(() => {
    editor.close();
    store.close();
  });
  return { store, damage: (sql) => void editor.exec(sql) };
}

const session = (id: string, over: Partial<Session> = {}): Session => storedSession(id, over, T0);

/** The (table, column) pairs named, sorted. */
const named = (damage: readonly Damage[]): string[] => damage.map((d) => `${d.table}.${d.column}`).sort();

const step = (name: StepResult["name"]): StepResult => ({
  name,
  outcome: "ok",
  startedAt: T0,
  durationMs: 1,
  detail: { v: 2, processes: [] },
});

test("every stored JSON column damaged: each read names the table, the row and the column, and reads the rest", (t) => {
  const { store, damage } = openStore(t);
  store.insertSession(session("live-1", { ports: [8080], paths: ["/tmp/a"], labels: { team: "data" } }), [
    { pid: 4242, startTime: 123456, bootId: "b", uid: 1000 },
  ]);
  store.insertSession(session("intact"));
  store.insertSession(session("done"));
  store.fence("done", "forced", T0 + 1);
  store.recordStep("done", 0, step("fence"));
  store.recordStep("done", 2, step("terminate"));
  store.finish("done", "clean", [], T0 + 2);
  store.insertEvent({ at: T0, event: "session.registered", sessionId: "done", detail: { profile: "default" } });
  store.insertEvent({ at: T0 + 1, event: "reap.started", sessionId: "done" });

  damage(`UPDATE sessions SET ports = '[80', paths = '{"not":"a list"}', labels = '["team"]',
            containment = '{"kind":"cgroup","path":"/sys/fs', tree = '[{"pid":1'
          WHERE id = 'live-1'`);
  damage(`UPDATE sessions SET leftovers = '[{"step":' WHERE id = 'done'`);
  damage(`UPDATE reap_steps SET detail = '{"v":2,"processes":[' WHERE session_id = 'done' AND name = 'fence'`);
  damage(`UPDATE audit_events SET detail = 'x' WHERE session_id = 'done' AND event = 'session.registered'`);

  const s = store.getSession("live-1");
  assert.ok(s !== undefined);
  assert.deepEqual(named(s.damage), ["sessions.containment", "sessions.labels", "sessions.paths", "sessions.ports"]);
  for (const d of s.damage) assert.deepEqual(d.row, { seq: store.seqOf("live-1"), id: "live-1" });
  assert.match(s.damage.find((d) => d.column === "ports")?.error ?? "", /not valid JSON/);
  assert.match(s.damage.find((d) => d.column === "paths")?.error ?? "", /not a list/);
  // Damaged values read as nothing; the rest of the row as it is.
  assert.deepEqual([s.ports, s.paths, s.labels, s.containment], [[], [], {}, null]);
  assert.deepEqual([s.state, s.engine.pid, s.owner], ["live", 4242, "alice"]);
  assert.deepEqual(store.getSession("intact")?.damage, []);

  const recovered = [...store.liveForRecovery()];
  assert.deepEqual(
    recovered.map((r) => r.id),
    ["live-1", "intact"],
  );
  const r = recovered[0];
  assert.deepEqual(named(r?.damage ?? []), ["sessions.containment", "sessions.tree"]);
  assert.deepEqual([r?.tree, r?.cgroup, r?.engine.pid], [[], null, 4242]);

  const listed = store.list({ limit: 10 });
  assert.deepEqual(
    listed.sessions.map((x) => [x.id, named(x.damage).length]),
    [
      ["live-1", 4],
      ["intact", 0],
      ["done", 1],
    ],
  );
  assert.deepEqual(named(store.sessionsInState("reaped")[0]?.damage ?? []), ["sessions.leftovers"]);

  const steps = store.steps("done");
  assert.deepEqual(
    steps.map((x) => [x.name, x.damage?.column ?? null]),
    [
      ["fence", "detail"],
      ["terminate", null],
    ],
  );
  assert.deepEqual(steps[0]?.damage?.row, { session_id: "done", name: "fence" });
  assert.deepEqual(steps[0]?.detail, {});

  const events = store.events("done");
  assert.equal(events[0]?.detail, null);
  assert.deepEqual(events[0]?.damage?.table, "audit_events");
  assert.deepEqual(events[0]?.damage?.row, { seq: events[0]?.seq });
  assert.deepEqual(events[1]?.damage, undefined);
});

test("a live row whose engine identity cannot be read is a damaged session: listed, filtered and counted as such, and can be fenced", (t) => {
  const { store, damage } = openStore(t);
  store.insertSession(session("q"));
  store.insertSession(session("ok"));
  store.insertSession(session("gone-owner", { ownerPid: { pid: 99, startTime: 1, bootId: "b", uid: 5 } }));
  damage(`UPDATE sessions SET engine_start_time = 'unreadable' WHERE id = 'q'`);
  damage(`UPDATE sessions SET owner_uid = 1.5 WHERE id = 'gone-owner'`);

  const q = store.getSession("q");
  assert.equal(q?.state, "damaged");
  assert.deepEqual(named(q?.damage ?? []), ["sessions.engine_start_time"]);
  // Never an identity a process could match: nothing is ever signalled through it.
  assert.deepEqual([q?.engine.startTime, q?.engine.bootId], [0, ""]);
  // A damaged owner identity is no owner (never reaped as owner_gone on a guess); the engine is intact.
  const o = store.getSession("gone-owner");
  assert.deepEqual([o?.state, o?.ownerPid, named(o?.damage ?? [])], ["live", null, ["sessions.owner_uid"]]);

  const ids = (state: Session["state"]): string[] => store.list({ state, limit: 10 }).sessions.map((s) => s.id);
  assert.deepEqual(ids("damaged"), ["q"]);
  assert.deepEqual(ids("live"), ["ok", "gone-owner"]);
  assert.deepEqual(store.counts(), { live: 2, reaping: 0, reaped: 0, damaged: 1 });
  assert.deepEqual(
    store.unfinishedByProfile().sort((a, b) => a.state.localeCompare(b.state)),
    [
      { state: "damaged", profile: "default", n: 1 },
      { state: "live", profile: "default", n: 2 },
    ],
  );

  // An operator's force-reap fences it; the kept counts follow (checked against a recount).
  assert.equal(store.fence("q", "forced", T0 + 5), true);
  assert.deepEqual(store.counts(), { live: 2, reaping: 1, reaped: 0 });
  assert.equal(store.getSession("q")?.state, "reaping");
});

test("a start on a lineage-tracked session with a damaged containment downgrades its tracking instead of failing", (t) => {
  const { store, damage } = openStore(t);
  store.insertSession(
    session("lin", { tracking: "lineage", containment: { kind: "cgroup", path: "/sys/fs/cgroup/x", made: true } }),
  );
  damage(`UPDATE sessions SET containment = '{"kind":"cgroup","pa' WHERE id = 'lin'`);
  assert.equal(store.downgradeTracking(), 1);
  assert.equal(store.getSession("lin")?.tracking, "snapshots");
});
