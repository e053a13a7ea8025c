import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { createServer, type IncomingMessage } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { test } from "node:test";
import type { RecordedAuditEvent } from "../../src/audit/audit.js";
import { ctl } from "../cli/ctl.js";
import { sleeper, startDaemon, tempDir, testConfig, until, type TestDaemon } from "../helpers.js";

type Answer = Record<string, unknown> & { error?: { code: string; detail?: Record<string, unknown> } };

/** A loopback HTTP server that keeps every JSON body POSTed to it. */
async function hookServer(t: {
  after: (fn: () => Promise<void>) => void;
}): Promise<{ url: string; bodies: unknown[] }> {
  const bodies: unknown[] = [];
  const srv = createServer((req: IncomingMessage, res) => {
    let text = "";
    req.setEncoding("utf8").on("data", (d: string) => (text += d));
    req.on("end", () => {
      bodies.push(JSON.parse(text));
      res.end("ok");
    });
  });
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  t.after(() => new Promise<void>((r) => srv.close(() => r())));
  return { url: `http://127.0.0.1:${(srv.address() as AddressInfo).port}/warned`, bodies };
}

async function register(d: TestDaemon, pid: number, extra: Record<string, unknown> = {}): Promise<Answer> {
  const res = await d.api<Answer>("POST", "/v1/sessions", { engine: { pid }, ...extra });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return res.body;
}

const warningOf =
  (id: string, after = 0) =>
  (e: RecordedAuditEvent) =>
    e.event === "session.warning" && e.sessionId === id && e.at > after;

test("a warning comes within 100 ms of its moment, stands with the session, runs its hooks, and activity voids it", async (t) => {
  const dir = tempDir(t);
  const hookLog = join(dir, "hook.log");
  const http = await hookServer(t);
  const d = await startDaemon(
    t,
    testConfig(dir, {
      profiles: {
        default: {
          heartbeat_timeout_sec: 60,
          idle_timeout_sec: 3,
          warn_before_sec: 1,
          warn_hooks: [
            [
              "/bin/sh",
              "-c",
              'printf "%s %s %s\\n" "$1" "$2" "$3" >> "$4"',
              "sh",
              "{id}",
              "{reason}",
              "{in_sec}",
              hookLog,
            ],
            http.url,
          ],
        },
      },
    }),
  );
  const engine = sleeper(t, "sleep", ["600"]);
  const s = await register(d, engine.pid, { id: "warned-1" });
  const deadline = Date.parse(s.deadline as string);

  // The idle deadline is 3 s after registration; the warning is due 1 s before it.
  const w = await d.waitFor(warningOf("warned-1"), 10_000);
  assert.equal(w.reason, "idle_timeout");
  const warnedOf = Date.parse((w.detail as { deadline: string }).deadline);
  assert.ok(Math.abs(warnedOf - deadline) <= 2, `warned of ${warnedOf}, deadline ${deadline}`);
  const late = w.at - (warnedOf - 1000);
  assert.ok(late >= -2 && late <= 100, `the warning came ${late} ms after its moment`);
  assert.equal((w.detail as { inSec: number }).inSec, 1);

  const shown = (await d.api<Answer>("GET", "/v1/sessions/warned-1")).body.warning as Record<string, string>;
  assert.equal(shown.reason, "idle_timeout");
  assert.equal(shown.deadline, new Date(warnedOf).toISOString());
  assert.ok(Math.abs(Date.parse(shown.at ?? "") - w.at) <= 20, `given at ${shown.at}, recorded at ${w.at}`);

  // Both hooks ran, with the warning's facts.
  await until(() => existsSync(hookLog) && readFileSync(hookLog, "utf8").includes("\n"), 5000, "the argv hook");
  assert.equal(readFileSync(hookLog, "utf8"), "warned-1 idle_timeout 1\n");
  await until(() => http.bodies.length === 1, 5000, "the URL hook");
  assert.deepEqual(
    Object.fromEntries(
      Object.entries(http.bodies[0] as object).filter(([k]) =>
        ["sessionId", "reason", "inSec", "deadline"].includes(k),
      ),
    ),
    { sessionId: "warned-1", reason: "idle_timeout", inSec: 1, deadline: new Date(warnedOf).toISOString() },
  );

  // A busy heartbeat moves the deadline: the warning no longer stands, and a new one comes
  // 1 s before the new deadline, as punctual.
  // An idle heartbeat's answer carries the warning standing; a busy one's, none.
  const idle = await d.api<Answer>("POST", "/v1/sessions/warned-1/heartbeat", { activity: "idle" });
  assert.deepEqual(idle.body.warning, shown);
  const beat = await d.api<Answer>("POST", "/v1/sessions/warned-1/heartbeat", { activity: "busy" });
  assert.equal(beat.status, 200);
  assert.equal(beat.body.warning, null);
  const beatAt = Date.now();
  assert.equal((await d.api<Answer>("GET", "/v1/sessions/warned-1")).body.warning, null);
  const again = await d.waitFor(warningOf("warned-1", w.at), 10_000);
  const againOf = Date.parse((again.detail as { deadline: string }).deadline);
  assert.ok(againOf >= beatAt + 3000 - 50, "the new warning is for the moved deadline");
  const lateAgain = again.at - (againOf - 1000);
  assert.ok(lateAgain >= -2 && lateAgain <= 100, `the second warning came ${lateAgain} ms after its moment`);

  // Idle heartbeats keep it alive but move nothing: it is reaped at the deadline it was warned of.
  const idleAgain = await d.api<Answer>("POST", "/v1/sessions/warned-1/heartbeat", { activity: "idle" });
  assert.equal((idleAgain.body.warning as Record<string, string> | null)?.deadline, new Date(againOf).toISOString());
  const expired = await d.waitFor((e) => e.event === "session.expired" && e.sessionId === "warned-1", 10_000);
  assert.equal(expired.reason, "idle_timeout");
  assert.ok(expired.at >= againOf - 2, "not reaped before the deadline it was warned of");
  await d.reaped("warned-1");
});

test("no warning is given when the profile does not warn, nor for a heartbeat timeout", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(
    t,
    testConfig(dir, {
      profiles: {
        default: { heartbeat_timeout_sec: 1, idle_timeout_sec: 60, warn_before_sec: 30 },
        quiet: { heartbeat_timeout_sec: 60, idle_timeout_sec: 1, warn_before_sec: 0 },
      },
    }),
  );
  await register(d, sleeper(t, "sleep", ["600"]).pid, { id: "hb" });
  await register(d, sleeper(t, "sleep", ["600"]).pid, { id: "quiet", profile: "quiet", heartbeatTimeoutSec: 30 });
  await d.reaped("hb");
  await d.reaped("quiet");
  const warnings = d.daemon.store
    .events("hb")
    .concat(d.daemon.store.events("quiet"))
    .filter((e) => e.event === "session.warning");
  assert.deepEqual(warnings, []);
});

test("an extension keeps a session past its old deadline, within max_extend_sec and its max lifetime", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(
    t,
    testConfig(dir, {
      profiles: {
        default: { heartbeat_timeout_sec: 60, idle_timeout_sec: 2, max_extend_sec: 4, warn_before_sec: 1 },
        none: { idle_timeout_sec: 60, max_extend_sec: 0 },
      },
    }),
  );
  const s = await register(d, sleeper(t, "sleep", ["600"]).pid, { id: "ext-1" });
  const created = Date.parse(s.createdAt as string);

  // Over the cap: refused, naming it, and nothing changes.
  const over = await d.api<Answer>("POST", "/v1/sessions/ext-1/extend", { sec: 5 });
  assert.equal(over.status, 400);
  assert.equal(over.body.error?.code, "SR_EXTEND_ABOVE_MAX");
  assert.equal(over.body.error?.detail?.maxExtendSec, 4);
  assert.equal((await d.api<Answer>("GET", "/v1/sessions/ext-1")).body.extendedUntil, null);
  for (const body of [{ sec: 0 }, { sec: "1h" }, {}, { sec: 1, more: 1 }]) {
    const bad = await d.api<Answer>("POST", "/v1/sessions/ext-1/extend", body);
    assert.equal(bad.status, 400, JSON.stringify(body));
  }
  const noneSession = await register(d, sleeper(t, "sleep", ["600"]).pid, { id: "ext-none", profile: "none" });
  const refused = await d.api<Answer>("POST", `/v1/sessions/${noneSession.id as string}/extend`, { sec: 1 });
  assert.equal(refused.body.error?.code, "SR_EXTEND_ABOVE_MAX");
  assert.match(JSON.stringify(refused.body), /allows no extension/);

  // Through the CLI: 4 s.
  const out = await ctl(["extend", "ext-1", "4s", "--json"], { REAPER_SOCKET: d.socket });
  assert.equal(out.code, 0, out.stderr);
  const a = JSON.parse(out.stdout) as { extendedUntil: string; keptUntil: string; cappedBy: string | null };
  const until4 = Date.parse(a.extendedUntil);
  assert.ok(until4 >= created + 4000 && until4 <= Date.now() + 4000, a.extendedUntil);
  assert.equal(a.keptUntil, a.extendedUntil);
  assert.equal(a.cappedBy, null);
  const ev = await d.waitFor((e) => e.event === "session.extended" && e.sessionId === "ext-1");
  assert.equal((ev.detail as { sec: number }).sec, 4);

  // Past the old idle deadline (2 s after registration, as no activity came): still live.
  await until(() => Date.now() >= created + 2500, 5000);
  const mid = (await d.api<Answer>("GET", "/v1/sessions/ext-1")).body;
  assert.equal(mid.state, "live");
  assert.equal(mid.extendedUntil, a.extendedUntil);
  // Warned 1 s before the extension ends, then reaped at its end, idle.
  const warned = await d.waitFor(warningOf("ext-1"), 10_000);
  assert.equal(Date.parse((warned.detail as { deadline: string }).deadline), until4);
  const expired = await d.waitFor((e) => e.event === "session.expired" && e.sessionId === "ext-1", 10_000);
  assert.equal(expired.reason, "idle_timeout");
  assert.ok(
    expired.at >= until4 - 2 && expired.at <= until4 + 1000,
    `reaped ${expired.at - until4} ms after the extension's end`,
  );

  // The max lifetime still ends it: the answer says so.
  const short = await register(d, sleeper(t, "sleep", ["600"]).pid, { id: "ext-life", maxLifetimeSec: 3 });
  const capped = await d.api<Answer>("POST", "/v1/sessions/ext-life/extend", { sec: 4 });
  assert.equal(capped.status, 200);
  assert.equal(capped.body.cappedBy, "max_lifetime");
  assert.equal(Date.parse(capped.body.keptUntil as string), Date.parse(short.createdAt as string) + 3000);

  // A fenced session cannot be extended.
  await d.reaped("ext-1");
  const late = await d.api<Answer>("POST", "/v1/sessions/ext-1/extend", { sec: 1 });
  assert.equal(late.status, 409);
  assert.equal((await d.api<Answer>("POST", "/v1/sessions/nope/extend", { sec: 1 })).status, 404);
});

test("an extension is kept across a restart of the daemon", async (t) => {
  const dir = tempDir(t);
  const config = testConfig(dir, {
    profiles: { default: { heartbeat_timeout_sec: 60, idle_timeout_sec: 2, max_extend_sec: 8 } },
  });
  const first = await startDaemon(t, config);
  await register(first, sleeper(t, "sleep", ["600"]).pid, { id: "ext-r" });
  const a = (await first.api<Answer>("POST", "/v1/sessions/ext-r/extend", { sec: 8 })).body;
  const until8 = Date.parse(a.extendedUntil as string);
  await first.stop();
  const second = await startDaemon(t, config);
  const restarted = Date.now();
  // After a restart every timeout runs again from the start (2 s idle): the extension outlasts it.
  await until(() => Date.now() >= restarted + 2500, 5000);
  const shown = (await second.api<Answer>("GET", "/v1/sessions/ext-r")).body;
  assert.equal(shown.state, "live");
  assert.equal(shown.extendedUntil, a.extendedUntil);
  const expired = await second.waitFor((e) => e.event === "session.expired" && e.sessionId === "ext-r", 15_000);
  assert.equal(expired.reason, "idle_timeout");
  assert.ok(expired.at >= until8 - 5, `reaped ${until8 - expired.at} ms before the extension's end`);
  await second.reaped("ext-r");
});
