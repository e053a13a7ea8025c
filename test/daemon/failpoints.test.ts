import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { callApi } from "../../src/client/transport.js";
import { FAILPOINTS } from "../../src/reaper/reaper.js";
import { isGone, portFree, spawnDaemon, startEngine, tempDir, until, writeDaemonConfig } from "../helpers.js";

const STEPS = ["close-environment", "terminate", "release-connections-and-ports", "remove-paths"];

type Line = { event?: string; sessionId?: string; step?: string; failpoint?: string };

/**
 * Crash safety, proven: for every step boundary, a daemon that dies there (SIGKILL, no
 * flush) and is restarted finishes the reap exactly once, runs no journaled step twice,
 * hands hooks an attempt number, and leaves a complete audit trail.
 */
for (const failpoint of FAILPOINTS) {
  test(`SIGKILL at ${failpoint}: the restarted daemon finishes the reap exactly once`, async (t) => {
    const dir = tempDir(t);
    const hookLog = join(dir, "hook.log");
    const { file, socket } = writeDaemonConfig(
      dir,
      `[profiles.default]
close_hook = ["/bin/sh", "-c", "echo \\"$SESSION_ID $REAP_ATTEMPT\\" >> ${hookLog}"]
grace_period_sec = 0.5
step_timeout_sec = 3
allowed_roots = ["${dir}"]
`,
    );
    const first = await spawnDaemon(t, file, socket, { REAPER_FAILPOINTS: failpoint });
    const engine = await startEngine(t, ["--fork", "1"], join(dir, "engine"));
    const reg = await callApi(socket, "POST", "/v1/sessions", {
      id: "fp",
      engine: { pid: engine.pid },
      ports: [engine.port],
      paths: [engine.dir],
    });
    assert.equal(reg.status, 201);
    // At after-fence the daemon dies inside this very request: no answer is fine.
    await callApi(socket, "POST", "/v1/sessions/fp/reap").catch(() => undefined);
    assert.equal(await first.exit, null, "the daemon should have died by SIGKILL");
    assert.equal(first.proc.signalCode, "SIGKILL");
    assert.match(first.output(), new RegExp(`"failpoint":"${failpoint}"`));

    const second = await spawnDaemon(t, file, socket);
    await until(
      async () => (await callApi<{ state: string }>(socket, "GET", "/v1/sessions/fp")).body.state === "reaped",
      15_000,
      "reap finished after restart",
    );
    const s = (
      await callApi<{ outcome: string; reapAttempts: number; steps: { name: string }[] }>(
        socket,
        "GET",
        "/v1/sessions/fp",
      )
    ).body;
    assert.equal(s.outcome, "clean");
    assert.deepEqual(
      s.steps.map((x) => x.name),
      ["fence", ...STEPS, "finish"],
    );
    // Resumed once, unless the crash came before the pipeline started or after it finished.
    const resumed = failpoint !== "after-fence" && failpoint !== "after-finish";
    assert.equal(s.reapAttempts, resumed ? 2 : 1);

    // The close hook ran exactly once and was told its attempt.
    const hookLines = readFileSync(hookLog, "utf8").trim().split("\n");
    assert.deepEqual(hookLines, ["fp 1"]);

    // Every event exactly once, in SQLite and in the JSON lines of both runs together.
    const stored = (
      await callApi<{ events: { event: string; step: string | null }[] }>(socket, "GET", "/v1/sessions/fp/events")
    ).body.events;
    const lines = (first.output() + second.output())
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as Line)
      .filter((l) => l.sessionId === "fp" && l.event);
    for (const trail of [stored.map((e) => [e.event, e.step ?? ""]), lines.map((l) => [l.event, l.step ?? ""])]) {
      assert.deepEqual(trail, [
        ["session.registered", ""],
        ["session.expired", ""],
        ["reap.started", ""],
        ["reap.step", "fence"],
        ...STEPS.map((step) => ["reap.step", step]),
        ["reap.finished", ""],
      ]);
    }

    for (const pid of [engine.pid, ...engine.children]) assert.ok(isGone(pid));
    assert.ok(await portFree(engine.port));
    assert.ok(!existsSync(engine.dir as string));
    second.proc.kill("SIGTERM");
    assert.equal(await second.exit, 0);
  });
}

test("an unknown failpoint name stops reaperd at start (exit 78)", async (t) => {
  const dir = tempDir(t);
  const { file, socket } = writeDaemonConfig(dir);
  await assert.rejects(
    spawnDaemon(t, file, socket, { REAPER_FAILPOINTS: "after-lunch" }),
    /exited with 78.*after-lunch/s,
  );
});
