/**
 * The readings a reap storm shares: /proc walks (processUses, filesInUse), the network
 * tables (freshTables), the paced turns. Shared, yet never older than the question: a scan
 * asked during a walk is answered by the next walk, a table read after it was asked.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createServer, type AddressInfo } from "node:net";
import { test } from "node:test";
import { freshTables, inetSockets } from "../../src/proc/sockets.js";
import { SESSION_COOKIE, filesInUse, processUses, walkStats } from "../../src/proc/users.js";
import { loopTurn, turnsWaiting } from "../../src/pace/turns.js";
import { identify } from "../../src/proc/identity.js";
import { freshTable, freshTableStats, recentTable } from "../../src/proc/tree.js";

function withCookie(t: { after: (fn: () => void) => void }, cookie: string): Promise<number> {
  const child = spawn("sleep", ["30"], { env: { ...process.env, [SESSION_COOKIE]: cookie }, stdio: "ignore" });
  t.after(() => child.kill("SIGKILL"));
  return once(child, "spawn").then(() => child.pid as number);
}

test("scans asked together share one walk; each finds its own processes", async (t) => {
  const pids = await Promise.all(Array.from({ length: 5 }, (_, i) => withCookie(t, `shared-${i}`)));
  const before = walkStats();
  const answers = await Promise.all(pids.map((_, i) => processUses({ cookie: `shared-${i}` })));
  const after = walkStats();
  assert.deepEqual(
    answers.map((a) => a.map((u) => u.pid)),
    pids.map((p) => [p]),
  );
  assert.equal(after.scans - before.scans, 5);
  assert.equal(after.walks - before.walks, 1, "five scans asked in one turn: one walk");
});

test("a scan asked during a walk waits for the next one: it sees a process started after the first began", async (t) => {
  const first = processUses({ cookie: "walk-in-progress" }); // a walk starts at the next turn
  await new Promise((r) => setImmediate(r)); // now it runs (it yields every few processes)
  const pid = await withCookie(t, "late-comer");
  const late = await processUses({ cookie: "late-comer" });
  await first;
  assert.deepEqual(
    late.map((u) => u.pid),
    [pid],
  );
});

test("freshTables: one reading for everyone asking in a turn, never older than the question", async (t) => {
  const server = createServer().listen(0, "127.0.0.1");
  await once(server, "listening");
  t.after(() => void server.close());
  const port = (server.address() as AddressInfo).port;
  const [a, b] = await Promise.all([freshTables(), freshTables()]);
  for (const since of [a, b]) {
    const mine = inetSockets("self", new Set([port]), since);
    assert.equal(mine.filter((s) => s.state === "LISTEN").length, 1, "the listener opened before asking");
  }
  // Closed after that reading: a new question gets a new reading, which no longer shows it.
  await new Promise<void>((r) => server.close(() => r()));
  const since = await freshTables();
  assert.equal(inetSockets("self", new Set([port]), since).filter((s) => s.state === "LISTEN").length, 0);
});

test("loopTurn: every waiter goes, in order, over later turns", async () => {
  const order: number[] = [];
  const all = Array.from({ length: 500 }, (_, i) => loopTurn().then(() => void order.push(i)));
  assert.ok(turnsWaiting() >= 500);
  await Promise.all(all);
  assert.deepEqual(
    order,
    Array.from({ length: 500 }, (_, i) => i),
  );
  assert.equal(turnsWaiting(), 0);
});

test("fresh process tables: askers of one window share a walk begun after they asked; a later ask gets a later walk", async (t) => {
  const before = freshTableStats();
  const tables = await Promise.all(Array.from({ length: 20 }, () => freshTable()));
  const after = freshTableStats();
  assert.equal(after.asks - before.asks, 20);
  assert.equal(after.walks - before.walks, 1, "twenty asks in one turn: one walk");
  assert.ok(tables.every((x) => x === tables[0]));
  // A process started after that walk is in the next fresh table, never in the shared one.
  const child = spawn("sleep", ["30"], { stdio: "ignore" });
  t.after(() => child.kill("SIGKILL"));
  await once(child, "spawn");
  const id = identify(child.pid as number, "engine.pid", process.pid);
  assert.equal(tables[0]?.find(id), undefined);
  const next = await freshTable();
  assert.notEqual(next, tables[0]);
  assert.equal(next.find(id)?.pid, child.pid);
  // recentTable shares the latest walk while it is young enough, else waits for a fresh one.
  assert.equal(await recentTable(60_000), next);
  await new Promise((r) => setTimeout(r, 30));
  const third = await recentTable(10);
  assert.notEqual(third, next);
  assert.equal(freshTableStats().walks - after.walks, 2);
});

test("one walk serves scans of every kind, each through its own keys: cookies whole, paths at or below, sockets, files", async (t) => {
  const root = mkdtempSync(join(tmpdir(), "sr-scan-keys-"));
  t.after(() => rmSync(root, { recursive: true, force: true }));
  const [dirA, dirB, dirAB] = ["a", "b", "ab"].map((d) => join(root, d)) as [string, string, string];
  for (const d of [join(dirA, "sub"), dirB, dirAB]) mkdirSync(d, { recursive: true });
  const fileB = join(dirB, "open.txt");
  writeFileSync(fileB, "x");
  const run = async (cmd: string, opts: { cwd?: string; env?: Record<string, string> }): Promise<number> => {
    const child = spawn("sh", ["-c", cmd], {
      cwd: opts.cwd ?? root,
      env: { PATH: "/usr/bin:/bin", ...opts.env },
      stdio: "ignore",
    });
    t.after(() => child.kill("SIGKILL"));
    await once(child, "spawn");
    return child.pid as number;
  };
  const inA = await run("exec sleep 30", { cwd: join(dirA, "sub") });
  const inAB = await run("exec sleep 30", { cwd: dirAB }); // "/…/ab" is not below "/…/a"
  const holdsB = await run(`exec 3<${fileB}; exec sleep 30`, {});
  const c10 = await run("exec sleep 30", { env: { [SESSION_COOKIE]: "keys-c10" } });
  const notAtStart = await run("exec sleep 30", { env: { [`X${SESSION_COOKIE}`]: "keys-c1" } });
  const server = createServer().listen(0, "127.0.0.1");
  await once(server, "listening");
  t.after(() => void server.close());
  const port = (server.address() as AddressInfo).port;
  const inode = inetSockets("self", new Set([port])).find((s) => s.state === "LISTEN")?.inode as number;
  // Let the shells exec and open their files.
  await new Promise((r) => setTimeout(r, 200));
  const before = walkStats();
  const [a, b, cookie1, cookie10, sockets, files] = await Promise.all([
    processUses({ paths: [dirA] }),
    processUses({ paths: [dirB] }),
    processUses({ cookie: "keys-c1" }),
    processUses({ cookie: "keys-c10" }),
    processUses({ sockets: new Map([[inode, `port ${port}`]]) }),
    filesInUse(new Set([fileB, join(dirB, "never-opened")])),
  ]);
  assert.equal(walkStats().walks - before.walks, 1, "six scans asked in one turn: one walk");
  assert.deepEqual(
    a.map((u) => [u.pid, u.why]),
    [[inA, `cwd under ${dirA}`]],
  );
  assert.ok(!a.some((u) => u.pid === inAB));
  assert.deepEqual(
    b.map((u) => [u.pid, u.why]),
    [[holdsB, `fd under ${dirB}`]],
  );
  assert.deepEqual(
    cookie1,
    [],
    `neither ${SESSION_COOKIE}=keys-c10 (${c10}) nor X${SESSION_COOKIE}=keys-c1 (${notAtStart})`,
  );
  assert.deepEqual(
    cookie10.map((u) => [u.pid, u.why]),
    [[c10, "cookie"]],
  );
  assert.deepEqual(
    sockets.map((u) => [u.pid, u.why]),
    [[process.pid, `port ${port}`]],
  );
  assert.deepEqual([...files], [fileB]);
});
