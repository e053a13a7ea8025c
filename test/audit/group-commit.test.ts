/**
 * The journal's group commit (AuditTrail.commitSoon): the writes of one turn share one
 * transaction, each caller goes on only once its write is committed and its events are
 * published, and a faulty write fails only itself. On a real SQLite file.
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { pino } from "pino";
import { AuditTrail, type RecordedAuditEvent } from "../../src/audit/audit.js";
import { systemClock } from "../../src/clock.js";
import { Store } from "../../src/store/store.js";

function trail(t: { after: (fn: () => void) => void }): { store: Store; audit: AuditTrail } {
  const dir = mkdtempSync(join(tmpdir(), "sr-group-commit-"));
  const store = new Store(join(dir, "reaper.db"), systemClock.now());
  t.after(() => {
    store.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return { store, audit: new AuditTrail(store, pino({ level: "silent" }), systemClock) };
}

test("commitSoon: the writes of one turn share one transaction; each resolves after its commit, its event published", async (t) => {
  const { store, audit } = trail(t);
  const published: string[] = [];
  audit.events.on("audit", (e: RecordedAuditEvent) => published.push(e.sessionId ?? ""));
  const before = { ...audit.groupStats };
  const ids = Array.from({ length: 20 }, (_, i) => `g-${i}`);
  const seenAtResolve: number[] = [];
  await Promise.all(
    ids.map((id) =>
      audit
        .commitSoon(() => audit.record({ event: "reap.step", sessionId: id, step: "terminate", outcome: "ok" }))
        .then(() => {
          // Committed: another connection would read it; published: the line and the event are out.
          seenAtResolve.push(store.events(id).length);
          assert.ok(published.includes(id), `${id} resolved before its event was published`);
        }),
    ),
  );
  assert.deepEqual(
    seenAtResolve,
    ids.map(() => 1),
  );
  assert.equal(audit.groupStats.commits - before.commits, 1, "twenty writes of one turn: one commit");
  assert.equal(audit.groupStats.writes - before.writes, 20);
  // Writes of a later turn are a later group.
  await audit.commitSoon(() => audit.record({ event: "reap.step", sessionId: "later", step: "finish" }));
  assert.equal(audit.groupStats.commits - before.commits, 2);
});

test("commitSoon: a faulty write fails alone; the others of its group are committed", async (t) => {
  const { store, audit } = trail(t);
  const results = await Promise.allSettled([
    audit.commitSoon(() => audit.record({ event: "reap.step", sessionId: "ok-1", step: "terminate" })),
    audit.commitSoon(() => {
      audit.record({ event: "reap.step", sessionId: "faulty", step: "terminate" });
      throw new Error("a bug in one write");
    }),
    audit.commitSoon(() => audit.record({ event: "reap.step", sessionId: "ok-2", step: "terminate" })),
  ]);
  assert.deepEqual(
    results.map((r) => r.status),
    ["fulfilled", "rejected", "fulfilled"],
  );
  assert.match(String((results[1] as PromiseRejectedResult).reason), /a bug in one write/);
  assert.equal(store.events("ok-1").length, 1);
  assert.equal(store.events("ok-2").length, 1);
  assert.equal(store.events("faulty").length, 0, "the faulty write's own record is rolled back");
});
