import assert from "node:assert/strict";
import { once } from "node:events";
import { createConnection, createServer, type AddressInfo, type Server, type Socket } from "node:net";
import { test } from "node:test";
import { createSocket } from "node:dgram";
import { heldOf, inetSockets, portsHeldBy, socketInodes, tcpSockets, type InetSocket } from "../../src/proc/sockets.js";
import { socketHolders } from "../../src/proc/users.js";

/** Every pid holding one of these inodes (the shared walk's answer, flattened). */
const holdersOf = async (inodes: Iterable<number>): Promise<number[]> => [
  ...new Set([...(await socketHolders(inodes)).values()].flat().map((h) => h.pid)),
];

async function listen(t: { after: (fn: () => Promise<void>) => void }): Promise<{ server: Server; port: number }> {
  const server = createServer((s) => s.on("error", () => undefined));
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  t.after(() => new Promise<void>((r) => server.close(() => r())));
  return { server, port: (server.address() as AddressInfo).port };
}

test("a listening server shows up in tcpSockets() as LISTEN with its port, held by this process", async (t) => {
  const { port } = await listen(t);
  const mine = tcpSockets().filter((s) => s.localPort === port && s.state === "LISTEN");
  assert.equal(mine.length, 1, JSON.stringify(mine));
  const sock = mine[0];
  assert.ok(sock);
  assert.equal(sock.family, 4);
  assert.ok(sock.inode > 0);
  assert.ok(socketInodes(process.pid).has(sock.inode));
  assert.ok((await holdersOf([sock.inode])).includes(process.pid));
});

test("an established connection shows up on both ends", async (t) => {
  const { server, port } = await listen(t);
  const accepted = once(server, "connection") as Promise<[Socket]>;
  const client = createConnection({ port, host: "127.0.0.1" });
  await once(client, "connect");
  const [peer] = await accepted;
  const est = tcpSockets().filter(
    (s) => s.state === "ESTABLISHED" && (s.localPort === port || s.localPort === client.localPort),
  );
  assert.equal(est.length, 2, JSON.stringify(est));
  const holders = await holdersOf(est.map((s) => s.inode));
  // Closed here: server.close() (the after hook) waits for open connections.
  client.destroy();
  peer.destroy();
  assert.deepEqual(holders, [process.pid]);
});

test("a closed server's port is no longer LISTEN", async () => {
  const server = createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const port = (server.address() as AddressInfo).port;
  await new Promise<void>((r) => server.close(() => r()));
  assert.equal(
    tcpSockets().some((s) => s.localPort === port && s.state === "LISTEN"),
    false,
  );
});

test("socketHolders of an empty set is empty; socketInodes of a missing pid is empty", async () => {
  assert.deepEqual(await holdersOf([]), []);
  assert.equal(socketInodes(2 ** 22 + 1).size, 0);
});

test("inetSockets with ports gives the full list's sockets on those ports; heldOf the ports portsHeldBy lists", async (t) => {
  const v4 = await listen(t);
  const v6 = createServer();
  v6.listen(0, "::1");
  await once(v6, "listening");
  t.after(() => new Promise<void>((r) => v6.close(() => r())));
  const v6Port = (v6.address() as AddressInfo).port;
  const udp = createSocket("udp4");
  udp.bind(0, "127.0.0.1");
  await once(udp, "listening");
  t.after(() => udp.close());
  const udpPort = udp.address().port;
  const client = createConnection({ port: v4.port, host: "127.0.0.1" });
  await once(client, "connect");

  try {
    const ports = new Set([v4.port, v6Port, udpPort, client.localPort as number, 1]);
    const byKey = (a: InetSocket, b: InetSocket): number => a.inode - b.inode || a.proto.localeCompare(b.proto);
    const filtered = inetSockets("self", ports).sort(byKey);
    const full = inetSockets()
      .filter((s) => ports.has(s.localPort))
      .sort(byKey);
    assert.deepEqual(filtered, full);
    assert.ok(filtered.some((s) => s.proto === "tcp6" && s.localPort === v6Port && s.state === "LISTEN"));
    assert.ok(filtered.some((s) => s.proto === "udp" && s.localPort === udpPort));

    const all = portsHeldBy([process.pid]);
    const held = heldOf([process.pid], ports);
    assert.deepEqual(
      [...held].sort((a, b) => a - b),
      [...ports].filter((p) => all.has(p)).sort((a, b) => a - b),
    );
    assert.ok(held.has(v4.port) && held.has(v6Port) && held.has(udpPort));
    assert.ok(!held.has(client.localPort as number), "a connection's local port is not held");
    assert.deepEqual([...heldOf([process.pid], new Set())], []);
    assert.deepEqual([...heldOf([2 ** 22 + 1], ports)], []);
  } finally {
    client.destroy(); // before the server closes (it waits for its connections)
  }
});
