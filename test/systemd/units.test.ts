import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { DEFAULTS } from "../../src/config/schema.js";

const SYSTEMD = fileURLToPath(new URL("../../../systemd/", import.meta.url));
const SERVICE = `${SYSTEMD}session-reaper.service`;
const SOCKET = `${SYSTEMD}session-reaper.socket`;

test("systemd-analyze verify prints nothing for the service and the socket", () => {
  const r = spawnSync("systemd-analyze", ["verify", SERVICE, SOCKET], { encoding: "utf8", cwd: SYSTEMD });
  assert.equal(r.error, undefined, "systemd-analyze is missing: .ci/run installs the systemd package");
  assert.equal(`${r.stdout}${r.stderr}`, "", "any output is a failure");
  assert.equal(r.status, 0);
});

// 3.0 before lineage; CAP_NET_ADMIN and AF_NETLINK (the process events connector) cost 0.2.
test("systemd-analyze security --offline: exposure at most 3.2, the figure README states", (t) => {
  const out = execFileSync("systemd-analyze", ["security", "--offline=true", SERVICE], { encoding: "utf8" });
  const m = /Overall exposure level for session-reaper\.service: ([\d.]+)/.exec(out);
  assert.ok(m, out);
  const exposure = Number(m[1]);
  t.diagnostic(`exposure ${exposure}`);
  process.stdout.write(`# systemd-analyze security exposure: ${exposure}\n`);
  assert.ok(exposure <= 3.2, `exposure ${exposure} > 3.2`);
  // The figure README gives is the one measured.
  const readme = readFileSync(fileURLToPath(new URL("../../../README.md", import.meta.url)), "utf8");
  const stated = /exposure ([\d.]+) by `systemd-analyze security --offline=true`/.exec(readme);
  assert.ok(stated, "README states the exposure and the command");
  assert.equal(Number(stated[1]), exposure, "README's exposure figure is the measured one");
});

test("the unit keeps its promises to the daemon", () => {
  const unit = readFileSync(SERVICE, "utf8");
  const get = (key: string): string[] =>
    unit
      .split("\n")
      .filter((l) => l.startsWith(`${key}=`))
      .map((l) => l.slice(key.length + 1));
  assert.deepEqual(get("Type"), ["notify"]);
  // Sessions' cgroups live inside the delegated unit cgroup: stopping the daemon must not kill them.
  assert.deepEqual(get("Delegate"), ["yes"]);
  assert.deepEqual(get("KillMode"), ["process"]);
  assert.deepEqual(get("LimitNOFILE"), ["65536"]);
  // Longer than the daemon's own stop: shutdown grace + the 5 s forced-exit margin.
  const stopSec = Number(/^(\d+)s$/.exec(get("TimeoutStopSec")[0] ?? "")?.[1]);
  assert.ok(stopSec > DEFAULTS.reaper.shutdown_grace_sec + 5 + 10, `TimeoutStopSec=${stopSec}s`);
  assert.deepEqual(get("RestartPreventExitStatus"), ["78"]);
  // SIGHUP reopens the log file (src/main.ts): what logrotate's postrotate and systemctl reload send.
  assert.deepEqual(get("ExecReload"), ["/bin/kill -HUP $MAINPID"]);
  for (const forbidden of ["PrivateUsers", "ProtectProc", "PrivateTmp", "MemoryDenyWriteExecute"]) {
    assert.deepEqual(get(forbidden), [], `${forbidden}= breaks the job`);
    assert.match(unit, new RegExp(`^# ${forbidden}=`, "m"), `the reason for omitting ${forbidden}= is written down`);
  }
  const sock = readFileSync(SOCKET, "utf8");
  assert.match(sock, /^SocketMode=0660$/m);
  assert.match(sock, /^SocketGroup=session-reaper$/m);
  assert.match(sock, /^ListenStream=\/run\/session-reaper\/reaper\.sock$/m);
});
