import assert from "node:assert/strict";
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { existsSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { fileURLToPath } from "node:url";
import { cgroup2Mount } from "../../src/proc/cgroup.js";
import {
  isGone,
  killIfSame,
  spawnDaemon,
  startTimeOf,
  startDaemon,
  tempDir,
  testConfig,
  until,
  writeConfig,
} from "../helpers.js";

// Every process an engine ever started is the session's, known from the kernel's process events
// (src/proc/lineage.ts): each reap below is judged from /proc by the test itself, never from the
// daemon's report alone. The engines (test/fixtures/lineage_engine.py) leave their tree the
// ways real ones do; what they leave runs under argv[0] = a marker of the test's own.

// Not compiled: from dist/test/reaper/ back to the source tree.
const FIXTURE = fileURLToPath(new URL("../../../test/fixtures/lineage_engine.py", import.meta.url));

type Finished = { outcome: string; detail: { verified: string[]; tracking: string; usage: Usage } };
type Usage = { cpuSec: number; peakMemoryBytes: number; peakProcesses: number };
type SessionJson = { tracking: string; leftovers: unknown[]; warnings?: { code: string; message: string }[] };

/** Live (not zombie) processes whose argv[0] is the marker, read from /proc. */
function marked(marker: string): number[] {
  const out: number[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const argv0 = readFileSync(`/proc/${name}/cmdline`, "latin1").split("\0")[0];
      if (argv0 === marker && !isGone(Number(name))) out.push(Number(name));
    } catch {
      // gone
    }
  }
  return out;
}

/** An engine of the fixture, without the session cookie (only lineage can follow it); all it left is killed after the test. */
function engine(t: TestContext, marker: string, ...args: string[]): ChildProcess & { pid: number } {
  const env = { ...process.env };
  delete env.REAPER_SESSION_ID;
  const child = spawn("python3", [FIXTURE, ...args], { stdio: "ignore", env });
  t.after(() => {
    child.kill("SIGKILL");
    for (const pid of marked(marker)) process.kill(pid, "SIGKILL");
  });
  if (child.pid === undefined) throw new Error("python3 did not start");
  return child as ChildProcess & { pid: number };
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function forkerScenario(t: TestContext, containment: "auto" | "none"): Promise<void> {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir, { profiles: { default: { grace_period_sec: 1, containment } } }));
  const marker = `lineage-forker-${containment}-${process.pid}`;
  const e = engine(t, marker, "forker", marker);
  // Registered after the engine started, as a gateway does: grandchildren born before the
  // registration have left its tree (re-parented to init, sessions of their own).
  await until(() => marked(marker).length >= 2, 10_000, "grandchildren born before the registration");
  const reg = await d.api<SessionJson & { containment: { kind: string } }>("POST", "/v1/sessions", {
    id: `forker-${containment}`,
    engine: { pid: e.pid },
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  assert.equal(reg.body.tracking, "lineage");
  assert.equal(reg.body.warnings, undefined);
  assert.equal(reg.body.containment.kind, containment === "none" ? "none" : "cgroup");
  await sleep(300); // more grandchildren, born after the registration
  assert.equal((await d.api("POST", `/v1/sessions/forker-${containment}/reap`)).status, 202);
  const finished = (await d.reaped(`forker-${containment}`)) as unknown as Finished;
  // From /proc, on its own: nothing the engine started is alive.
  await until(() => marked(marker).length === 0, 5_000, "every grandchild gone").catch(() => undefined);
  assert.deepEqual(marked(marker), [], "grandchildren outlived a clean reap");
  assert.ok(isGone(e.pid));
  assert.equal(finished.outcome, "clean", JSON.stringify(finished.detail));
  assert.equal(finished.detail.tracking, "lineage");
  assert.ok(finished.detail.verified.includes("lineage"), JSON.stringify(finished.detail.verified));
}

test("escaped before registration, contained: every double-forked grandchild dies, and clean is true", async (t) => {
  await forkerScenario(t, "auto");
});

test("the same forker uncontained (containment = none): every grandchild dies, and clean is true", async (t) => {
  await forkerScenario(t, "none");
});

test("uncontained short-lived engine: the setsid child it started 0.2 s before it was killed dies with the reap", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir, { profiles: { default: { containment: "none" } } }));
  const marker = `lineage-popen-${process.pid}`;
  const gate = join(dir, "gate");
  const e = engine(t, marker, "popen", marker, gate);
  const reg = await d.api<SessionJson>("POST", "/v1/sessions", { id: "popen", engine: { pid: e.pid } });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  writeFileSync(gate, "");
  await until(() => marked(marker).length === 1, 10_000, "the setsid child");
  await sleep(200);
  e.kill("SIGKILL");
  const finished = (await d.reaped("popen")) as unknown as Finished & { reason: string };
  assert.equal(finished.reason, "engine_gone");
  await until(() => marked(marker).length === 0, 5_000, "the child gone").catch(() => undefined);
  assert.deepEqual(marked(marker), [], "the setsid child outlived a clean reap");
  assert.equal(finished.outcome, "clean", JSON.stringify(finished.detail));
  assert.equal(finished.detail.tracking, "lineage");
});

test("moved out of its cgroup, then orphaned: the setsid grandchild still dies, and clean is true", async (t) => {
  const mount = cgroup2Mount();
  assert.ok(mount !== null, "this host has a cgroup v2 tree");
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  const marker = `lineage-moved-${process.pid}`;
  const gate = join(dir, "gate");
  const e = engine(t, marker, "family", marker, gate);
  const reg = await d.api<SessionJson & { containment: { kind: string; path: string } }>("POST", "/v1/sessions", {
    id: "moved",
    engine: { pid: e.pid },
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  assert.equal(reg.body.containment.kind, "cgroup");
  writeFileSync(gate, "");
  await until(() => existsSync(`${gate}.pids`), 10_000, "the family");
  const pids = readFileSync(`${gate}.pids`, "utf8").split(" ").map(Number);
  assert.equal(pids.length, 3);
  // Born inside the session's cgroup; then all three moved to the root cgroup, as a confused
  // operator or another manager might.
  const procs = readFileSync(join(reg.body.containment.path, "cgroup.procs"), "utf8");
  for (const pid of pids) assert.ok(procs.split("\n").includes(String(pid)), `${pid} born outside the cgroup`);
  for (const pid of pids) writeFileSync(join(mount, "cgroup.procs"), String(pid));
  assert.equal(readFileSync(join(reg.body.containment.path, "cgroup.procs"), "utf8").trim(), "");
  // The child exits: the grandchild, outside the cgroup, is init's now (no walk of /proc ties
  // it to the engine any more).
  const [, child, grandchild] = pids as [number, number, number];
  writeFileSync(`${gate}.moved`, "");
  await until(() => isGone(child), 5_000, "the child exits");
  assert.equal(Number(readFileSync(`/proc/${grandchild}/stat`, "latin1").split(") ")[1]?.split(" ")[1]), 1);
  assert.equal((await d.api("POST", "/v1/sessions/moved/reap")).status, 202);
  const finished = (await d.reaped("moved")) as unknown as Finished;
  await until(() => pids.every(isGone), 5_000, "the family gone").catch(() => undefined);
  assert.deepEqual(
    pids.filter((p) => !isGone(p)),
    [],
    "a process that left the cgroup outlived a clean reap",
  );
  assert.equal(finished.outcome, "clean", JSON.stringify(finished.detail));
  assert.equal(finished.detail.tracking, "lineage");
});

test("lineage holds through 10 generations of setsid double forks, each exiting before the registration", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir, { profiles: { default: { containment: "none" } } }));
  const marker = `lineage-chain-${process.pid}`;
  const e = engine(t, marker, "chain", marker, "10");
  await until(() => marked(marker).length === 1, 10_000, "the 10th generation");
  const last = marked(marker)[0] as number;
  // Its parent is init: no walk of /proc ties it to the engine.
  assert.equal(Number(readFileSync(`/proc/${last}/stat`, "latin1").split(") ")[1]?.split(" ")[1]), 1);
  const reg = await d.api<SessionJson>("POST", "/v1/sessions", { id: "chain", engine: { pid: e.pid } });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  assert.equal(reg.body.tracking, "lineage");
  assert.equal((await d.api("POST", "/v1/sessions/chain/reap")).status, 202);
  const finished = (await d.reaped("chain")) as unknown as Finished;
  await until(() => isGone(last), 5_000, "the 10th generation gone").catch(() => undefined);
  assert.ok(isGone(last), "the 10th generation outlived the reap");
  assert.equal(finished.outcome, "clean", JSON.stringify(finished.detail));
});

test("a recycled pid is not a member: a process born under an exited member's pid outlives the reap", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir, { profiles: { default: { containment: "none" } } }));
  const e = spawn("sh", ["-c", "sleep 0.5 & echo $!; wait; exec sleep 600"], { stdio: ["ignore", "pipe", "ignore"] });
  t.after(() => void e.kill("SIGKILL"));
  const reg = await d.api<SessionJson>("POST", "/v1/sessions", { id: "recycled", engine: { pid: e.pid } });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  let out = "";
  e.stdout?.setEncoding("utf8").on("data", (s: string) => (out += s));
  await until(() => out.includes("\n"), 5_000, "the member's pid");
  const member = Number(out.trim());
  await until(() => isGone(member), 5_000, "the member exits");
  // A stranger born under that pid (ns_last_pid), outside the session: retried until it gets it.
  let stranger: ChildProcess | undefined;
  for (let i = 0; i < 50 && stranger === undefined; i++) {
    const pid = Number(
      execFileSync("python3", [
        "-c",
        `import os\nopen('/proc/sys/kernel/ns_last_pid','w').write('${member - 1}')\npid=os.fork()\nif pid==0:\n  n=os.open('/dev/null',os.O_RDWR)\n  [os.dup2(n,f) for f in (0,1,2)]\n  os.setsid(); os.execvp('sleep',['sleep','600'])\nprint(pid)`,
      ])
        .toString()
        .trim(),
    );
    assert.ok(Number.isInteger(pid) && pid > 1, `the stranger's pid: ${pid}`);
    if (pid === member) stranger = { pid, kill: () => process.kill(pid, "SIGKILL") } as unknown as ChildProcess;
    else process.kill(pid, "SIGKILL");
  }
  assert.ok(stranger !== undefined, "no stranger got the member's pid");
  t.after(() => void stranger?.kill("SIGKILL"));
  assert.equal((await d.api("POST", "/v1/sessions/recycled/reap")).status, 202);
  const finished = (await d.reaped("recycled")) as unknown as Finished;
  assert.equal(isGone(member), false, "the stranger under a recycled pid was killed");
  assert.ok(isGone(e.pid as number));
  assert.equal(finished.outcome, "clean", JSON.stringify(finished.detail));
});

test("usage is the whole session's: CPU of members that exited (reaped by the engine or by init) and the memory of the living", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir, { profiles: { default: { containment: "none" } } }));
  const out = join(dir, "usage");
  execFileSync("mkdir", [out]);
  const marker = `lineage-usage-${process.pid}`;
  const e = engine(t, marker, "usage", out);
  const reg = await d.api<SessionJson>("POST", "/v1/sessions", { id: "usage", engine: { pid: e.pid } });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  await until(() => existsSync(join(out, "done")), 30_000, "the workload");
  // The independent measurement: each process's own CPU, as it read it from the kernel.
  const each = readdirSync(out)
    .filter((n) => n.startsWith("cpu."))
    .map((n) => `${n}=${readFileSync(join(out, n), "utf8")}`);
  const reported = each.reduce((sum, n) => sum + Number(n.split("=")[1]), 0);
  assert.ok(reported >= 2.4, `the workload burned ${reported} s`);
  assert.equal((await d.api("POST", "/v1/sessions/usage/reap")).status, 202);
  const finished = (await d.reaped("usage")) as unknown as Finished;
  const usage = finished.detail.usage;
  // Clock ticks are 10 ms, and each process's exit costs a little: within 8 % (and 0.15 s).
  // A count that misses the grandchild init reaped is 1.0 s short.
  assert.ok(
    Math.abs(usage.cpuSec - reported) <= Math.max(0.15, reported * 0.08),
    `cpuSec ${usage.cpuSec} against ${reported} measured by the processes themselves (${each.join(" ")}): ${JSON.stringify(finished.detail)}`,
  );
  assert.ok(usage.peakMemoryBytes >= 80 * 1024 * 1024, `peakMemoryBytes ${usage.peakMemoryBytes}`);
  assert.ok(usage.peakProcesses >= 2, `peakProcesses ${usage.peakProcesses}`);
});

test("without the connector (no CAP_NET_ADMIN): snapshots, a warning, the daemon says why, and today's reaps", async (t) => {
  const dir = tempDir(t);
  const socket = join(dir, "reaper.sock");
  const config = writeConfig(
    dir,
    `[api]\nsocket = "${socket}"\n[store]\npath = "${join(dir, "reaper.db")}"\n[profiles.default]\ncontainment = "none"\ngrace_period_sec = 1\nallowed_roots = ["${dir}"]\n`,
  );
  // Root without CAP_NET_ADMIN in its bounding set: the kernel refuses the connector's group.
  const daemon = await spawnDaemon(t, config, socket, {}, ["setpriv", "--bounding-set=-net_admin", "--"]);
  const { callApi } = await import("../../src/client/transport.js");
  const info = await callApi<{ lineage: { available: boolean; why?: string } }>(socket, "GET", "/v1/daemon");
  assert.equal(info.body.lineage.available, false);
  assert.match(info.body.lineage.why ?? "", /CAP_NET_ADMIN/);
  const started = daemon
    .output()
    .split("\n")
    .find((l) => l.includes('"daemon.started"'));
  assert.match(started ?? "", /"lineage":\{"available":false,"why":"[^"]*CAP_NET_ADMIN/);
  const metrics = await callApi<string>(socket, "GET", "/metrics");
  assert.match(String(metrics.body), /^session_reaper_lineage_available 0$/m);
  const e = spawn("sh", ["-c", "sleep 600 & wait"], { stdio: "ignore" });
  t.after(() => void e.kill("SIGKILL"));
  await until(() => readFileSync(`/proc/${e.pid}/task/${e.pid}/children`, "latin1").trim() !== "", 5_000, "child");
  const child = Number(readFileSync(`/proc/${e.pid}/task/${e.pid}/children`, "latin1").trim());
  const childStart = startTimeOf(child);
  t.after(() => killIfSame(child, childStart));
  const reg = await callApi<SessionJson>(socket, "POST", "/v1/sessions", { id: "nolineage", engine: { pid: e.pid } });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  assert.equal(reg.body.tracking, "snapshots");
  assert.equal(reg.body.warnings?.[0]?.code, "SR_TRACKING_WEAKER_THAN_LINEAGE");
  assert.match(reg.body.warnings?.[0]?.message ?? "", /lineage is unavailable on this host/);
  assert.equal((await callApi(socket, "POST", "/v1/sessions/nolineage/reap")).status, 202);
  await until(
    async () => (await callApi<{ state: string }>(socket, "GET", "/v1/sessions/nolineage")).body.state === "reaped",
    15_000,
    "reaped",
  );
  const s = (await callApi<SessionJson & { outcome: string }>(socket, "GET", "/v1/sessions/nolineage")).body;
  assert.ok(isGone(e.pid as number) && isGone(child), "today's walks still end the tree");
  assert.equal(s.outcome, "clean");
  assert.equal(s.tracking, "snapshots");
});
