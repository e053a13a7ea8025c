/**
 * `reaperctl events` (the real binary, a real daemon): one session's stored events as before;
 * the event stream as lines or NDJSON; `-f` following a session across a daemon restart with
 * no event lost or printed twice, then saying the daemon is gone (exit 4) when it stays down.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { sleeper, startDaemon, tempDir, testConfig, until, type TestDaemon } from "../helpers.js";
import { ctl, startCtl } from "./ctl.js";

interface Row {
  seq: number;
  event: string;
  session_id: string | null;
}

/** The table's events (seq, event, session), read with the daemon's own connection. */
function rows(d: TestDaemon, where = "1 = 1", ...params: unknown[]): Row[] {
  return d.daemon.store.db
    .prepare(`SELECT seq, event, session_id FROM audit_events WHERE ${where} ORDER BY seq`)
    .all(...params) as Row[];
}

/** NDJSON lines as (seq, event, session). */
function parsed(stdout: string): Row[] {
  return stdout
    .split("\n")
    .filter((l) => l !== "")
    .map((l) => {
      const e = JSON.parse(l) as { seq: number; event: string; sessionId: string | null };
      return { seq: e.seq, event: e.event, session_id: e.sessionId };
    });
}

test("reaperctl events: the stream as lines or NDJSON; events ID as before; usage errors exit 2", async (t) => {
  const d = await startDaemon(t, testConfig(tempDir(t)));
  const s = ["--socket", d.socket];
  assert.equal((await d.api("POST", "/v1/sessions", { id: "c1", engine: { pid: sleeper(t).pid } })).status, 201);
  assert.equal((await d.api("DELETE", "/v1/sessions/c1")).status, 202);
  await d.reaped("c1");

  const json = await ctl(["events", "--json", ...s]);
  assert.equal(json.code, 0, json.stderr);
  const lines = parsed(json.stdout);
  assert.deepEqual(lines, rows(d, "seq <= ?", lines.at(-1)?.seq));

  const human = await ctl(["events", "--session", "c1", ...s]);
  assert.equal(human.code, 0, human.stderr);
  const own = rows(d, "session_id = 'c1'");
  assert.equal(human.stdout.split("\n").filter((l) => l !== "").length, own.length);
  assert.match(human.stdout, /^\S+Z\s+\d+\s+session\.registered\s+c1$/m);
  assert.match(human.stdout, /^\S+Z\s+\d+\s+reap\.finished\s+c1\s+reason=closed outcome=clean \d+ms$/m);

  const after = own[2]!.seq;
  const since = await ctl(["events", "c1", "--since", String(after), "--json", ...s]);
  assert.equal(since.code, 0, since.stderr);
  assert.deepEqual(parsed(since.stdout), rows(d, "session_id = 'c1' AND seq > ?", after));

  // One session's stored events, one document: as before the stream existed.
  const stored = await ctl(["events", "c1", "--json", ...s]);
  assert.equal(stored.code, 0, stored.stderr);
  assert.equal((JSON.parse(stored.stdout) as { events: unknown[] }).events.length, own.length);
  assert.match((await ctl(["events", "c1", ...s])).stdout, /^TIME\s+EVENT\s+STEP\s+OUTCOME\s+MS$/m);

  const missing = await ctl(["events", "--session", "nope", ...s]);
  assert.equal(missing.code, 3);
  assert.match(missing.stderr, /SR_SESSION_NOT_FOUND/);
  for (const args of [
    ["events", "--since", "abc"],
    ["events", "--since", "-1"],
    ["events", "a", "--session", "b"],
    ["events", "a", "b"],
  ]) {
    const r = await ctl([...args, "--socket", "/nonexistent/reaper.sock"]);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
  }
  const past = await ctl(["events", "--since", "999999999", ...s]);
  assert.equal(past.code, 1);
  assert.match(past.stderr, /past the newest event.*SR_BAD_REQUEST/);
});

test("reaperctl events -f: follows a session across a daemon restart, each event once; exit 4 when the daemon stays gone", async (t) => {
  const dir = tempDir(t);
  const config = testConfig(dir);
  const d1 = await startDaemon(t, config);
  assert.equal((await d1.api("POST", "/v1/sessions", { id: "f1", engine: { pid: sleeper(t).pid } })).status, 201);
  const follower = startCtl(t, ["events", "-f", "--session", "f1", "--since", "0", "--json", "--socket", d1.socket]);
  assert.match(await follower.firstLine, /"event":"session.registered"/);

  await d1.stop();
  const d2 = await startDaemon(t, config);
  assert.equal((await d2.api("DELETE", "/v1/sessions/f1")).status, 202);
  await d2.reaped("f1");
  await until(() => follower.stdout().includes('"event":"reap.finished"'), 30_000, "f1's reap, after the restart");
  assert.match(follower.stderr(), /the event stream was cut .*; reconnecting after seq \d+ \(1 of 8\)/);
  const printed = parsed(follower.stdout());
  assert.deepEqual(printed, rows(d2, "session_id = 'f1'"), "every event of f1, once, in order");

  const last = printed.at(-1)!.seq;
  await d2.stop();
  const result = await follower.done;
  assert.equal(result.code, 4, result.stderr);
  assert.match(
    result.stderr,
    new RegExp(`the daemon is gone: .*; gave up after 8 reconnections; resume with --since ${last}`),
  );
});
