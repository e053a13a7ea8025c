import assert from "node:assert/strict";
import { join } from "node:path";
import { test } from "node:test";
import { JOURNAL_VERSION, olderRecord } from "../../src/cleanup/journal.js";
import { ReaperError } from "../../src/errors.js";
import { type Leftover, type Session, type StepResult } from "../../src/model/session.js";
import { Store } from "../../src/store/store.js";
import { storedSession, tempDir } from "../helpers.js";

const T0 = Date.UTC(2026, 0, 1);
const BOOT = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

function openStore(t: { after: (fn: () => void) => void }): { store: Store; file: string } {
  const file = join(tempDir(t), "state", "reaper.db"); // the Store creates missing parent dirs
  const store = new Store(file, T0);
  t.after(() => store.close());
  return { store, file };
}

const session = (id: string, over: Partial<Session> = {}): Session => storedSession(id, over, T0);

function assertCode(code: string): (err: unknown) => boolean {
  return (err: unknown) => {
    assert.ok(err instanceof ReaperError, `expected a ReaperError, got ${String(err)}`);
    assert.equal(err.code, code);
    return true;
  };
}

test("a session round-trips through insertSession/getSession", (t) => {
  const { store } = openStore(t);
  const full = session("s-full", {
    profile: "gpu",
    owner: "bob",
    engine: { pid: 777, startTime: 9_876_543, bootId: BOOT, uid: 1001 },
    ownerPid: { pid: 555, startTime: 42, bootId: BOOT, uid: 1002 },
    ports: [8080, 40123],
    paths: ["/tmp/a", "/tmp/b c/ü"],
    labels: { team: "data", "with space": "yes" },
    heartbeatTimeoutSec: 5,
    idleTimeoutSec: 60,
    maxLifetimeSec: 7200,
    createdAt: T0 + 1,
    lastHeartbeatAt: T0 + 2,
    lastActivityAt: T0 + 3,
    deadline: T0 + 5002,
  });
  store.insertSession(full);
  assert.deepEqual(store.getSession("s-full"), full);

  const bare = session("s-bare", { owner: null });
  store.insertSession(bare);
  assert.deepEqual(store.getSession("s-bare"), bare);

  assert.equal(store.getSession("nope"), undefined);
  assert.equal(store.seqOf("nope"), undefined);
  assert.ok((store.seqOf("s-bare") as number) > (store.seqOf("s-full") as number));
});

test("data survives closing and reopening the file", (t) => {
  const dir = tempDir(t);
  const file = join(dir, "r.db");
  const a = new Store(file, T0);
  a.insertSession(session("persist", { ports: [1234] }));
  a.close();
  a.close(); // idempotent
  const b = new Store(file, T0);
  t.after(() => b.close());
  assert.deepEqual(b.getSession("persist"), session("persist", { ports: [1234] }));
});

test("a duplicate id is SR_SESSION_EXISTS and leaves the first session untouched", (t) => {
  const { store } = openStore(t);
  store.insertSession(session("dup", { owner: "first" }));
  assert.throws(() => store.insertSession(session("dup", { owner: "second" })), assertCode("SR_SESSION_EXISTS"));
  assert.equal(store.getSession("dup")?.owner, "first");
  assert.equal(store.counts().live, 1);
});

test("the fence moves live -> reaping exactly once", (t) => {
  const { store } = openStore(t);
  store.insertSession(session("f"));
  assert.equal(store.fence("f", "heartbeat_timeout", T0 + 100), true);
  const fenced = store.getSession("f");
  assert.equal(fenced?.state, "reaping");
  assert.equal(fenced?.reason, "heartbeat_timeout");
  assert.equal(fenced?.reapStartedAt, T0 + 100);
  assert.equal(fenced?.deadline, null);

  // A second fence (another reason racing in) changes nothing.
  assert.equal(store.fence("f", "forced", T0 + 200), false);
  assert.equal(store.getSession("f")?.reason, "heartbeat_timeout");
  assert.equal(store.getSession("f")?.reapStartedAt, T0 + 100);

  assert.equal(store.fence("unknown", "forced", T0), false);
});

test("finish only moves reaping -> reaped, once", (t) => {
  const { store } = openStore(t);
  store.insertSession(session("live-one"));
  assert.equal(store.finish("live-one", "clean", [], T0), false, "finished a live session");
  assert.equal(store.getSession("live-one")?.state, "live");

  store.fence("live-one", "closed", T0 + 1);
  const leftovers: Leftover[] = [{ step: "remove-paths", kind: "path", item: "/tmp/x", detail: "EBUSY" }];
  assert.equal(store.finish("live-one", "partial", leftovers, T0 + 2), true);
  const done = store.getSession("live-one");
  assert.equal(done?.state, "reaped");
  assert.equal(done?.outcome, "partial");
  assert.deepEqual(done?.leftovers, leftovers);
  assert.equal(done?.reapedAt, T0 + 2);

  // Nothing leaves reaped.
  assert.equal(store.finish("live-one", "clean", [], T0 + 3), false);
  assert.equal(store.fence("live-one", "forced", T0 + 3), false);
  assert.equal(store.getSession("live-one")?.outcome, "partial");
  assert.equal(store.finish("unknown", "clean", [], T0), false);
});

test("heartbeat writes only touch live sessions", (t) => {
  const { store } = openStore(t);
  store.insertSession(session("hb-live"));
  store.insertSession(session("hb-fenced"));
  store.fence("hb-fenced", "forced", T0 + 1);
  store.writeHeartbeats([
    { id: "hb-live", lastHeartbeatAt: T0 + 10, lastActivityAt: T0 + 5, deadline: T0 + 40_000 },
    { id: "hb-fenced", lastHeartbeatAt: T0 + 10, lastActivityAt: T0 + 10, deadline: T0 + 40_000 },
    { id: "hb-unknown", lastHeartbeatAt: T0 + 10, lastActivityAt: T0 + 10, deadline: T0 + 40_000 },
  ]);
  const live = store.getSession("hb-live");
  assert.equal(live?.lastHeartbeatAt, T0 + 10);
  assert.equal(live?.lastActivityAt, T0 + 5);
  assert.equal(live?.deadline, T0 + 40_000);
  const fenced = store.getSession("hb-fenced");
  assert.equal(fenced?.lastHeartbeatAt, T0);
  assert.equal(fenced?.deadline, null);
});

test("list pages with afterSeq/limit/more in insertion order", (t) => {
  const { store } = openStore(t);
  const ids = Array.from({ length: 7 }, (_, i) => `p${i}`);
  for (const id of ids) store.insertSession(session(id));

  const seen: string[] = [];
  let afterSeq: number | undefined;
  let pages = 0;
  for (;;) {
    const page = store.list({ limit: 3, afterSeq });
    pages++;
    seen.push(...page.sessions.map((s) => s.id));
    if (!page.more) {
      assert.equal(page.sessions.length, 1);
      break;
    }
    assert.equal(page.sessions.length, 3);
    assert.equal(page.lastSeq, store.seqOf(page.sessions.at(-1)?.id ?? ""));
    afterSeq = page.lastSeq ?? undefined;
  }
  assert.equal(pages, 3);
  assert.deepEqual(seen, ids);

  const exact = store.list({ limit: 7 });
  assert.equal(exact.sessions.length, 7);
  assert.equal(exact.more, false);

  const past = store.list({ limit: 3, afterSeq: store.seqOf("p6") });
  assert.deepEqual(past, { sessions: [], lastSeq: null, more: false });
});

test("list filters by state, profile and owner, combined with paging", (t) => {
  const { store } = openStore(t);
  store.insertSession(session("a", { profile: "gpu", owner: "alice" }));
  store.insertSession(session("b", { profile: "default", owner: "alice" }));
  store.insertSession(session("c", { profile: "gpu", owner: "bob" }));
  store.insertSession(session("d", { profile: "gpu", owner: "alice" }));
  store.insertSession(session("e", { profile: "gpu", owner: null }));
  store.fence("c", "forced", T0);
  store.fence("d", "closed", T0);
  store.finish("d", "clean", [], T0);

  const ids = (f: Parameters<Store["list"]>[0]): string[] => store.list(f).sessions.map((s) => s.id);
  assert.deepEqual(ids({ limit: 10, state: "live" }), ["a", "b", "e"]);
  assert.deepEqual(ids({ limit: 10, state: "reaping" }), ["c"]);
  assert.deepEqual(ids({ limit: 10, state: "reaped" }), ["d"]);
  assert.deepEqual(ids({ limit: 10, profile: "gpu" }), ["a", "c", "d", "e"]);
  assert.deepEqual(ids({ limit: 10, owner: "alice" }), ["a", "b", "d"]);
  assert.deepEqual(ids({ limit: 10, profile: "gpu", owner: "alice", state: "live" }), ["a"]);
  assert.deepEqual(ids({ limit: 10, profile: "none" }), []);

  const first = store.list({ limit: 1, profile: "gpu" });
  assert.deepEqual(
    first.sessions.map((s) => s.id),
    ["a"],
  );
  assert.equal(first.more, true);
  const second = store.list({ limit: 2, profile: "gpu", afterSeq: first.lastSeq ?? undefined });
  assert.deepEqual(
    second.sessions.map((s) => s.id),
    ["c", "d"],
  );
  assert.equal(second.more, true);

  assert.deepEqual(
    store.sessionsInState("live").map((s) => s.id),
    ["a", "b", "e"],
  );
});

test("counts per state", (t) => {
  const { store } = openStore(t);
  assert.deepEqual(store.counts(), { live: 0, reaping: 0, reaped: 0 });
  for (const id of ["1", "2", "3", "4"]) store.insertSession(session(id));
  store.fence("2", "forced", T0);
  store.fence("3", "forced", T0);
  store.finish("3", "failed", [], T0);
  assert.deepEqual(store.counts(), { live: 2, reaping: 1, reaped: 1 });
});

test("counts are kept by the store's own writes, and counted again after a rolled-back transaction", (t) => {
  const { store } = openStore(t);
  store.insertSession(session("k1"));
  assert.deepEqual(store.counts(), { live: 1, reaping: 0, reaped: 0 }); // counted
  store.insertSession(session("k2"));
  assert.throws(() => store.insertSession(session("k2")), /already exists/);
  assert.equal(store.fence("k1", "forced", T0), true);
  assert.equal(store.fence("k1", "forced", T0), false); // not live any more: no change
  assert.deepEqual(store.counts(), { live: 1, reaping: 1, reaped: 0 });
  assert.throws(() =>
    store.transaction(() => {
      store.insertSession(session("k3"));
      store.finish("k1", "clean", [], T0);
      throw new Error("rolled back");
    }),
  );
  assert.deepEqual(store.counts(), { live: 1, reaping: 1, reaped: 0 });
  store.transaction(() => store.finish("k1", "clean", [], T0));
  const returned = store.counts();
  returned.live = 99; // a copy
  assert.deepEqual(store.counts(), { live: 1, reaping: 0, reaped: 1 });
  const scan = store.db.prepare("SELECT state, COUNT(*) AS n FROM sessions GROUP BY state").all();
  assert.deepEqual(scan, [
    { state: "live", n: 1 },
    { state: "reaped", n: 1 },
  ]);
});

test("reap steps round-trip, ordered by position, re-recording a step replaces it", (t) => {
  const { store } = openStore(t);
  store.insertSession(session("steps"));
  store.fence("steps", "forced", T0);
  const terminate: StepResult = {
    name: "terminate",
    outcome: "ok",
    startedAt: T0 + 20,
    durationMs: 12.6,
    detail: { signalled: [4242], sigkill: false },
  };
  const fence: StepResult = { name: "fence", outcome: "ok", startedAt: T0 + 1, durationMs: 0, detail: {} };
  const paths: StepResult = {
    name: "remove-paths",
    outcome: "failed",
    startedAt: T0 + 40,
    durationMs: 3,
    detail: { leftovers: [{ step: "remove-paths", kind: "path", item: "/tmp/x", detail: "EPERM" }] },
  };
  store.recordStep("steps", 2, terminate);
  store.recordStep("steps", 0, fence);
  store.recordStep("steps", 4, paths);
  assert.deepEqual(store.steps("steps"), [fence, { ...terminate, durationMs: 13 }, paths]);

  const retried: StepResult = { ...paths, outcome: "ok", durationMs: 1, detail: {} };
  store.recordStep("steps", 4, retried);
  assert.deepEqual(store.steps("steps").at(-1), retried);
  assert.equal(store.steps("steps").length, 3);
  assert.deepEqual(store.steps("other"), []);
});

test("audit events round-trip per session, in order, with nulls for missing fields", (t) => {
  const { store } = openStore(t);
  store.insertEvent({ at: T0, event: "daemon.started" });
  store.insertEvent({ at: T0 + 1, event: "session.registered", sessionId: "ev", detail: { pid: 4242 } });
  store.insertEvent({
    at: T0 + 2,
    event: "reap.step",
    sessionId: "ev",
    reason: "forced",
    step: "terminate",
    outcome: "ok",
    durationMs: 2.4,
    detail: { signalled: [1, 2] },
  });
  store.insertEvent({ at: T0 + 3, event: "session.registered", sessionId: "other" });

  const events = store.events("ev");
  assert.equal(events.length, 2);
  assert.ok((events[0]?.seq as number) < (events[1]?.seq as number));
  assert.deepEqual(
    events.map(({ seq: _seq, ...rest }) => rest),
    [
      {
        at: T0 + 1,
        event: "session.registered",
        sessionId: "ev",
        reason: null,
        step: null,
        outcome: null,
        durationMs: null,
        detail: { pid: 4242 },
      },
      {
        at: T0 + 2,
        event: "reap.step",
        sessionId: "ev",
        reason: "forced",
        step: "terminate",
        outcome: "ok",
        durationMs: 2,
        detail: { signalled: [1, 2] },
      },
    ],
  );
  assert.deepEqual(store.events("none"), []);
});

test("transaction() commits together or not at all", (t) => {
  const { store } = openStore(t);
  assert.throws(() =>
    store.transaction(() => {
      store.insertSession(session("tx-1"));
      store.insertSession(session("tx-1"));
    }),
  );
  assert.equal(store.getSession("tx-1"), undefined);
  const n = store.transaction(() => {
    store.insertSession(session("tx-2"));
    store.insertSession(session("tx-3"));
    return 2;
  });
  assert.equal(n, 2);
  assert.equal(store.counts().live, 2);
});

test("upgradeJournal: records of unfinished reaps written by an older journal version are rewritten once, current and finished ones are not", (t) => {
  const { store } = openStore(t);
  const rec = (name: StepResult["name"], detail: Record<string, unknown>): StepResult => ({
    name,
    outcome: "ok",
    startedAt: T0,
    durationMs: 1,
    detail,
  });
  store.insertSession(session("resuming"));
  store.fence("resuming", "forced", T0 + 1);
  const v1 = { processes: [{ pid: 10, startTime: 20 }] };
  const v2 = { v: 2, processes: [{ pid: 10, startTime: 20 }], sockets: { listening: [] } };
  const v3 = { v: 3, processes: [], portInodes: [7] };
  store.recordStep("resuming", 0, rec("fence", v1));
  store.recordStep("resuming", 1, rec("close-environment", v2));
  store.recordStep("resuming", 2, rec("terminate", v3));
  // A finished session's journal is history: left as written.
  store.insertSession(session("finished"));
  store.fence("finished", "forced", T0 + 1);
  store.recordStep("finished", 0, rec("fence", v1));
  store.finish("finished", "clean", [], T0 + 2);

  assert.equal(JOURNAL_VERSION, 3, "this test's records are the versions before 3");
  assert.equal(store.upgradeJournal(olderRecord), 2);
  const steps = store.steps("resuming");
  assert.deepEqual(steps[0]?.detail, { ...v1, v: 3, upgradedFrom: 1 });
  assert.deepEqual(steps[1]?.detail, { ...v2, v: 3, upgradedFrom: 2 });
  assert.deepEqual(steps[2]?.detail, v3);
  assert.deepEqual(store.steps("finished")[0]?.detail, v1);
  // Once upgraded, nothing is left to rewrite.
  assert.equal(store.upgradeJournal(olderRecord), 0);
});
