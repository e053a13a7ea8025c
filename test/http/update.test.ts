/**
 * PATCH /v1/sessions/{id}: a live session gains ports (held by its processes now), paths
 * (the path policy) and labels; a refusal changes nothing; the reap then verifies what was
 * added. Real engine processes, real ports, a real daemon over its unix socket.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import type { Session } from "../../src/client/index.js";
import { ReaperClient } from "../../src/client/index.js";
import {
  apiAs,
  foreignPort,
  isGone,
  portFree,
  startDaemon,
  tempDir,
  testConfig,
  testGroup,
  testUser,
  unusedPort,
} from "../helpers.js";

type ErrorBody = { error: { code: string; message: string; detail?: Record<string, unknown> } };

/**
 * An engine that listens on nothing until told: each line on its stdin opens one more
 * loopback port, printed back. Killed when the test ends.
 */
function lateListener(t: { after: (fn: () => void) => void }): {
  pid: number;
  listen: () => Promise<number>;
} {
  const script = `
    const net = require("node:net");
    const rl = require("node:readline").createInterface({ input: process.stdin });
    rl.on("line", () => {
      const s = net.createServer().listen(0, "127.0.0.1", () => console.log(s.address().port));
    });
    setInterval(() => {}, 1 << 30);`;
  const child = spawn(process.execPath, ["-e", script], { stdio: ["pipe", "pipe", "inherit"] });
  t.after(() => child.kill("SIGKILL"));
  child.stdout.setEncoding("utf8");
  const lines: string[] = [];
  const waiting: ((line: string) => void)[] = [];
  child.stdout.on("data", (d: string) => {
    for (const line of d.split("\n").filter(Boolean)) {
      const w = waiting.shift();
      if (w) w(line);
      else lines.push(line);
    }
  });
  return {
    pid: child.pid as number,
    listen: () =>
      new Promise((resolve) => {
        waiting.push((line) => resolve(Number(line)));
        child.stdin.write("listen\n");
      }),
  };
}

test("PATCH adds a port opened after registration, a path and labels; the reap verifies them", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  const engine = lateListener(t);
  const reg = await d.api<Session>("POST", "/v1/sessions", {
    id: "late",
    engine: { pid: engine.pid },
    labels: { team: "data" },
  });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));

  // One port the engine listens on and one nobody holds, with a label: refused with the
  // registration's code, naming the item, and nothing changes (not the held port, not the label).
  const port = await engine.listen();
  const unheld = await unusedPort();
  const refused = await d.api<ErrorBody>("PATCH", "/v1/sessions/late", {
    ports: [port, unheld],
    labels: { stage: "2" },
  });
  assert.equal(refused.status, 400, JSON.stringify(refused.body));
  assert.equal(refused.body.error.code, "SR_PORT_NOT_OWNED");
  assert.match(refused.body.error.message, new RegExp(`^ports\\[1\\]: port ${unheld} .*no process listens on it`));
  let s = (await d.api<Session>("GET", "/v1/sessions/late")).body;
  assert.deepEqual(s.ports, []);
  assert.deepEqual(s.labels, { team: "data" });
  // The held port alone: added.
  const first = await d.api<Session>("PATCH", "/v1/sessions/late", { ports: [port] });
  assert.equal(first.status, 200, JSON.stringify(first.body));
  assert.deepEqual(first.body.ports, [port]);

  // A port another process holds: refused, saying so.
  const theirs = await foreignPort(t);
  const stolen = await d.api<ErrorBody>("PATCH", "/v1/sessions/late", { ports: [theirs] });
  assert.equal(stolen.body.error.code, "SR_PORT_NOT_OWNED");
  assert.match(stolen.body.error.message, /another process holds it/);

  // A second late port, a path and labels in one PATCH; the first port again is accepted as is.
  const port2 = await engine.listen();
  const files = join(dir, "late-files");
  mkdirSync(files);
  writeFileSync(join(files, "spill"), "x");
  const added = await d.api<Session>("PATCH", "/v1/sessions/late", {
    ports: [port, port2],
    paths: [files],
    labels: { stage: "2", team: "ml" },
  });
  assert.equal(added.status, 200, JSON.stringify(added.body));
  assert.deepEqual(added.body.ports, [port, port2]);
  assert.deepEqual(added.body.paths, [files]);
  assert.deepEqual(added.body.labels, { team: "ml", stage: "2" });
  assert.equal(added.body.state, "live");
  assert.ok(added.body.deadline !== null);
  s = (await d.api<Session>("GET", "/v1/sessions/late")).body;
  assert.deepEqual(s.ports, [port, port2], "stored, not only answered");

  const events = await d.api<{ events: { event: string; detail: Record<string, unknown> }[] }>(
    "GET",
    "/v1/sessions/late/events",
  );
  const updates = events.body.events.filter((e) => e.event === "session.updated");
  assert.equal(updates.length, 2);
  assert.deepEqual((updates[1]?.detail as { added: unknown }).added, {
    ports: [port2],
    paths: [files],
    labels: { stage: "2", team: "ml" },
  });

  // The reap frees and verifies what PATCH added.
  assert.equal((await d.api("POST", "/v1/sessions/late/reap")).status, 202);
  const finished = await d.reaped("late");
  assert.equal(finished.outcome, "clean", JSON.stringify(finished.detail));
  assert.equal(isGone(engine.pid), true);
  assert.equal(await portFree(port), true);
  assert.equal(await portFree(port2), true);
  assert.equal(existsSync(files), false);
  const end = (await d.api<Session>("GET", "/v1/sessions/late")).body;
  const ports = end.steps?.find((x) => x.name === "release-connections-and-ports")?.detail as {
    ports?: { port: number }[];
  };
  assert.deepEqual(
    ports.ports?.map((p) => p.port),
    [port, port2],
  );

  // Once reaped: 409, and still nothing changes.
  const late = await d.api<ErrorBody>("PATCH", "/v1/sessions/late", { labels: { x: "y" } });
  assert.equal(late.status, 409);
  assert.equal(late.body.error.code, "SR_SESSION_FENCED");
});

test("PATCH refusals: bad bodies, the path policy, the caps, unknown sessions and other users", async (t) => {
  const dir = tempDir(t);
  chmodSync(dir, 0o755);
  // api.socket_group: a non-root launcher reaches the socket through its group alone.
  const group = testGroup(t);
  const member = testUser(t, [group.name]);
  const outsider = testUser(t);
  const d = await startDaemon(t, testConfig(dir, { api: { socket_mode: "0660", socket_group: group.name } }));
  const st = statSync(d.socket);
  assert.equal(st.gid, group.gid, "the socket file's group is api.socket_group");
  assert.equal(st.mode & 0o777, 0o660);
  const engine = lateListener(t);
  assert.equal((await d.api("POST", "/v1/sessions", { id: "p", engine: { pid: engine.pid } })).status, 201);
  const refuse = async (body: unknown, status: number, code: string, message?: RegExp): Promise<void> => {
    const r = await d.api<ErrorBody>("PATCH", "/v1/sessions/p", body);
    assert.equal(r.status, status, `${JSON.stringify(body)} → ${JSON.stringify(r.body)}`);
    assert.equal(r.body.error.code, code, JSON.stringify(r.body));
    if (message) assert.match(r.body.error.message, message);
  };
  await refuse({}, 400, "SR_BAD_REQUEST");
  await refuse({ ports: [80], color: "red" }, 400, "SR_BAD_REQUEST", /body has an unknown property "color"/);
  await refuse({ engine: { pid: 1 } }, 400, "SR_BAD_REQUEST", /unknown property "engine"/);
  await refuse({ paths: ["/etc"] }, 400, "SR_PATH_OUTSIDE_ROOT");
  await refuse({ paths: ["relative"] }, 400, "SR_INVALID_PATH");
  await refuse({ ports: [0] }, 400, "SR_BAD_REQUEST");
  // 64 labels at most, counting those the session has.
  const many = Object.fromEntries(Array.from({ length: 64 }, (_, i) => [`k${i}`, "v"]));
  assert.equal((await d.api("PATCH", "/v1/sessions/p", { labels: many })).status, 200);
  await refuse({ labels: { one: "more" } }, 400, "SR_LIMIT_EXCEEDED", /labels: the session would have 65 labels/);
  const s = (await d.api<Session>("GET", "/v1/sessions/p")).body;
  assert.equal(Object.keys(s.labels).length, 64);
  assert.deepEqual(s.paths, []);

  const missing = await d.api<ErrorBody>("PATCH", "/v1/sessions/nobody", { labels: { a: "b" } });
  assert.equal(missing.status, 404);
  assert.equal(missing.body.error.code, "SR_SESSION_NOT_FOUND");

  // A member of the socket's group may call, but not PATCH a session root registered: the
  // heartbeat's policy. A user outside the group cannot even connect.
  const other = apiAs(t, member, d.socket);
  const forbidden = await other.call<ErrorBody>("PATCH", "/v1/sessions/p", { labels: { a: "b" } });
  assert.equal(forbidden.status, 403, JSON.stringify(forbidden.body));
  assert.equal(forbidden.body.error.code, "SR_NOT_SESSION_OWNER");
  assert.equal((await d.api<Session>("GET", "/v1/sessions/p")).body.labels.a, undefined);
  const shut = await apiAs(t, outsider, d.socket).call<{ transport?: string }>("GET", "/v1/daemon");
  assert.equal(shut.status, 0);
  assert.match(String(shut.body.transport), /EACCES|permission/i);
});

test("client update() adds a late port through the library", async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, testConfig(dir));
  const engine = lateListener(t);
  const client = new ReaperClient({ socketPath: d.socket });
  await client.register({ engine: { pid: engine.pid } });
  const port = await engine.listen();
  const s = await client.update({ ports: [port], labels: { via: "client" } });
  assert.deepEqual(s.ports, [port]);
  assert.deepEqual(s.labels, { via: "client" });
  await assert.rejects(client.update({ ports: [await foreignPort(t)] }), { code: "SR_PORT_NOT_OWNED" });
  await client.close();
});
