/**
 * A heartbeat load for figure 7 on a thread of its own: its event loop does nothing else, so
 * the latencies it measures are the daemon's (and the machine's), not the time the bench's
 * own checks (the engines' /proc and /proc/net reads, the log's counting) held its loop.
 *
 * Every live session heartbeats once a second from its registration, evenly spread: the k-th
 * id added gets slot k of each second (of `perSecond` slots). Behind schedule (the thread not
 * scheduled), every heartbeat due is sent at once, so no session goes without one for longer
 * than the thread's own stall. Each heartbeat opens a new unix-socket connection, as a shell
 * client would.
 */
import { performance } from "node:perf_hooks";
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";
import { callApi } from "../../src/cli/client.js";

export interface Beat {
  id: string;
  /** When it was sent, on the main thread's performance.now() clock. */
  at: number;
  ms: number;
  /** The HTTP status, or the client's error code (a refused or timed-out connection). */
  status: number | string;
}

interface Setup {
  socket: string;
  perSecond: number;
  /** The main thread's performance.timeOrigin: times are sent back on its clock. */
  origin: number;
}

type ToWorker = { add: string[] } | { stop: true };

export interface HeartbeatLoad {
  /** The sessions registered since: they heartbeat from now on, in this order. */
  add(ids: readonly string[]): void;
  /** Stops sending, waits for every answer, and returns every heartbeat. */
  stop(): Promise<Beat[]>;
}

export function startHeartbeatLoad(socket: string, perSecond: number): HeartbeatLoad {
  const setup: Setup = { socket, perSecond, origin: performance.timeOrigin };
  const worker = new Worker(new URL(import.meta.url), { workerData: setup });
  const done = new Promise<Beat[]>((resolve, reject) => {
    worker.once("message", (beats: Beat[]) => resolve(beats));
    worker.once("error", reject);
    worker.once("exit", (code) => reject(new Error(`the heartbeat thread exited (${code}) before its report`)));
  });
  return {
    add: (ids) => worker.postMessage({ add: [...ids] } satisfies ToWorker),
    stop: async () => {
      worker.postMessage({ stop: true } satisfies ToWorker);
      const beats = await done;
      await worker.terminate();
      return beats;
    },
  };
}

function runLoad(setup: Setup): void {
  const port = parentPort;
  if (port === null) throw new Error("not a worker");
  const shift = performance.timeOrigin - setup.origin;
  const now = (): number => performance.now() + shift;
  const ids: string[] = [];
  const beats: Beat[] = [];
  const inFlight = new Set<Promise<void>>();
  let running = true;
  const socketPath = setup.socket;
  const send = (id: string): void => {
    const sent = now();
    const p = callApi(socketPath, "POST", `/v1/sessions/${id}/heartbeat`, { activity: "busy" }, { timeoutMs: 30_000 })
      .then(
        (res) => void beats.push({ id, at: sent, ms: now() - sent, status: res.status }),
        (err: NodeJS.ErrnoException) =>
          void beats.push({ id, at: sent, ms: now() - sent, status: String(err.code ?? err.message) }),
      )
      .finally(() => inFlight.delete(p));
    inFlight.add(p);
  };
  const t0 = performance.now();
  let n = 0;
  const tick = (): void => {
    if (!running) {
      void Promise.all(inFlight).then(() => port.postMessage(beats));
      return;
    }
    const due = Math.floor(((performance.now() - t0) * setup.perSecond) / 1000);
    for (; n <= due; n++) {
      const slot = n % setup.perSecond;
      if (slot < ids.length) send(ids[slot] as string);
    }
    setTimeout(tick, Math.max(1, t0 + (n * 1000) / setup.perSecond - performance.now()));
  };
  port.on("message", (m: ToWorker) => {
    if ("add" in m) ids.push(...m.add);
    else running = false;
  });
  tick();
}

if (!isMainThread && (workerData as Setup | undefined)?.socket !== undefined) runLoad(workerData as Setup);
