import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { cgroup2Mount } from "../../src/proc/cgroup.js";
import { REAPERCTL, REAPERD, removeCgroupBaseAfter, tempDir, until } from "../helpers.js";

interface Ran {
  code: number | null;
  out: string;
}

/** Runs node `script` with `args` in `cwd` to its end (killed after `timeoutMs`). */
function run(script: string, args: string[], cwd: string, env: NodeJS.ProcessEnv = {}, timeoutMs = 20_000) {
  const proc = spawn(process.execPath, [script, ...args], { cwd, env: { ...process.env, ...env } });
  let out = "";
  proc.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
  proc.stderr.setEncoding("utf8").on("data", (d: string) => (out += d));
  const timer = setTimeout(() => proc.kill("SIGKILL"), timeoutMs);
  const done = new Promise<Ran>((r) =>
    proc.on("close", (code) => {
      clearTimeout(timer);
      r({ code, out });
    }),
  );
  return { proc, done, output: () => out };
}

/** A directory whose path is `length` bytes or more, made under `root`. */
function deepDir(root: string, length: number): string {
  let dir = root;
  while (dir.length < length) dir = join(dir, "a-rather-long-directory-name");
  mkdirSync(dir, { recursive: true });
  return dir;
}

const baseOf = (db: string): string | null => {
  const mount = cgroup2Mount();
  return mount === null
    ? null
    : join(mount, "session-reaper", createHash("sha256").update(db).digest("hex").slice(0, 8));
};

/**
 * A fresh clone in a deep directory: `npm start` there listens on ./reaper.sock, a path over
 * the kernel's 107 bytes. The daemon binds it by its name relative to the working directory
 * (the kernel would cut the absolute one short), gives it its mode, and reaperctl from the
 * same directory reaches it; stopped, it leaves no socket file. Before, the daemon exited 70
 * on chmod's ENOENT and left a truncated socket and its cgroup base.
 */
test("from a working directory deeper than a socket path may be, the daemon serves ./reaper.sock and reaperctl reaches it", async (t) => {
  const dir = deepDir(tempDir(t), 140);
  const socket = join(dir, "reaper.sock");
  assert.ok(Buffer.byteLength(socket) > 107, `${socket} is over the limit`);
  removeCgroupBaseAfter(t, join(dir, "reaper.db"));
  const daemon = run(REAPERD, [], dir, { REAPER_SOCKET: "", REAPER_CONFIG: "", REAPER_DB: "" }, 60_000);
  t.after(() => void daemon.proc.kill("SIGKILL"));
  await until(
    async () => {
      if (daemon.proc.exitCode !== null) throw new Error(`reaperd exited ${daemon.proc.exitCode}: ${daemon.output()}`);
      return (await run(REAPERCTL, ["status"], dir).done).code === 0;
    },
    20_000,
    "reaperctl status answered",
  );
  const status = await run(REAPERCTL, ["status"], dir).done;
  assert.match(status.out, /state\s+running/);
  assert.ok(statSync(socket).isSocket(), "the socket has its full name");
  assert.equal(statSync(socket).mode & 0o777, 0o660, "and its configured mode");
  // Nothing was bound under a name the kernel cut short.
  assert.deepEqual(
    readdirSync(dir).filter(
      (n) => n.startsWith("reaper") && !/^reaper\.(sock|db(-wal|-shm|\.lock|\.reserve)?)$/.test(n),
    ),
    [],
  );
  daemon.proc.kill("SIGTERM");
  const ended = await daemon.done;
  assert.equal(ended.code, 0, ended.out);
  assert.equal(existsSync(socket), false, "the socket is removed at stop");
});

/**
 * A socket path no name can reach is refused before anything is made: exit 78, the path, its
 * length, the limit and what to set named; no database, lock, log or cgroup base.
 */
test("a socket path over the kernel's limit stops the start with exit 78, naming the path, its length, the limit and the key", async (t) => {
  const dir = tempDir(t);
  const far = deepDir(join(dir, "far"), 130);
  const cwd = join(dir, "cwd");
  mkdirSync(cwd);
  const socket = join(far, "reaper.sock");
  const bytes = Buffer.byteLength(socket);

  const byEnv = await run(REAPERD, [], cwd, { REAPER_SOCKET: socket, REAPER_CONFIG: "", REAPER_DB: "" }).done;
  assert.equal(byEnv.code, 78, byEnv.out);
  assert.ok(byEnv.out.includes(socket), byEnv.out);
  assert.match(byEnv.out, new RegExp(`is ${bytes} bytes, longer than a unix socket path may be \\(107\\)`));
  assert.match(byEnv.out, /set REAPER_SOCKET to a shorter path/);

  const file = join(cwd, "config.toml");
  writeFileSync(file, `[api]\nsocket = "${socket}"\n[store]\npath = "${join(cwd, "reaper.db")}"\n`);
  const byConfig = await run(REAPERD, ["--config", file], cwd, { REAPER_SOCKET: "", REAPER_CONFIG: "", REAPER_DB: "" })
    .done;
  assert.equal(byConfig.code, 78, byConfig.out);
  assert.match(byConfig.out, /api\.socket: the socket path .* is \d+ bytes/);
  assert.match(byConfig.out, /set api\.socket \(or REAPER_SOCKET\) to a shorter path/);

  assert.deepEqual(readdirSync(cwd), ["config.toml"], "nothing made beside the config");
  assert.deepEqual(readdirSync(far), [], "nothing made where the socket would be");
  const base = baseOf(join(cwd, "reaper.db"));
  if (base !== null) assert.equal(existsSync(base), false, `no cgroup base ${base}`);
  // reaperctl names the same problem rather than a connect error of a path cut short.
  const ctl = await run(REAPERCTL, ["status"], cwd, { REAPER_SOCKET: socket }).done;
  assert.notEqual(ctl.code, 0);
  assert.ok(ctl.out.includes(socket), ctl.out);
});

/**
 * A listen that fails after the daemon started (here the socket's directory cannot be made:
 * a file has its name) stops that daemon as a graceful stop would (daemon.stopped logged,
 * the cgroup base removed), so the next start, with the path fixed, starts cleanly.
 */
test("a listen that fails leaves no lock, socket or cgroup base behind, and the next start succeeds", async (t) => {
  const dir = tempDir(t);
  writeFileSync(join(dir, "not-a-dir"), "");
  const db = join(dir, "reaper.db");
  removeCgroupBaseAfter(t, db);
  const file = join(dir, "config.toml");
  const write = (socket: string): void => writeFileSync(file, `[api]\nsocket = "${socket}"\n[store]\npath = "${db}"\n`);
  write(join(dir, "not-a-dir", "reaper.sock"));
  const env = { REAPER_SOCKET: "", REAPER_CONFIG: "", REAPER_DB: "" };
  const failed = await run(REAPERD, ["--config", file], dir, env).done;
  assert.equal(failed.code, 78, failed.out);
  assert.match(failed.out, /api\.socket: cannot make the directory .*not-a-dir \(EEXIST\)/);
  assert.match(failed.out, /"event":"daemon\.stopped"/);
  assert.equal(existsSync(join(dir, "not-a-dir", "reaper.sock")), false, "no socket file");
  const base = baseOf(db);
  if (base !== null) assert.equal(existsSync(base), false, `the cgroup base ${base} is removed`);

  write(join(dir, "reaper.sock"));
  const daemon = run(REAPERD, ["--config", file], dir, env, 60_000);
  t.after(() => void daemon.proc.kill("SIGKILL"));
  await until(
    async () => {
      if (daemon.proc.exitCode !== null) throw new Error(`reaperd exited ${daemon.proc.exitCode}: ${daemon.output()}`);
      return (await run(REAPERCTL, ["status"], dir, { REAPER_SOCKET: join(dir, "reaper.sock") }).done).code === 0;
    },
    20_000,
    "the next start serves",
  );
  daemon.proc.kill("SIGTERM");
  assert.equal((await daemon.done).code, 0);
});
