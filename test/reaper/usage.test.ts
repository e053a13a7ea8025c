import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import pidusage from "pidusage";
import { cgroup2Mount } from "../../src/proc/cgroup.js";
import { sleeper, startDaemon, tempDir, testConfig } from "../helpers.js";

type Usage = {
  cpuSec: number;
  peakMemoryBytes: number;
  peakMemorySource: string;
  peakProcesses: number;
  lifetimeSec: number;
};

for (const containment of ["auto", "none"] as const) {
  test(`what a session used is reported when it ends (containment ${containment})`, async (t) => {
    const dir = tempDir(t);
    const d = await startDaemon(t, testConfig(dir, { profiles: { default: { containment } } }));
    // An engine that burns about half a second of CPU, with a child, then waits.
    const engine = sleeper(t, "sh", ["-c", "sleep 300 & i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; wait"]);
    const reg = await d.api<{ id: string; containment: { kind: string } }>("POST", "/v1/sessions", {
      engine: { pid: engine.pid },
    });
    assert.equal(reg.status, 201);
    assert.equal(reg.body.containment.kind, containment === "auto" ? "cgroup" : "none");
    // Wait until the loop is done: its CPU is then what /proc says, on its own.
    let cpu = 0;
    for (let i = 0; i < 100; i++) {
      const u = await pidusage(engine.pid);
      if (u.ctime === cpu && cpu > 0) break;
      cpu = u.ctime;
      await new Promise((r) => setTimeout(r, 100));
    }
    const id = reg.body.id;
    await d.api("DELETE", `/v1/sessions/${id}`);
    const finished = await d.reaped(id);
    const usage = (finished.detail as { usage: Usage }).usage;
    const shown = (await d.api<{ usage: Usage }>("GET", `/v1/sessions/${id}`)).body.usage;
    assert.deepEqual(shown, usage);
    // Within a tick of what /proc counted for the shell (the cgroup counts a little more: the child's exec).
    assert.ok(usage.cpuSec >= cpu / 1000 - 0.02, `${usage.cpuSec} < ${cpu / 1000}`);
    assert.ok(usage.cpuSec < cpu / 1000 + 1, `${usage.cpuSec}`);
    assert.ok(usage.peakProcesses >= 2, JSON.stringify(usage));
    assert.ok(usage.peakMemoryBytes > 0, JSON.stringify(usage));
    // memory.peak needs the memory controller in the session's cgroup (pure v2 hosts with it
    // delegated); this machine's hybrid v2 tree has no controller, and an uncontained session
    // never has a cgroup of its own.
    const mount = cgroup2Mount();
    const memory = mount !== null && readFileSync(join(mount, "cgroup.subtree_control"), "latin1").includes("memory");
    assert.equal(usage.peakMemorySource, containment === "auto" && memory ? "memory.peak" : "rss-samples");
    assert.ok(usage.lifetimeSec > 0 && usage.lifetimeSec < 60, JSON.stringify(usage));
    const metrics = (await d.api<string>("GET", "/metrics")).body;
    assert.match(String(metrics), /^session_reaper_session_cpu_seconds_count\{profile="default"\} 1$/m);
  });
}
