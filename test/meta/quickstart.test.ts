import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import {
  copyFileSync,
  existsSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  realpathSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { callApi } from "../../src/client/transport.js";
import type { Session } from "../../src/client/index.js";
import { isGone, killIfSame, portFree, removeCgroupBaseAfter, until } from "../helpers.js";

const ROOT = fileURLToPath(new URL("../../../", import.meta.url));

/** The text under `heading` in `markdown`, up to the next `## ` heading. */
function section(markdown: string, heading: string): string {
  const start = markdown.indexOf(`\n${heading}\n`);
  assert.notEqual(start, -1, `README.md has no "${heading}" section`);
  const rest = markdown.slice(start + heading.length + 2);
  const end = rest.search(/^## /m);
  return end === -1 ? rest : rest.slice(0, end);
}

/** The command lines of each ```sh block, as typed: continuations joined, blanks and comment lines dropped. */
function shellBlocks(text: string): string[][] {
  return [...text.matchAll(/^```sh\n([\s\S]*?)^```$/gm)].map((m) =>
    (m[1] ?? "")
      .replace(/\\\n/g, "")
      .split("\n")
      .map((l) => l.trim())
      .filter((l) => l !== "" && !l.startsWith("#")),
  );
}

/** A line as bash runs it, without its trailing comment. */
function command(line: string): string {
  return line.replace(/\s+#\s.*$/, "");
}

/** Whether a TCP connect to 127.0.0.1:port is refused (nobody listens). */
function refused(port: number): Promise<boolean> {
  return new Promise((done) => {
    const s = connect({ host: "127.0.0.1", port });
    s.once("connect", () => {
      s.destroy();
      done(false);
    });
    s.once("error", (e: NodeJS.ErrnoException) => done(e.code === "ECONNREFUSED"));
  });
}

/** Sends a signal to a process group, ignoring one already gone. */
function killGroup(child: ChildProcess | undefined, signal: NodeJS.Signals): void {
  if (child?.pid === undefined) return;
  try {
    process.kill(-child.pid, signal);
  } catch {
    // gone
  }
}

// A newcomer's first ten minutes: README's Quick start, pasted line by line. The first
// shell's `npm start` runs in the background here; the second shell's lines go, in order,
// to one bash (so `ID=$(…)` carries over), each waited for and required to exit 0. The
// directory stands for the clone: package.json, and the repository's dist/ and
// node_modules/ (already installed, so `npm ci` is only checked to be there), so that the
// daemon's ./reaper.sock and ./reaper.db land in it, not in the repository.
test("README's Quick start works as written, line by line", async (t) => {
  const readme = readFileSync(join(ROOT, "README.md"), "utf8");
  const blocks = shellBlocks(section(readme, "## Quick start"));
  assert.equal(blocks.length, 2, "the Quick start has two ```sh blocks: the daemon's shell and the second shell");
  const [first = [], second = []] = blocks;
  assert.equal(first.length, 2, `the first shell runs npm ci, then npm start: ${JSON.stringify(first)}`);
  assert.match(first[0] ?? "", /^npm ci(\s|$)/);
  assert.match(first[1] ?? "", /^npm start(\s|$)/);
  const runLine = second.find((l) => /^npx reaperctl run\b.*&$/.test(command(l)));
  assert.ok(runLine !== undefined, `the second shell starts a session in the background: ${JSON.stringify(second)}`);
  const port = Number(/--port (\d+)/.exec(runLine)?.[1]);
  const path = /--path (\S+)/.exec(runLine)?.[1];
  assert.ok(port > 0, `the run line names a --port: ${runLine}`);
  assert.ok(
    second.some((l) => /^npx reaperctl reap\b/.test(command(l))),
    "the second shell reaps the session",
  );

  // What the Quick start takes for granted on a fresh host.
  assert.ok(await portFree(port), `port ${port} is in use on this host: the Quick start's server needs it`);
  assert.ok(path === undefined || !existsSync(path), `${path} exists: the Quick start would reap (delete) it`);

  const scratch = realpathSync(mkdtempSync(join(tmpdir(), "sr-quickstart-")));
  copyFileSync(join(ROOT, "package.json"), join(scratch, "package.json"));
  symlinkSync(join(ROOT, "dist"), join(scratch, "dist"));
  symlinkSync(join(ROOT, "node_modules"), join(scratch, "node_modules"));
  const socket = join(scratch, "reaper.sock");

  // A newcomer's shell: no npm lifecycle variables, no reaperd settings, no test runner.
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (!/^(npm_|REAPER_|INIT_CWD$|NODE_TEST_CONTEXT$|BASH_ENV$|LISTEN_|NOTIFY_SOCKET$|[A-Z]+_DIRECTORY$)/.test(k))
      env[k] = v;
  }
  Object.assign(env, {
    // npx links the clone into its cache on first use and would run the package's prepare
    // and install scripts there (tsc, node-gyp): this directory holds no sources to build,
    // and the repository is built already. Its own cache, offline: nothing is left in ~/.npm.
    npm_config_ignore_scripts: "true",
    npm_config_cache: join(scratch, ".npm"),
    npm_config_offline: "true",
    npm_config_update_notifier: "false",
    npm_config_fund: "false",
    npm_config_audit: "false",
  });
  // A host running the service: reaperctl would prefer its socket (README says to add
  // --socket ./reaper.sock), and the daemon would read its config file.
  if (existsSync("/run/session-reaper/reaper.sock")) env.REAPER_SOCKET = socket;
  if (existsSync("/etc/session-reaper/config.toml")) {
    writeFileSync(join(scratch, "empty.toml"), "");
    env.REAPER_CONFIG = join(scratch, "empty.toml");
  }

  // The first shell: `npm start`, in its own process group (npm, sh, node). The second: one
  // bash reading the lines as they are pasted; each line runs in a group with stdin from
  // /dev/null (nothing is typed meanwhile), then its status is echoed.
  const daemon = spawn("bash", ["-c", first[1] ?? ""], { cwd: scratch, env, detached: true, stdio: "pipe" });
  const shell = spawn("bash", [], { cwd: scratch, env, detached: true, stdio: "pipe" });
  let engine: number | undefined;
  t.after(async () => {
    shell.stdin.end();
    killGroup(shell, "SIGKILL");
    if (engine !== undefined) killIfSame(engine, session?.engine.startTime);
    if (daemon.exitCode === null && daemon.signalCode === null) {
      const gone = new Promise((r) => daemon.once("exit", r));
      killGroup(daemon, "SIGTERM");
      const timer = setTimeout(() => killGroup(daemon, "SIGKILL"), 30_000);
      await gone;
      clearTimeout(timer);
    }
    if (path !== undefined) rmSync(path, { recursive: true, force: true });
    rmSync(scratch, { recursive: true, force: true });
  });
  removeCgroupBaseAfter(t, join(scratch, "reaper.db")); // after the daemon's stop (hooks run in order)

  let daemonOut = "";
  daemon.stdin.end();
  daemon.stdout.setEncoding("utf8").on("data", (d: string) => (daemonOut += d));
  daemon.stderr.setEncoding("utf8").on("data", (d: string) => (daemonOut += d));
  await until(
    async () => {
      if (daemon.exitCode !== null) throw new Error(`npm start exited with ${daemon.exitCode}: ${daemonOut}`);
      return (await callApi(socket, "GET", "/readyz").catch(() => ({ status: 0 }))).status === 200;
    },
    60_000,
    "npm start's daemon to answer on ./reaper.sock",
  );

  let out = "";
  let err = "";
  shell.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
  shell.stderr.setEncoding("utf8").on("data", (d: string) => (err += d));
  const outputs: { line: string; stdout: string }[] = [];
  let session: Session | undefined;
  for (const [i, line] of second.entries()) {
    const marker = `__quickstart_${i}_status`;
    const from = out.length;
    shell.stdin.write(`{\n${line}\n} </dev/null; echo "${marker} $?"\n`);
    await until(() => out.includes(marker), 120_000, `"${line}" to finish (stderr so far: ${err})`);
    const at = out.indexOf(marker);
    const status = Number(/^ (\d+)/.exec(out.slice(at + marker.length))?.[1]);
    outputs.push({ line, stdout: out.slice(from, at) });
    assert.equal(status, 0, `"${line}" exited ${status}\nstdout: ${out.slice(from, at)}\nstderr: ${err}`);

    if (line === runLine) {
      // In the background: registered, then its port added once the server listens.
      await until(
        async () => {
          const r = await callApi<{ sessions: Session[] }>(socket, "GET", "/v1/sessions?state=live");
          session = r.body.sessions.find((s) => s.ports.includes(port));
          return session !== undefined;
        },
        60_000,
        `the Quick start's session to register with port ${port} (stderr: ${err})`,
      );
      engine = session?.engine.pid;
      if (path !== undefined) assert.deepEqual(session?.paths, [path]);
    }
    if (/^npx reaperctl reap\b/.test(command(line))) {
      // A newcomer reads the answer before the next line: the reap has finished by then.
      await until(
        async () => (await callApi<Session>(socket, "GET", `/v1/sessions/${session?.id}`)).body.state === "reaped",
        60_000,
        "the reap to finish",
      );
    }
  }
  assert.ok(session !== undefined && engine !== undefined);
  const id = session.id;

  // What the reap did, checked on the host, not from the daemon's word.
  const reaped = (await callApi<Session>(socket, "GET", `/v1/sessions/${id}`)).body;
  assert.equal(reaped.state, "reaped");
  assert.equal(reaped.reason, "forced");
  assert.equal(reaped.outcome, "clean", JSON.stringify(reaped.leftovers));
  assert.ok(isGone(engine), `the server (pid ${engine}) is gone`);
  assert.ok(await refused(port), `nobody listens on port ${port}`);
  assert.ok(await portFree(port), `port ${port} can be bound again`);
  if (path !== undefined) assert.ok(!existsSync(path), `${path} was deleted`);

  // What the README says each step shows.
  const shown = outputs.filter((o) => /^npx reaperctl show\b/.test(command(o.line))).at(-1);
  assert.ok(shown !== undefined, "the Quick start shows the session");
  const reapAt = outputs.findIndex((o) => /^npx reaperctl reap\b/.test(command(o.line)));
  if (outputs.indexOf(shown) > reapAt) assert.match(shown.stdout, /^outcome\s+clean$/m, shown.stdout);
  const listed = outputs.find((o) => command(o.line) === "npx reaperctl list");
  if (listed !== undefined) assert.match(listed.stdout, new RegExp(`^${id}\\s+live\\s`, "m"), listed.stdout);
  const curled = outputs.find((o) => /^curl --unix-socket \.\/reaper\.sock /.test(command(o.line)));
  if (curled !== undefined) assert.ok(curled.stdout.includes(`"id":"${id}"`), curled.stdout);
  // `reaperctl run`, in the background, says the daemon ended its session, and exits.
  await until(
    () => err.includes(`session ${id} was ended by the daemon (reason forced)`) && err.includes("outcome clean"),
    30_000,
    `reaperctl run to report the reap (stderr: ${err})`,
  );
  const launcher = session.ownerPid?.pid;
  if (launcher !== undefined) await until(() => isGone(launcher), 30_000, "reaperctl run to exit");
});

/** GitHub's anchor for each heading of a markdown file (lowercase, punctuation dropped, spaces to -, repeats numbered). */
function anchors(markdown: string): Set<string> {
  const seen = new Map<string, number>();
  const found = new Set<string>();
  for (const line of withoutFences(markdown).split("\n")) {
    const h = /^#{1,6}\s+(.*?)\s*#*\s*$/.exec(line);
    if (h === null) continue;
    const base = (h[1] ?? "")
      .toLowerCase()
      .replace(/[^\p{L}\p{N}\s_-]/gu, "")
      .replace(/ /g, "-");
    const n = seen.get(base) ?? 0;
    seen.set(base, n + 1);
    found.add(n === 0 ? base : `${base}-${n}`);
  }
  return found;
}

/** The markdown without fenced code blocks (their lines blanked, so line numbers stay). */
function withoutFences(markdown: string): string {
  return markdown.replace(/^```[\s\S]*?^```$/gm, (block) => block.replace(/[^\n]/g, ""));
}

test("every link in README and docs/ resolves", () => {
  const files = [
    "README.md",
    ...readdirSync(join(ROOT, "docs"))
      .filter((f) => f.endsWith(".md"))
      .map((f) => `docs/${f}`),
  ];
  const problems: string[] = [];
  const headings = new Map<string, Set<string>>();
  for (const file of files) {
    const text = withoutFences(readFileSync(join(ROOT, file), "utf8"));
    for (const [i, line] of text.split("\n").entries()) {
      // Code spans are text, not links; the link text of [`x`](y) keeps its brackets.
      for (const m of line.replace(/`[^`]*`/g, "").matchAll(/\]\(([^)\s]+)\)/g)) {
        const target = m[1] ?? "";
        const where = `${file}:${i + 1}: ${target}`;
        if (/^[a-z][a-z0-9+.-]*:/i.test(target)) continue; // a URL: no such link in the docs yet
        const hash = target.indexOf("#");
        const pathPart = decodeURIComponent(hash === -1 ? target : target.slice(0, hash));
        const anchor = hash === -1 ? undefined : target.slice(hash + 1);
        // "/x" is the repository's x (as GitHub renders it); "x" is relative to the file.
        const abs =
          pathPart === ""
            ? join(ROOT, file)
            : pathPart.startsWith("/")
              ? join(ROOT, pathPart)
              : resolve(dirname(join(ROOT, file)), pathPart);
        const rel = relative(ROOT, abs);
        if (rel.startsWith("..")) {
          problems.push(`${where}: outside the repository`);
        } else if (!existsSync(abs)) {
          problems.push(`${where}: no such file`);
        } else if (anchor !== undefined) {
          if (!abs.endsWith(".md")) {
            problems.push(`${where}: an anchor into a file that is not markdown`);
            continue;
          }
          let set = headings.get(abs);
          if (set === undefined) headings.set(abs, (set = anchors(readFileSync(abs, "utf8"))));
          if (!set.has(anchor)) problems.push(`${where}: no heading #${anchor} in ${rel}`);
        }
      }
    }
  }
  assert.deepEqual(problems, []);
});
