import assert from "node:assert/strict";
import { once } from "node:events";
import { createConnection, createServer, type AddressInfo, type Server, type Socket } from "node:net";
import { test } from "node:test";
import { holdersOf, socketInodes, tcpSockets } from "../../src/proc/sockets.js";

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
  assert.ok(holdersOf(new Set([sock.inode])).includes(process.pid));
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
  const holders = holdersOf(new Set(est.map((s) => s.inode)));
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

test("holdersOf an empty set is empty; socketInodes of a missing pid is empty", () => {
  assert.deepEqual(holdersOf(new Set()), []);
  assert.equal(socketInodes(2 ** 22 + 1).size, 0);
});
