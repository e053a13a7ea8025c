import assert from "node:assert/strict";
import { once } from "node:events";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import {
  ReaperApiError,
  ReaperClient,
  SESSION_COOKIE,
  type HeartbeatAnswer,
  type RetryInfo,
  type Session,
} from "../../src/client/index.js";
import type { sessionJson } from "../../src/http/present.js";
import { exited, sleeper, startDaemon, tempDir, testConfig, until } from "../helpers.js";

/** The next `n` heartbeat answers. */
function heartbeats(client: ReaperClient, n: number): Promise<HeartbeatAnswer[]> {
  const got: HeartbeatAnswer[] = [];
  return new Promise((resolve) => {
    const on = (a: HeartbeatAnswer): void => {
      got.push(a);
      if (got.length < n) return;
      client.off("heartbeat", on);
      resolve(got);
    };
    client.on("heartbeat", on);
  });
}

test("the client's Session type is exactly what the server answers", () => {
  // Compile-time: each is assignable to the other, so the two cannot drift apart.
  type Answer = ReturnType<typeof sessionJson>;
  const toClient = (s: Answer): Session => s;
  const toServer = (s: Session): Answer => s;
  assert.equal(typeof toClient, typeof toServer);
});

test("ReaperClient: register, heartbeat loop, busy/idle, close", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  const engine = sleeper(t);
  const client = new ReaperClient({ socketPath: d.socket, intervalMs: 40 });
  t.after(() => client.stop());
  const s = await client.register({
    id: "lib-1",
    engine: { pid: engine.pid },
    heartbeatTimeoutSec: 30,
    idleTimeoutSec: 20,
  });
  assert.equal(s.state, "live");
  assert.equal(s.engine.pid, engine.pid);
  assert.equal(client.session?.id, "lib-1");

  // The idle timeout (20 s) sets the deadline: busy heartbeats move it, idle ones do not.
  client.start();
  assert.equal(client.running, true);
  const busy = await heartbeats(client, 3);
  assert.ok(busy.every((h) => h.id === "lib-1" && h.expiresBy === "idle_timeout"));
  assert.ok(Date.parse(busy[2]!.deadline) > Date.parse(busy[1]!.deadline));
  client.idle();
  const idle = (await heartbeats(client, 3)).slice(1); // the first may have left before idle()
  assert.equal(idle[0]!.deadline, idle[1]!.deadline);
  client.busy();
  const again = (await heartbeats(client, 3)).slice(1);
  assert.ok(Date.parse(again[1]!.deadline) > Date.parse(again[0]!.deadline));

  const closed = await client.close();
  assert.equal(client.running, false);
  assert.equal(closed?.state, "reaping");
  assert.equal(closed?.reason, "closed");
  let late = 0;
  client.on("heartbeat", () => late++);
  const reaped = await client.waitForReap();
  assert.equal(reaped.state, "reaped");
  assert.equal(reaped.outcome, "clean");
  await new Promise((r) => setTimeout(r, 150));
  assert.equal(late, 0, "no heartbeat after close()");
  assert.equal(await client.close(), null, "closing an ended session is not an error");
  await assert.rejects(
    new ReaperClient({ socketPath: d.socket }).register({ id: "lib-1", engine: { pid: sleeper(t).pid } }),
    (err: ReaperApiError) => err.code === "SR_SESSION_EXISTS" && err.status === 409,
  );
});

test("ReaperClient: by default heartbeats every third of the heartbeat timeout, ±10%", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  const client = new ReaperClient({ socketPath: d.socket });
  t.after(() => client.stop());
  await client.register({ engine: { pid: sleeper(t).pid }, heartbeatTimeoutSec: 3 });
  const started = Date.now();
  client.start();
  await heartbeats(client, 1);
  const elapsed = Date.now() - started;
  assert.ok(elapsed >= 890 && elapsed < 2000, `first heartbeat after ${elapsed} ms`);
  await client.close();
});

test("ReaperClient: by default heartbeats within the daemon's keep-alive, on the connection it keeps", async (t) => {
  const dir = tempDir(t);
  // Keep-alive 3 s: the connection is kept 2 s (Node's agent drops it a second before the
  // daemon would); the loop beats at 80% of that, ±10%, though a third of the timeout is 10 s.
  const d = await startDaemon(t, testConfig(dir, { api: { keep_alive_timeout_ms: 3000 } }));
  let connections = 0;
  d.daemon.app.server.on("connection", () => connections++);
  const client = new ReaperClient({ socketPath: d.socket });
  t.after(() => client.stop());
  await client.register({ engine: { pid: sleeper(t).pid }, heartbeatTimeoutSec: 30 });
  const before = connections;
  const started = Date.now();
  client.start();
  const five = await Promise.race([
    heartbeats(client, 5),
    new Promise<null>((r) => setTimeout(() => r(null), 20_000).unref()),
  ]);
  const elapsed = Date.now() - started;
  assert.ok(five !== null, `five heartbeats within 20 s (a third of the timeout is 10 s): ${elapsed} ms`);
  // A timer that fires late on a busy host may find the connection dropped: most are kept.
  const opened = connections - before;
  assert.ok(opened <= 2, `${opened} connections opened for 5 heartbeats`);
  await client.close();
});

test('ReaperClient: "fenced" once the session is force-reaped, and the loop stops', async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  const client = new ReaperClient({ socketPath: d.socket, intervalMs: 30 });
  t.after(() => client.stop());
  await client.register({ id: "lib-fenced", engine: { pid: sleeper(t).pid } });
  client.start();
  await heartbeats(client, 1);
  const fenced = once(client, "fenced") as Promise<[ReaperApiError]>;
  assert.equal((await d.api("POST", "/v1/sessions/lib-fenced/reap")).status, 202);
  const [err] = await fenced;
  assert.equal(err.status, 409);
  assert.equal(err.code, "SR_SESSION_FENCED");
  assert.equal(client.running, false);
  assert.equal((await d.reaped("lib-fenced")).reason, "forced");
});

test('ReaperClient: "warning" once per warning a heartbeat\'s answer carries; a busy beat voids it and the next comes again', async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(
    t,
    testConfig(dir, { profiles: { default: { heartbeat_timeout_sec: 60, idle_timeout_sec: 3, warn_before_sec: 2 } } }),
  );
  const client = new ReaperClient({ socketPath: d.socket, intervalMs: 50 });
  t.after(() => client.stop());
  await client.register({ id: "lib-warned", engine: { pid: sleeper(t).pid } });
  const warnings: { reason: string; deadline: string; at: string }[] = [];
  let withWarning = 0;
  client.on("warning", (w) => warnings.push(w));
  client.on("heartbeat", (a) => void (a.warning !== null && withWarning++));
  client.idle();
  client.start();
  // Idle beats move nothing: the warning comes 2 s before the idle deadline (3 s), and each
  // later answer carries it again; the event fires once.
  await until(() => withWarning >= 5, 10_000, "five answers carrying the warning");
  assert.equal(warnings.length, 1, JSON.stringify(warnings));
  const recorded = await d.waitFor((e) => e.event === "session.warning" && e.sessionId === "lib-warned", 1000);
  assert.equal(warnings[0]?.reason, "idle_timeout");
  assert.equal(warnings[0]?.deadline, (recorded.detail as { deadline: string }).deadline);
  // A busy beat voids it; idle again, a new warning (another `at`) is told again.
  client.busy();
  const [voided] = (await once(client, "heartbeat")) as [HeartbeatAnswer]; // may have left before busy()
  const [busyBeat] = voided.warning === null ? [voided] : ((await once(client, "heartbeat")) as [HeartbeatAnswer]);
  assert.equal(busyBeat.warning, null, "a busy beat's answer carries no warning");
  client.idle();
  await until(() => warnings.length === 2, 10_000, "a second warning, for the moved deadline");
  assert.notEqual(warnings[1]?.at, warnings[0]?.at);
  assert.ok(Date.parse(warnings[1]!.deadline) > Date.parse(warnings[0].deadline));
  await client.close();
});

test('ReaperClient: "retrying" with backoff while the daemon restarts, then heartbeats again', async (t) => {
  const dir = tempDir(t);
  const config = testConfig(dir);
  const first = await startDaemon(t, config);
  const client = new ReaperClient({ socketPath: first.socket, intervalMs: 30, backoff: { initialMs: 20, maxMs: 160 } });
  t.after(() => client.stop());
  await client.register({ id: "lib-restart", engine: { pid: sleeper(t).pid }, heartbeatTimeoutSec: 30 });
  client.start();
  await heartbeats(client, 1);

  const retries: RetryInfo[] = [];
  client.on("retrying", (r) => retries.push(r));
  await first.stop();
  await until(() => retries.length >= 5, 10_000, "five retries");
  // A request caught by the stop may fail with EPIPE, ECONNRESET or a 503; then the socket
  // is gone (SR_DAEMON_UNREACHABLE). Every failure is retried.
  const codes = retries.map((r) => (r.error as Error & { code?: string }).code);
  assert.ok(codes.includes("SR_DAEMON_UNREACHABLE"), codes.join(","));
  assert.deepEqual(
    retries.map((r) => r.attempt),
    retries.map((_, i) => i + 1),
  );
  // Doubles from 20 ms, capped at 160 ms, each ±10%.
  for (const r of retries) {
    const base = Math.min(160, 20 * 2 ** (r.attempt - 1));
    assert.ok(r.delayMs >= base * 0.9 - 1 && r.delayMs <= base * 1.1 + 1, `attempt ${r.attempt}: ${r.delayMs} ms`);
  }
  assert.equal(client.running, true);

  const second = await startDaemon(t, config); // same socket, same database
  const [answer] = await heartbeats(client, 1);
  assert.equal(answer!.id, "lib-restart");
  const s = await client.get();
  assert.equal(s.state, "live");
  await client.close();
  await second.reaped("lib-restart");
});

test('the package exports the client as "session-reaper/client" and "session-reaper"', async () => {
  const byName = (await import("session-reaper/client")) as { ReaperClient: unknown };
  const root = (await import("session-reaper")) as { ReaperClient: unknown };
  assert.equal(byName.ReaperClient, ReaperClient);
  assert.equal(root.ReaperClient, ReaperClient);
});

test("spawn: the command is registered, contained and marked before it runs; a refused registration never runs it", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  const client = new ReaperClient({ socketPath: d.socket });
  const { child, session } = await client.spawn("sleep", ["304"], { body: { labels: { via: "spawn" } } });
  t.after(() => void child.kill("SIGKILL"));
  assert.equal(session.engine.pid, child.pid);
  assert.equal(session.containment?.kind, "cgroup");
  // After the gate: the same pid now runs the command, inside the session's cgroup, with the
  // cookie (exec sets comm before the new environment is in place: wait for both).
  const environ = (): string[] => readFileSync(`/proc/${child.pid}/environ`, "latin1").split("\0");
  await until(
    () => readFileSync(`/proc/${child.pid}/comm`, "latin1").trim() === "sleep" && environ().length > 1,
    5_000,
    "exec'd",
  );
  assert.ok(environ().includes(`${SESSION_COOKIE}=${session.id}`), environ().join(" "));
  const cgroupPath = session.containment?.kind === "cgroup" ? session.containment.path : "";
  assert.ok(readFileSync(`${cgroupPath}/cgroup.procs`, "latin1").split("\n").includes(String(child.pid)));
  await client.close();
  const reaped = await client.waitForReap({ timeoutMs: 15_000 });
  assert.equal(reaped.outcome, "clean");
  await exited(child);

  const refused = client.spawn("sleep", ["305"], { body: { profile: "no-such-profile" } });
  await assert.rejects(refused, (err) => err instanceof ReaperApiError && err.code === "SR_UNKNOWN_PROFILE");
});
