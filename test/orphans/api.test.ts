import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { Ajv } from "ajv";
import { FakeClock } from "../../src/clock.js";
import type { OrphanJson } from "../../src/http/present.js";
import { ctl } from "../cli/ctl.js";
import { startDaemon, startEngine, tempDir, testConfig } from "../helpers.js";

type Orphans = { enabled: boolean; sweptAt: string | null; findings: OrphanJson[] };
type OpenApi = {
  paths: Record<
    string,
    Record<string, { responses: Record<string, { content?: Record<string, { schema: object }> }> }>
  >;
};

test("GET /v1/orphans and reaperctl orphans with no profile declaring a matcher: off, nothing swept", async (t) => {
  const d = await startDaemon(t, testConfig(tempDir(t)));
  const res = await d.api<Orphans>("GET", "/v1/orphans");
  assert.equal(res.status, 200);
  assert.deepEqual(res.body, { enabled: false, sweptAt: null, findings: [] });
  assert.deepEqual(d.daemon.orphans.sweep(), []);
  const out = await ctl(["orphans", "--socket", d.socket]);
  assert.equal(out.code, 0, out.stderr);
  assert.match(out.stdout, /the orphan sweep is off/);
});

test("GET /v1/orphans lists both modes' findings as documented; reaperctl orphans; audit verify knows orphan.found", async (t) => {
  const dir = tempDir(t);
  const tag = randomBytes(6).toString("hex");
  const scratch = join(dir, "scratch");
  mkdirSync(join(scratch, "left-1"), { recursive: true });
  const engine = await startEngine(t, ["--tag", tag], undefined, { detached: true });
  const clock = new FakeClock(Date.now());
  const config = testConfig(dir, {
    orphans: { schedule: "0 0 1 1 *" },
    profiles: {
      // Reap mode for tagged engines; report mode for the scratch dirs of another profile.
      default: { orphans: { mode: "reap", cmdline: `--tag ${tag}$`, uids: [0], min_age_sec: 10 } },
      scratch: { orphans: { paths: [join(scratch, "left-*")], uids: [0], min_age_sec: 10 } },
    },
  });
  const d = await startDaemon(t, config, clock);
  clock.advance(20_000);
  d.daemon.orphans.sweep();

  const res = await d.api<Orphans>("GET", "/v1/orphans");
  assert.equal(res.status, 200);
  const doc = (await d.api<OpenApi>("GET", "/openapi.json")).body;
  const schema = doc.paths["/v1/orphans"]?.get?.responses["200"]?.content?.["application/json"]?.schema;
  assert.ok(schema, "GET /v1/orphans is documented");
  const ajv = new Ajv({ strict: true, allowUnionTypes: true });
  ajv.addFormat("date-time", /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/);
  const validate = ajv.compile(schema);
  assert.ok(validate(res.body), ajv.errorsText(validate.errors));

  const byKind = new Map(res.body.findings.map((f) => [f.kind, f]));
  const proc = byKind.get("process");
  const path = byKind.get("path");
  assert.ok(proc && path, JSON.stringify(res.body.findings));
  assert.deepEqual([proc.profile, proc.action, proc.adopted, proc.pid], ["default", "reap", true, engine.pid]);
  assert.deepEqual(
    [path.profile, path.action, path.adopted, path.path],
    ["scratch", "report", false, join(scratch, "left-1")],
  );
  await d.reaped(proc.sessionId);

  const s = ["--socket", d.socket];
  // WHAT shows the command line cut at 80 characters with a marker (the clone's path makes
  // it longer or shorter), and the whole of it in --json.
  const cmdline = proc.cmdline ?? "";
  assert.match(cmdline, new RegExp(`--tag ${tag}$`));
  const what = cmdline.length > 80 ? `${cmdline.slice(0, 79)}…` : cmdline;
  const table = await ctl(["orphans", ...s]);
  assert.equal(table.code, 0, table.stderr);
  assert.match(table.stdout, /^last sweep \S+ \((in \d+s|\d+s ago)\)$/m);
  assert.match(table.stdout, /^KIND\s+PROFILE\s+ACTION\s+AGE\s+UID\s+SESSION\s+WHAT$/m);
  assert.match(
    table.stdout,
    new RegExp(
      `^process\\s+default\\s+reap\\s+\\d+s\\s+0\\s+${proc.sessionId}\\s+pid ${engine.pid}, ports ${engine.port}: ${escapeRegExp(what)}$`,
      "m",
    ),
  );
  assert.match(
    table.stdout,
    new RegExp(`^path\\s+scratch\\s+report\\s+\\d+s\\s+0\\s+${path.sessionId}\\s+${scratch}/left-1$`, "m"),
  );
  const json = await ctl(["orphans", "--json", ...s]);
  assert.equal(json.code, 0);
  assert.deepEqual((JSON.parse(json.stdout) as Orphans).findings, res.body.findings);
  const help = await ctl(["orphans", "--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /dry run/);
  assert.equal((await ctl(["orphans", "extra", ...s])).code, 2);

  // A report-mode orphan.found concerns no session; a reap-mode one starts its session's trail.
  const verify = await ctl(["audit", "verify", "--json", ...s], {}, d.lines.join(""));
  assert.equal(verify.code, 0, verify.stdout + verify.stderr);
  const report = JSON.parse(verify.stdout) as { complete: boolean; unknown: unknown[]; sessions: { reaped: number } };
  assert.equal(report.complete, true);
  assert.deepEqual(report.unknown, []);
  assert.equal(report.sessions.reaped, 1);
});

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}
