import assert from "node:assert/strict";
import { readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import type { VerifyReport } from "../../src/cli/audit-verify.js";
import { callApi } from "../../src/client/transport.js";
import { ctl } from "../cli/ctl.js";
import { fillUp, heartbeats, metric, mountTmpfs, orDied, readDb, register, stateOf } from "../faults/lib.js";
import { sleeper, spawnDaemon, tempDir, until, writeDaemonConfig } from "../helpers.js";

/** The log's lines: parsed, and the start of those that are not JSON. */
function logLines(file: string): { parsed: { event?: string; audit?: boolean }[]; malformed: string[] } {
  const parsed: { event?: string; audit?: boolean }[] = [];
  const malformed: string[] = [];
  for (const line of readFileSync(file, "utf8").split("\n")) {
    if (line === "") continue;
    try {
      parsed.push(JSON.parse(line) as { event?: string });
    } catch {
      malformed.push(line.slice(0, 120));
    }
  }
  return { parsed, malformed };
}

/**
 * The file system under the log file fills while sessions register, heartbeat and are reaped,
 * then space returns. The last block of the log has room for part of a line: that line is
 * written short. Before, its part fused with the next line written once space returned, so
 * that line was lost too and `audit verify` found a malformed line (exit 5). Now every line
 * in the log is whole, the lines dropped meanwhile are named by daemon.lines_dropped, and
 * verify, with the daemon and alone, finds the trail complete.
 */
test("the log's disk fills during registrations, heartbeats and reaps: every line whole, drops named, verify complete", async (t) => {
  const dir = tempDir(t);
  const mnt = mountTmpfs(dir, "log", "512k");
  const log = join(mnt, "reaper.log");
  const { file, socket, db } = writeDaemonConfig(
    dir,
    `[log]
level = "info"
file = "${log}"
[profiles.default]
grace_period_sec = 1
allowed_roots = ["${dir}"]
`,
  );
  const daemon = await spawnDaemon(t, file, socket);
  const call = <T>(p: Promise<T>): Promise<T> => orDied(daemon, p);
  const registered = async (id: string, extra: Record<string, unknown> = {}): Promise<void> => {
    const r = await call(register(socket, id, sleeper(t, "sleep", ["120"]).pid, extra));
    assert.equal(r.status, 201, `${id}: ${JSON.stringify(r.body)}`);
  };
  const reaped = (id: string): Promise<void> =>
    until(async () => (await call(stateOf(socket, id))) === "reaped", 20_000, `${id} reaped`);

  const liveIds = ["live-0", "live-1", "live-2"];
  for (const id of liveIds) await registered(id);
  const hb = heartbeats(t, socket, liveIds, 1000);
  await registered("before-closed");
  await registered("before-quiet", { heartbeatTimeoutSec: 2 });

  const filler = join(mnt, "filler");
  fillUp(filler);
  await registered("full-forced");
  assert.equal((await call(callApi(socket, "POST", "/v1/sessions/full-forced/reap"))).status, 202);
  await registered("full-closed");
  assert.equal((await call(callApi(socket, "DELETE", "/v1/sessions/full-closed"))).status, 202);
  assert.equal((await call(callApi(socket, "DELETE", "/v1/sessions/before-closed"))).status, 202);
  await registered("full-quiet", { heartbeatTimeoutSec: 2 });
  for (const id of ["full-forced", "full-closed", "before-closed", "before-quiet", "full-quiet"]) await reaped(id);
  const dropped = await call(metric(socket, "session_reaper_log_lines_dropped_total"));
  t.diagnostic(`lines dropped while the disk was full: ${dropped}`);
  assert.ok(dropped !== null && dropped > 0, "lines were dropped");

  rmSync(filler); // space returns
  await registered("after-closed");
  assert.equal((await call(callApi(socket, "DELETE", "/v1/sessions/after-closed"))).status, 202);
  await reaped("after-closed");
  // Before: the part of a line that fitted, fused with the first line written after space returned.
  assert.deepEqual(logLines(log).malformed, [], "every line of the log is whole");
  await until(
    () => logLines(log).parsed.some((l) => l.event === "daemon.lines_dropped"),
    10_000,
    "daemon.lines_dropped in the log",
  );
  const samples = await hb.stop();
  assert.deepEqual(
    samples.filter((s) => s.status !== 200).map((s) => `${s.id}: ${s.status} ${s.error ?? ""}`),
    [],
  );

  const { parsed, malformed } = logLines(log);
  assert.deepEqual(malformed, [], "every line of the log is whole, also after the report");
  assert.ok(readFileSync(log, "utf8").endsWith("\n"));
  assert.ok(parsed.length > 0);

  for (const args of [["--socket", socket], ["--offline"]]) {
    const r = await ctl(["audit", "verify", log, "--json", ...args]);
    assert.equal(r.code, 0, `audit verify ${args.join(" ")}: ${r.stdout}${r.stderr}`);
    const rep = JSON.parse(r.stdout) as VerifyReport;
    assert.equal(rep.complete, true);
    assert.deepEqual(rep.sessions, { seen: 9, live: 3, reaped: 6, missing: 0 });
    assert.deepEqual(rep.malformed, []);
    assert.equal(rep.droppedLines.unnamed, 0);
    assert.ok(rep.droppedLines.auditLines > 0, JSON.stringify(rep.droppedLines));
    assert.ok(rep.droppedLines.lines >= rep.droppedLines.auditLines);
  }
  const human = await ctl(["audit", "verify", log, "--socket", socket]);
  assert.match(human.stdout, /^dropped lines\s+\d+ \(log full; \d+ audit lines named by \d+ daemon\.lines_dropped\)$/m);
  assert.match(human.stdout, /^result\s+complete$/m);

  // The same events are in the database, the report among them.
  const rows = readDb(t, db).prepare("SELECT detail FROM audit_events WHERE event = 'daemon.lines_dropped'").all();
  assert.ok(rows.length > 0);
  daemon.proc.kill("SIGTERM");
  assert.equal(await daemon.exit, 0);
});
