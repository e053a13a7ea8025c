import assert from "node:assert/strict";
import { once } from "node:events";
import { createServer, type AddressInfo, type Server, type Socket } from "node:net";
import { endianness } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import {
  ancestorsOf,
  decodeAddress,
  inetSockets,
  portsHeldBy,
  socketSnapshot,
  unixSockets,
} from "../../src/proc/sockets.js";
import { processTree } from "../../src/proc/tree.js";
import { socketHolders } from "../../src/proc/users.js";
import { identify } from "../../src/proc/identity.js";
import { startEngine, tempDir, type Engine } from "../helpers.js";

type Ready = Engine & { childPorts: number[]; udpPort: number | null; connectedFrom: number | null };

async function listen(t: { after: (fn: () => Promise<void>) => void }, host = "127.0.0.1") {
  const sockets: Socket[] = [];
  const server: Server = createServer((s) => {
    sockets.push(s);
    s.on("error", () => undefined);
  });
  server.listen(0, host);
  await once(server, "listening");
  t.after(() => {
    for (const s of sockets) s.destroy();
    return new Promise<void>((r) => server.close(() => r()));
  });
  return { server, port: (server.address() as AddressInfo).port };
}

test(
  "decodeAddress reads the kernel's host-order hex (IPv4, IPv6, IPv4-mapped)",
  { skip: endianness() !== "LE" && "the literals below are little-endian" },
  () => {
    assert.equal(decodeAddress("0100007F"), "127.0.0.1");
    assert.equal(decodeAddress("00000000"), "0.0.0.0");
    assert.equal(decodeAddress("00000000000000000000000001000000"), "::1");
    assert.equal(decodeAddress("00000000000000000000000000000000"), "::");
    assert.equal(decodeAddress("0000000000000000FFFF00000100007F"), "::ffff:127.0.0.1");
    // Each 32-bit word in host order (little-endian here), as /proc/net/tcp6 prints them.
    assert.equal(decodeAddress("000000FD000000000000000002000000"), "fd00::2");
    assert.equal(decodeAddress("B80D0120000000000000000001000000"), "2001:db8::1");
  },
);

test("inetSockets reads tcp6 too: a server on [::1] is LISTEN with address ::1", async (t) => {
  const { port } = await listen(t, "::1");
  const mine = inetSockets().filter((s) => s.localPort === port && s.state === "LISTEN");
  assert.deepEqual(
    mine.map((s) => [s.proto, s.localAddress]),
    [["tcp6", "::1"]],
  );
});

test("the snapshot of an engine tree: its listeners (TCP, UDP, a child's), its connection, its unix socket", async (t) => {
  const dir = tempDir(t);
  const { port: serverPort, server } = await listen(t);
  const accepted = once(server, "connection");
  const unixPath = join(dir, "engine.sock");
  const engine = (await startEngine(t, [
    "--fork",
    "1",
    "--child-listen",
    "--udp",
    "--unix",
    unixPath,
    "--connect",
    String(serverPort),
  ])) as Ready;
  await accepted;
  const tree = processTree(identify(engine.pid, "engine", process.pid));
  const pids = tree.map((p) => p.pid).sort((a, b) => a - b);
  assert.deepEqual(
    pids,
    [engine.pid, ...engine.children].sort((a, b) => a - b),
  );
  const childPort = engine.childPorts[0];
  assert.ok(childPort !== undefined && engine.udpPort !== null && engine.connectedFrom !== null);

  const snap = socketSnapshot(pids);
  const listening = snap.listening.map((l) => [l.proto, l.address, l.port, l.pids]);
  assert.deepEqual(
    listening.sort((a, b) => Number(a[2]) - Number(b[2])),
    [
      ["tcp", "127.0.0.1", engine.port, [engine.pid]],
      ["tcp", "127.0.0.1", childPort, engine.children],
      ["udp", "127.0.0.1", engine.udpPort, [engine.pid]],
    ].sort((a, b) => Number(a[2]) - Number(b[2])),
  );
  assert.ok(snap.listening.every((l) => l.inode > 0));
  assert.deepEqual(
    snap.established.map((c) => [c.proto, c.state, c.local, c.localPort, c.remote, c.pids]),
    [
      [
        "tcp",
        "ESTABLISHED",
        `127.0.0.1:${engine.connectedFrom}`,
        engine.connectedFrom,
        `127.0.0.1:${serverPort}`,
        [engine.pid],
      ],
    ],
  );
  const named = snap.unix.filter((u) => u.path !== null);
  assert.deepEqual(
    named.map((u) => [u.type, u.path, u.listening, u.pids]),
    [["stream", unixPath, true, [engine.pid]]],
  );
  assert.ok(
    unixSockets().some((u) => u.path === unixPath && u.listening),
    "the unix socket is in the daemon's /proc/net/unix",
  );
  // The engine's parent (this test process) and its ancestors: where inherited sockets live.
  assert.ok(snap.ancestors.some((a) => a.pid === process.pid));
  assert.equal(snap.netns.length, 1);
  assert.equal(snap.omitted, undefined);
});

test("portsHeldBy: the tree's TCP LISTEN and bound UDP ports, nothing else", async (t) => {
  const { port: outsidePort } = await listen(t);
  const engine = (await startEngine(t, ["--fork", "1", "--child-listen", "--udp"])) as Ready;
  const pids = processTree(identify(engine.pid, "engine", process.pid)).map((p) => p.pid);
  const held = portsHeldBy(pids);
  assert.deepEqual([...(held.get(engine.port) ?? [])], ["tcp"]);
  assert.deepEqual([...(held.get(engine.childPorts[0] ?? 0) ?? [])], ["tcp"]);
  assert.deepEqual([...(held.get(engine.udpPort ?? 0) ?? [])], ["udp"]);
  assert.equal(held.has(outsidePort), false, "a port of another process");
  assert.equal(portsHeldBy([]).size, 0);
});

test("ancestorsOf stops at the given processes and reaches pid 1", () => {
  const mine = ancestorsOf([process.pid]);
  assert.ok(!mine.some((a) => a.pid === process.pid));
  assert.ok(mine.some((a) => a.pid === process.ppid));
  assert.ok(mine.some((a) => a.pid === 1));
  assert.deepEqual(
    ancestorsOf([process.pid, process.ppid]).filter((a) => a.pid === process.ppid),
    [],
  );
});

test("socketHolders: one shared walk of /proc, every holder of each inode", async (t) => {
  const { port } = await listen(t);
  const inode = inetSockets().find((s) => s.localPort === port && s.state === "LISTEN")?.inode;
  assert.ok(inode !== undefined && inode > 0);
  const holders = [...(await socketHolders([inode, 2 ** 31]))].map(([i, hs]) => [i, hs.map((h) => h.pid)]);
  assert.deepEqual(holders, [[inode, [process.pid]]]);
  assert.equal((await socketHolders([])).size, 0);
});
