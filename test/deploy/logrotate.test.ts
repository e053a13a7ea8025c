import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { callApi } from "../../src/client/transport.js";
import { register } from "../faults/lib.js";
import { sleeper, spawnDaemon, tempDir, until, writeDaemonConfig } from "../helpers.js";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
const SNIPPET = join(ROOT, "deploy/logrotate/session-reaper");
const LOG_PATH = "/var/log/session-reaper/reaper.log";

test("deploy/logrotate/session-reaper rotates a running daemon's log with Debian's logrotate: nothing lost, the daemon lives on", async (t) => {
  const text = readFileSync(SNIPPET, "utf8");
  // What the snippet names is what the example configuration and the unit give.
  assert.ok(text.includes(`${LOG_PATH} {`));
  assert.ok(readFileSync(join(ROOT, "systemd/config.example.toml"), "utf8").includes(LOG_PATH));
  assert.match(readFileSync(join(ROOT, "systemd/session-reaper.service"), "utf8"), /^LogsDirectory=session-reaper$/m);
  assert.match(text, /postrotate\n\s+systemctl reload session-reaper\.service/);

  const dir = tempDir(t);
  const log = join(dir, "reaper.log");
  const { file, socket } = writeDaemonConfig(
    dir,
    `[log]\nlevel = "info"\nfile = "${log}"\n[profiles.default]\nallowed_roots = ["${dir}"]\n`,
  );
  const daemon = await spawnDaemon(t, file, socket);
  assert.equal((await register(socket, "before", sleeper(t).pid)).status, 201);
  // The snippet as installed on this host: the test's log file, root's user (the service user
  // does not exist here), and the daemon's pid where systemctl would send SIGHUP.
  const conf = join(dir, "logrotate.conf");
  writeFileSync(
    conf,
    text
      .replace(LOG_PATH, log)
      .replace("create 0640 session-reaper session-reaper", "create 0640 root root")
      .replace(/systemctl reload session-reaper\.service[^\n]*/, `kill -HUP ${daemon.proc.pid as number}`),
  );
  execFileSync("logrotate", ["--state", join(dir, "logrotate.state"), "--force", conf]);
  await until(
    () => existsSync(log) && readFileSync(log, "utf8").includes('"msg":"log file reopened"'),
    10_000,
    "the daemon reopened its log",
  );
  assert.equal(daemon.proc.exitCode, null, daemon.output().slice(-2000));
  assert.equal((await register(socket, "after", sleeper(t).pid)).status, 201);
  assert.equal((await callApi(socket, "GET", "/readyz")).status, 200);
  // delaycompress: the first rotation is kept as it is, the next one compresses it.
  const rotated = readFileSync(`${log}.1`, "utf8");
  assert.match(rotated, /"event":"session.registered".*"sessionId":"before"/);
  assert.doesNotMatch(rotated, /"sessionId":"after"/);
  await until(() => readFileSync(log, "utf8").includes('"sessionId":"after"'), 5_000, "the new file takes lines");
  daemon.proc.kill("SIGTERM");
  assert.equal(await daemon.exit, 0);
});
