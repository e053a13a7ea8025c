import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import type { RecordedAuditEvent } from "../../src/audit/audit.js";
import { someAvg10 } from "../../src/detect/pressure.js";
import { isGone, sleeper, startDaemon, tempDir, testConfig, until, type TestDaemon } from "../helpers.js";

/** /proc/pressure/memory's format, as the kernel writes it. */
function psi(avg10: number): string {
  return (
    `some avg10=${avg10.toFixed(2)} avg60=${(avg10 / 2).toFixed(2)} avg300=0.50 total=123456789\n` +
    `full avg10=${(avg10 / 3).toFixed(2)} avg60=1.00 avg300=0.10 total=2345678\n`
  );
}

test("someAvg10 reads the kernel's format", () => {
  assert.equal(someAvg10(psi(61.5)), 61.5);
  assert.equal(someAvg10("full avg10=3.00 avg60=0.00 avg300=0.00 total=0\n"), null);
  assert.equal(someAvg10(""), null);
});

/** A python process holding `mb` MiB resident (spinning a core if `spin`); killed at the test's end. */
async function hog(t: { after: (fn: () => void) => void }, mb: number, spin = false): Promise<number> {
  const code = `import time\nb = b"x" * (${mb} << 20)\nprint("ready", flush=True)\n${spin ? "while True: pass" : "time.sleep(600)"}\n`;
  const child = spawn("/usr/bin/python3", ["-c", code], { stdio: ["ignore", "pipe", "inherit"] });
  t.after(() => void child.kill("SIGKILL"));
  await new Promise<void>((resolve, reject) => {
    child.stdout.setEncoding("utf8").once("data", () => resolve());
    child.once("exit", (c) => reject(new Error(`hog exited with ${c}`)));
  });
  return child.pid as number;
}

async function register(d: TestDaemon, id: string, pid: number, profile = "default"): Promise<void> {
  const res = await d.api("POST", "/v1/sessions", { id, engine: { pid }, profile });
  assert.equal(res.status, 201, JSON.stringify(res.body));
}

const expiredBy = (e: RecordedAuditEvent): boolean => e.event === "session.expired" && e.reason === "memory_pressure";

test("under memory pressure the largest idle session is reclaimed first, then the next; busy ones never", async (t) => {
  const dir = tempDir(t);
  const file = join(dir, "memory.pressure");
  writeFileSync(file, psi(0));
  const d = await startDaemon(
    t,
    testConfig(dir, {
      detect: { liveness_schedule: "* * * * * *" },
      pressure: {
        file,
        some_avg10: 40,
        duration_sec: 0.5,
        cooldown_sec: 1,
        spare_active_sec: 1,
        spare_cpu_percent: 10,
      },
      profiles: { default: { heartbeat_timeout_sec: 60, idle_timeout_sec: 600 } },
    }),
  );
  const small = sleeper(t, "sleep", ["600"]).pid;
  const large = await hog(t, 80);
  const spinning = await hog(t, 150, true); // larger, busy by its CPU
  const active = await hog(t, 200); // larger, busy by its heartbeats
  await register(d, "small", small);
  await register(d, "large", large);
  await register(d, "spinning", spinning);
  await register(d, "active", active);
  let beating = true;
  const beats = (async () => {
    while (beating) {
      await d.api("POST", "/v1/sessions/active/heartbeat", { activity: "busy" });
      await new Promise((r) => setTimeout(r, 200));
    }
  })();
  t.after(async () => {
    beating = false;
    await beats;
  });
  // No pressure: nothing is taken, however idle.
  await new Promise((r) => setTimeout(r, 2000));
  assert.equal(d.daemon.store.getSession("large")?.state, "live");

  writeFileSync(file, psi(65));
  const first = await d.waitFor(expiredBy, 15_000);
  assert.equal(first.sessionId, "large");
  const detail = first.detail as { someAvg10: number; rssBytes: number; warned: boolean; threshold: number };
  assert.equal(detail.someAvg10, 65);
  assert.equal(detail.threshold, 40);
  assert.equal(detail.warned, false);
  assert.ok(detail.rssBytes >= 80 << 20, `rss ${detail.rssBytes}`);
  const reaped = await d.reaped("large");
  assert.equal(reaped.outcome, "clean");
  assert.ok(isGone(large), "the reclaimed engine is gone");

  // After the cooldown, pressure still holds: the next idle one, however small.
  const second = await d.waitFor((e) => expiredBy(e) && e.sessionId !== "large", 15_000);
  assert.equal(second.sessionId, "small");
  assert.ok(second.at - first.at >= 1000, "the cooldown holds between two reclaims");
  await d.reaped("small");

  // Nothing idle is left: the busy ones are spared while pressure goes on.
  await new Promise((r) => setTimeout(r, 3000));
  for (const id of ["spinning", "active"]) assert.equal(d.daemon.store.getSession(id)?.state, "live", id);
  assert.ok(!isGone(spinning) && !isGone(active));
  const taken = d.daemon.store
    .sessionsInState("reaped")
    .filter((s) => s.reason === "memory_pressure")
    .map((s) => s.id)
    .sort();
  assert.deepEqual(taken, ["large", "small"]);
  writeFileSync(file, psi(0));
});

test("a profile that warns is warned before a reclaim, and activity meanwhile spares it", async (t) => {
  const dir = tempDir(t);
  const file = join(dir, "memory.pressure");
  writeFileSync(file, psi(0));
  const d = await startDaemon(
    t,
    testConfig(dir, {
      pressure: { file, some_avg10: 40, duration_sec: 0.2, cooldown_sec: 0, spare_active_sec: 1 },
      profiles: { default: { heartbeat_timeout_sec: 60, idle_timeout_sec: 600, warn_before_sec: 1 } },
    }),
  );
  const large = await hog(t, 80);
  await register(d, "large", large);
  await register(d, "small", sleeper(t, "sleep", ["600"]).pid);
  await new Promise((r) => setTimeout(r, 1200)); // both idle for spare_active_sec
  writeFileSync(file, psi(70));

  // The largest is warned first; a busy heartbeat within the warning spares it.
  const warned = await d.waitFor((e) => e.event === "session.warning" && e.reason === "memory_pressure", 15_000);
  assert.equal(warned.sessionId, "large");
  assert.equal((warned.detail as { inSec: number }).inSec, 1);
  const shown = await d.api<{ warning: { reason: string } | null }>("GET", "/v1/sessions/large");
  assert.equal(shown.body.warning?.reason, "memory_pressure");
  assert.equal((await d.api("POST", "/v1/sessions/large/heartbeat", { activity: "busy" })).status, 200);
  assert.equal((await d.api<{ warning: unknown }>("GET", "/v1/sessions/large")).body.warning, null);
  let beating = true; // and it stays busy from now on
  const beats = (async () => {
    while (beating) {
      await d.api("POST", "/v1/sessions/large/heartbeat", { activity: "busy" });
      await new Promise((r) => setTimeout(r, 200));
    }
  })();
  t.after(async () => {
    beating = false;
    await beats;
  });

  // Then the small one, idle, is warned and taken when its warning's time comes.
  const next = await d.waitFor((e) => e.event === "session.warning" && e.sessionId === "small", 15_000);
  const taken = await d.waitFor(expiredBy, 15_000);
  writeFileSync(file, psi(0));
  assert.equal(taken.sessionId, "small");
  assert.equal((taken.detail as { warned: boolean }).warned, true);
  assert.ok(taken.at - next.at >= 1000 - 5, "taken once the warning's second has passed");
  await until(() => d.daemon.store.getSession("small")?.state === "reaped", 10_000);
  assert.equal(d.daemon.store.getSession("large")?.state, "live", "the warned session that became active is spared");
});

/**
 * Real memory pressure: a memory cgroup of its own (v1 `memory.limit_in_bytes` here, v2
 * `memory.max` on a pure v2 host with the memory controller) 32 MiB large, in which a reader
 * thrashes a 256 MiB file's page cache: every read reclaims, and the kernel counts those stalls
 * in /proc/pressure/memory. Torn down (the reader's group killed, the cgroup removed) however
 * the test ends.
 */
function thrash(t: { after: (fn: () => void) => void }, dir: string): void {
  const v1 = "/sys/fs/cgroup/memory";
  const v2 = "/sys/fs/cgroup";
  const cg = existsSync(join(v1, "memory.limit_in_bytes"))
    ? join(v1, `sr-test-psi-${process.pid}`)
    : existsSync(join(v2, "cgroup.subtree_control")) &&
        readFileSync(join(v2, "cgroup.subtree_control"), "utf8").includes("memory")
      ? join(v2, `sr-test-psi-${process.pid}`)
      : null;
  assert.ok(
    cg !== null,
    "this host offers no memory cgroup to make pressure in (neither v1 memory nor v2 with the memory controller)",
  );
  mkdirSync(cg);
  writeFileSync(join(cg, cg.startsWith(v1) ? "memory.limit_in_bytes" : "memory.max"), String(32 << 20));
  const file = join(dir, "thrashed");
  // Written around the page cache (O_DIRECT): cached, its pages would be charged to the test's
  // cgroup, and the reader's would find them there without ever reclaiming.
  const made = spawnSync("dd", ["if=/dev/zero", `of=${file}`, "bs=1M", "count=256", "oflag=direct", "status=none"]);
  assert.equal(made.status, 0, "the file to thrash");
  const reader = spawn(
    "/bin/sh",
    ["-c", `echo $$ > "$1/cgroup.procs" && while :; do cat "$2" > /dev/null; done`, "sh", cg, file],
    {
      detached: true,
      stdio: "ignore",
    },
  );
  t.after(() => {
    try {
      process.kill(-(reader.pid as number), "SIGKILL");
    } catch {
      // gone
    }
    for (let i = 0; i < 100; i++) {
      try {
        rmdirSync(cg);
        return;
      } catch {
        spawnSync("sleep", ["0.05"]);
      }
    }
  });
}

test("real memory pressure (a memory cgroup thrashing its page cache) read from /proc/pressure/memory reclaims the largest idle session", async (t) => {
  const dir = tempDir(t, "sr-test-psi-");
  const before = someAvg10(readFileSync("/proc/pressure/memory", "utf8"));
  assert.ok(before !== null, "/proc/pressure/memory (PSI) is readable on this host");
  const d = await startDaemon(
    t,
    testConfig(dir, {
      pressure: { some_avg10: Math.max(0.3, before + 0.3), duration_sec: 1, cooldown_sec: 600, spare_active_sec: 1 },
      profiles: { default: { heartbeat_timeout_sec: 120, idle_timeout_sec: 600 } },
    }),
  );
  const large = await hog(t, 80);
  await register(d, "large", large);
  await register(d, "small", sleeper(t, "sleep", ["600"]).pid);
  thrash(t, dir);
  const taken = await d.waitFor(expiredBy, 60_000).catch((err: unknown) => {
    t.diagnostic(JSON.stringify(d.daemon.store.sessionsInState("reaped").map((s) => [s.id, s.reason, s.leftovers])));
    t.diagnostic(readFileSync("/proc/pressure/memory", "utf8"));
    t.diagnostic(
      d.lines
        .filter((l) => !l.includes('"audit":true'))
        .join("")
        .slice(-3000),
    );
    throw err;
  });
  const detail = taken.detail as { someAvg10: number; threshold: number; file: string };
  t.diagnostic(`reclaimed at some avg10 = ${detail.someAvg10} (threshold ${detail.threshold})`);
  assert.equal(taken.sessionId, "large");
  assert.equal(detail.file, "/proc/pressure/memory");
  assert.ok(detail.someAvg10 >= detail.threshold);
  const reaped = await d.reaped("large");
  assert.equal(reaped.outcome, "clean");
  assert.ok(isGone(large));
  assert.equal(d.daemon.store.getSession("small")?.state, "live", "one at a time: the cooldown holds");
});
