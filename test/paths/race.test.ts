import assert from "node:assert/strict";
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { chmodSync, lchownSync, lstatSync, mkdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { pino } from "pino";
import { removePath } from "../../src/paths/remove.js";
import { tempDir } from "../helpers.js";

// The CVE-2022-21658 pattern: while the daemon's recursive delete walks a session's tree, a
// racing process keeps exchanging a real subdirectory with a symlink to a victim directory
// outside the allowed root (renameat2 RENAME_EXCHANGE, test/fixtures/swap.py). Whatever the
// interleaving, the walk must never delete through the symlink, and retrying removePath must
// get the session's files deleted in the end.

// swap.py is not compiled: from dist/test/paths/ go back to the source tree.
const SWAP = fileURLToPath(new URL("../../../test/fixtures/swap.py", import.meta.url));
// The interpreter itself, resolved once: a version manager's python3 shim costs ~70 ms a start.
const PYTHON = execFileSync("python3", ["-c", "import sys; sys.stdout.write(sys.executable)"], { encoding: "utf8" });
const OWNER_UID = 12345;
const OWNER_GID = 12345;
const MAX_ATTEMPTS = 50;
const log = pino({ level: "silent" });

/** A swap.py run: resolves once its first exchange has happened; stop() ends it and returns its counts. */
interface Swapper {
  stop(): Promise<{ swaps: number; errors: Record<string, number> }>;
}

/** Every swapper still running, killed when the test ends (normally each is stopped in its iteration). */
const live = new Set<ChildProcess>();

async function startSwapper(a: string, b: string): Promise<Swapper> {
  const child = spawn(PYTHON, ["-I", "-S", SWAP, a, b], { stdio: ["ignore", "pipe", "pipe"] });
  live.add(child);
  let out = "";
  let err = "";
  child.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
  child.stderr.setEncoding("utf8").on("data", (d: string) => (err += d));
  const exit = new Promise<number | null>((resolve) =>
    child.once("close", (code) => {
      live.delete(child);
      resolve(code);
    }),
  );
  await new Promise<void>((resolve, reject) => {
    const onData = (): void => {
      if (!out.startsWith("ready\n")) return;
      child.stdout.off("data", onData);
      resolve();
    };
    child.stdout.on("data", onData);
    void exit.then((code) => reject(new Error(`swap.py exited before racing (${code}): ${err.trim()}`)));
  });
  return {
    async stop() {
      child.kill("SIGTERM");
      const code = await exit;
      assert.equal(code, 0, `swap.py exited with ${code}: ${err.trim()}`);
      const report = out.split("\n").filter(Boolean).at(-1) ?? "";
      return JSON.parse(report) as { swaps: number; errors: Record<string, number> };
    },
  };
}

/** A victim directory full of canary files (nested); returns path -> content of every canary. */
function buildVictim(victim: string): Map<string, string> {
  const canaries = new Map<string, string>();
  for (const dir of [victim, join(victim, "inner"), join(victim, "inner", "deeper"), join(victim, "work")]) {
    mkdirSync(dir, { mode: 0o755 });
    chmodSync(dir, 0o755);
    for (let i = 0; i < 4; i++) {
      const f = join(dir, `canary-${i}`);
      const content = `canary ${f}`;
      writeFileSync(f, content, { mode: 0o644 });
      canaries.set(f, content);
    }
  }
  return canaries;
}

/**
 * A non-trivial session tree: a few top-level files and dirs, and cache/work (a real directory
 * with a nested tree of its own) next to cache/link, a symlink to the victim. These two names
 * are what the swapper exchanges. Returns every path created, parents first.
 */
function buildSession(session: string, victim: string): { work: string; link: string; paths: string[] } {
  const paths: string[] = [];
  const dir = (p: string): void => {
    mkdirSync(p);
    paths.push(p);
  };
  const file = (p: string): void => {
    writeFileSync(p, `session file ${p}`);
    paths.push(p);
  };
  dir(session);
  for (let i = 0; i < 3; i++) file(join(session, `top-${i}.log`));
  for (const d of ["a", "b"]) {
    dir(join(session, d));
    for (const s of ["x", "y"]) {
      dir(join(session, d, s));
      for (let i = 0; i < 3; i++) file(join(session, d, s, `f-${i}`));
    }
  }
  const cache = join(session, "cache");
  dir(cache);
  const work = join(cache, "work");
  dir(work);
  for (const s of ["p", "q", "r"]) {
    dir(join(work, s));
    dir(join(work, s, "deep"));
    for (let i = 0; i < 4; i++) file(join(work, s, `w-${i}`));
    for (let i = 0; i < 2; i++) file(join(work, s, "deep", `d-${i}`));
  }
  for (let i = 0; i < 3; i++) file(join(cache, `c-${i}`));
  const link = join(cache, "link");
  symlinkSync(victim, link);
  paths.push(link);
  return { work, link, paths };
}

function lexists(p: string): boolean {
  try {
    lstatSync(p);
    return true;
  } catch {
    return false;
  }
}

interface Totals {
  iterations: number;
  attempts: number;
  retries: number;
  failed: number;
  refused: number;
  firstAttemptFailed: number;
  maxAttempts: number;
  swaps: number;
  swapErrors: Record<string, number>;
  raceEndedByDelete: number;
  sessionsLeft: number;
  victimFilesLost: number;
  lost: string[];
  details: string[];
}

/**
 * `iterations` rounds of: fresh session tree + victim, swapper racing, removePath retried until
 * the session path is gone, swapper stopped, then every canary checked.
 */
async function race(opts: {
  iterations: number;
  root: string;
  outside: string;
  owner?: { uid: number; gid: number };
}): Promise<Totals> {
  const uid = opts.owner?.uid ?? process.getuid?.() ?? 0;
  const totals: Totals = {
    iterations: 0,
    attempts: 0,
    retries: 0,
    failed: 0,
    refused: 0,
    firstAttemptFailed: 0,
    maxAttempts: 0,
    swaps: 0,
    swapErrors: {},
    raceEndedByDelete: 0,
    sessionsLeft: 0,
    victimFilesLost: 0,
    lost: [],
    details: [],
  };
  for (let n = 0; n < opts.iterations; n++) {
    const victim = join(opts.outside, `victim-${n}`);
    const session = join(opts.root, `session-${n}`);
    const canaries = buildVictim(victim);
    const { work, link, paths } = buildSession(session, victim);
    if (opts.owner) for (const p of paths) lchownSync(p, opts.owner.uid, opts.owner.gid);

    // The swapper runs as root: it can exchange the names whoever owns them.
    const swapper = await startSwapper(work, link);
    let attempts = 0;
    try {
      while (lexists(session) && attempts < MAX_ATTEMPTS) {
        attempts++;
        const r = await removePath(session, [opts.root], uid, log, new AbortController().signal);
        if (r.status === "failed" || r.status === "refused") {
          totals[r.status]++;
          if (totals.details.length < 5) totals.details.push(`#${n} attempt ${attempts}: ${r.status}: ${r.detail}`);
        }
      }
    } finally {
      const report = await swapper.stop();
      totals.swaps += report.swaps;
      for (const [e, count] of Object.entries(report.errors))
        totals.swapErrors[e] = (totals.swapErrors[e] ?? 0) + count;
      if (report.errors.ENOENT) totals.raceEndedByDelete++;
    }
    totals.iterations++;
    totals.attempts += attempts;
    totals.retries += Math.max(0, attempts - 1);
    totals.maxAttempts = Math.max(totals.maxAttempts, attempts);
    if (attempts > 1) totals.firstAttemptFailed++;
    if (lexists(session)) {
      totals.sessionsLeft++;
      // The swapper is stopped: nothing races this clean-up (which does not follow symlinks).
      rmSync(session, { recursive: true, force: true });
    }
    for (const [f, content] of canaries) {
      let now: string | null;
      try {
        now = readFileSync(f, "utf8");
      } catch {
        now = null;
      }
      if (now !== content) {
        totals.victimFilesLost++;
        if (totals.lost.length < 20) totals.lost.push(`#${n}: ${f} ${now === null ? "gone" : "changed"}`);
      }
    }
    rmSync(victim, { recursive: true, force: true });
  }
  return totals;
}

function report(t: { diagnostic: (m: string) => void }, totals: Totals): void {
  t.diagnostic(
    `iterations=${totals.iterations} rm runs=${totals.attempts} retries=${totals.retries} ` +
      `iterations needing a retry=${totals.firstAttemptFailed} max attempts in one iteration=${totals.maxAttempts}`,
  );
  t.diagnostic(
    `removePath failed=${totals.failed} refused=${totals.refused} before success; ` +
      `sessions left after ${MAX_ATTEMPTS} attempts=${totals.sessionsLeft}`,
  );
  t.diagnostic(
    `swaps=${totals.swaps} failed exchanges=${JSON.stringify(totals.swapErrors)} ` +
      `races ended by rm deleting a swapped name=${totals.raceEndedByDelete}; ` +
      `victim files lost=${totals.victimFilesLost}`,
  );
  for (const d of totals.details) t.diagnostic(`e.g. ${d}`);
}

function assertTotals(totals: Totals, iterations: number): void {
  assert.equal(totals.iterations, iterations);
  assert.deepEqual(totals.lost, [], `victim files lost: ${totals.victimFilesLost}`);
  assert.equal(totals.victimFilesLost, 0);
  assert.equal(totals.sessionsLeft, 0, `session dirs still there after ${MAX_ATTEMPTS} removePath attempts`);
  // The race really ran: the swapper exchanged the names while the deletes walked.
  assert.ok(totals.swaps > iterations, `only ${totals.swaps} swaps in ${iterations} iterations`);
}

test("a subdirectory swapped for a symlink to a victim during 200 deletions: the victim is intact, the session gone", async (t) => {
  t.after(() => {
    for (const child of live) child.kill("SIGKILL");
  });
  const root = tempDir(t, "sr-race-root-");
  const outside = tempDir(t, "sr-race-victim-");
  const totals = await race({ iterations: 200, root, outside });
  report(t, totals);
  assertTotals(totals, 200);
});

test("as root deleting another uid's session, a root-owned 0755 victim survives the same race", async (t) => {
  assert.equal(process.geteuid?.(), 0, "this test proves the uid drop and must run as root");
  t.after(() => {
    for (const child of live) child.kill("SIGKILL");
  });
  // A world-traversable root (like /tmp) and victim parent: the owner's uid can reach the victim,
  // so only the walk (and, as a last line, the uid drop) protects it.
  const root = tempDir(t, "sr-race-root-");
  chmodSync(root, 0o1777);
  const outside = tempDir(t, "sr-race-victim-");
  chmodSync(outside, 0o755);
  buildVictim(join(outside, "probe"));
  execFileSync("ls", [join(outside, "probe", "inner")], { uid: OWNER_UID, gid: OWNER_GID, stdio: "ignore" });
  rmSync(join(outside, "probe"), { recursive: true });

  const totals = await race({ iterations: 50, root, outside, owner: { uid: OWNER_UID, gid: OWNER_GID } });
  report(t, totals);
  assertTotals(totals, 50);
});

// The same race one level up: a *parent* of the registered path is exchanged with a symlink
// to a victim outside the root. rm must not be handed a path the kernel resolves again
// (found by this suite's author: with `rm -rf /root/workN/job`, 18 of 200 deletions went
// through the symlink). removePath opens the parents with openat(O_NOFOLLOW) and runs rm in
// the opened directory: the victim's copy of the name must survive every time.
test("a parent of the path exchanged with a symlink during 200 deletions: the victim is intact", async (t) => {
  const root = tempDir(t, "sr-race-parent-root-");
  const outside = tempDir(t, "sr-race-parent-outside-");
  let refused = 0;
  let removed = 0;
  for (let i = 0; i < 200; i++) {
    const parent = join(root, `work${i}`);
    const swapped = join(root, `link${i}`);
    const victim = join(outside, `v${i}`);
    mkdirSync(join(parent, "job", "sub"), { recursive: true });
    writeFileSync(join(parent, "job", "sub", "f"), "session file");
    mkdirSync(join(victim, "job"), { recursive: true });
    writeFileSync(join(victim, "job", "canary"), "keep me");
    symlinkSync(victim, swapped);
    const swapper = await startSwapper(parent, swapped);
    const r = await removePath(join(parent, "job"), [root], 0, log, new AbortController().signal);
    await swapper.stop();
    if (r.status === "refused") refused++;
    if (r.status === "removed") removed++;
    assert.equal(readFileSync(join(victim, "job", "canary"), "utf8"), "keep me", `iteration ${i}: victim deleted`);
  }
  t.diagnostic(`parent swaps: removed=${removed} refused=${refused} of 200; victim files lost=0`);
  assert.ok(removed + refused === 200, "every deletion either removed the session's files or refused");
});
