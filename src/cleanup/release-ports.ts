import { createServer } from "node:net";
import { performance } from "node:perf_hooks";
import { readStat } from "../proc/stat.js";
import { holdersOf, tcpSockets } from "../proc/sockets.js";
import type { Leftover } from "../sessions/types.js";
import { sleep, type CleanupStep } from "./step.js";
import { terminatedProcesses } from "./terminate.js";

/** Sockets close as their last holder exits; give the kernel a moment before judging. */
const SETTLE_MS = 1500;

type PortReport =
  | { port: number; status: "free"; timeWait: number }
  | { port: number; status: "held"; by: "session" | "outside"; pid: number; comm: string }
  | { port: number; status: "bind-failed"; error: string; timeWait: number };

/** Whether a test bind on loopback succeeds (the port is really usable again). */
function testBind(port: number): Promise<string | null> {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.once("error", (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
    srv.listen({ port, host: "127.0.0.1", exclusive: true }, () => srv.close(() => resolve(null)));
  });
}

async function inspect(port: number, session: Set<string>): Promise<PortReport> {
  const sockets = tcpSockets().filter((s) => s.localPort === port);
  const timeWait = sockets.filter((s) => s.state === "TIME_WAIT").length;
  const listening = new Set(sockets.filter((s) => s.state === "LISTEN").map((s) => s.inode));
  for (const pid of holdersOf(listening)) {
    const st = readStat(pid);
    if (st === null) continue;
    const ours = session.has(`${pid}:${st.startTime}`);
    return { port, status: "held", by: ours ? "session" : "outside", pid, comm: st.comm };
  }
  const error = await testBind(port);
  return error === null ? { port, status: "free", timeWait } : { port, status: "bind-failed", error, timeWait };
}

/**
 * Verifies that every registered port is released: no LISTEN socket on it and a test bind
 * succeeds. TIME_WAIT is reported, not a failure. A port now held by a process outside the
 * session is reported as a leftover and never touched.
 */
export const releaseConnectionsAndPorts: CleanupStep = {
  name: "release-connections-and-ports",
  timeoutMs: (p) => p.stepTimeoutSec * 1000,

  async run(ctx, signal) {
    const { ports } = ctx.session;
    if (ports.length === 0) return { ok: true, detail: { ports: [] } };
    const session = new Set(terminatedProcesses(ctx).map((p) => `${p.pid}:${p.startTime}`));
    const settleEnd = Math.min(performance.now() + SETTLE_MS, ctx.deadline - 200);
    let reports: PortReport[];
    for (;;) {
      reports = [];
      for (const port of ports) reports.push(await inspect(port, session));
      const pending = reports.some((r) => r.status === "bind-failed" || (r.status === "held" && r.by === "session"));
      if (!pending || signal.aborted || performance.now() >= settleEnd) break;
      await sleep(100);
    }
    const leftovers: Leftover[] = [];
    for (const r of reports) {
      if (r.status === "held") {
        leftovers.push({
          step: "release-connections-and-ports",
          kind: "port",
          item: String(r.port),
          detail:
            r.by === "outside"
              ? `held by pid ${r.pid} (${r.comm}), a process outside the session: not touched`
              : `still held by session process ${r.pid} (${r.comm})`,
        });
      } else if (r.status === "bind-failed") {
        leftovers.push({
          step: "release-connections-and-ports",
          kind: "port",
          item: String(r.port),
          detail: `no listener found, but a test bind failed: ${r.error}`,
        });
      }
    }
    // An outsider on the port is reported, but the session itself released what it held.
    const ok = reports.every((r) => r.status === "free" || (r.status === "held" && r.by === "outside"));
    return { ok, detail: { ports: reports }, leftovers };
  },
};
