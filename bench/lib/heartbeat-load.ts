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
import { callApi } from "../../src/client/transport.js";

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

/**
 * What the thread keeps of each heartbeat, in columns of typed arrays, not an object each: a
 * 30-minute soak sends 1.8 million, and a heap of that many objects would give the thread
 * garbage-collection pauses that grow with the run and show up as latency that is not the
 * daemon's. Handed to the main thread at the end, and made into Beats there.
 */
interface Columns {
  /** Per chunk of CHUNK beats. */
  at: Float64Array[];
  ms: Float64Array[];
  /** Index of the id in `ids` (each id once). */
  slot: Uint32Array[];
  /** HTTP status, or 0 with the error in `errors` (by beat number). */
  status: Uint16Array[];
  count: number;
  ids: string[];
  errors: [number, string][];
}

const CHUNK = 65_536;

function beatsOf(c: Columns): Beat[] {
  const errors = new Map(c.errors);
  const out: Beat[] = [];
  for (let i = 0; i < c.count; i++) {
    const k = Math.floor(i / CHUNK);
    const j = i % CHUNK;
    const status = (c.status[k] as Uint16Array)[j] as number;
    out.push({
      id: c.ids[(c.slot[k] as Uint32Array)[j] as number] as string,
      at: (c.at[k] as Float64Array)[j] as number,
      ms: (c.ms[k] as Float64Array)[j] as number,
      status: status === 0 ? (errors.get(i) ?? "error") : status,
    });
  }
  return out;
}

export function startHeartbeatLoad(socket: string, perSecond: number): HeartbeatLoad {
  const setup: Setup = { socket, perSecond, origin: performance.timeOrigin };
  const worker = new Worker(new URL(import.meta.url), { workerData: setup });
  const done = new Promise<Beat[]>((resolve, reject) => {
    worker.once("message", (columns: Columns) => resolve(beatsOf(columns)));
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
  /** Each id once, by first addition: what a beat's `slot` column indexes. */
  const names: string[] = [];
  const slots = new Map<string, number>();
  const cols: Columns = { at: [], ms: [], slot: [], status: [], count: 0, ids: names, errors: [] };
  const record = (id: string, at: number, ms: number, status: number | string): void => {
    const i = cols.count++;
    const k = Math.floor(i / CHUNK);
    if (k === cols.at.length) {
      cols.at.push(new Float64Array(CHUNK));
      cols.ms.push(new Float64Array(CHUNK));
      cols.slot.push(new Uint32Array(CHUNK));
      cols.status.push(new Uint16Array(CHUNK));
    }
    const j = i % CHUNK;
    (cols.at[k] as Float64Array)[j] = at;
    (cols.ms[k] as Float64Array)[j] = ms;
    (cols.slot[k] as Uint32Array)[j] = slots.get(id) as number;
    if (typeof status === "number") (cols.status[k] as Uint16Array)[j] = status;
    else cols.errors.push([i, status]);
  };
  const inFlight = new Set<Promise<void>>();
  let running = true;
  const socketPath = setup.socket;
  const send = (id: string): void => {
    const sent = now();
    const p = callApi(socketPath, "POST", `/v1/sessions/${id}/heartbeat`, { activity: "busy" }, { timeoutMs: 30_000 })
      .then(
        (res) => record(id, sent, now() - sent, res.status),
        (err: NodeJS.ErrnoException) => record(id, sent, now() - sent, String(err.code ?? err.message)),
      )
      .finally(() => inFlight.delete(p));
    inFlight.add(p);
  };
  const t0 = performance.now();
  let n = 0;
  const tick = (): void => {
    if (!running) {
      void Promise.all(inFlight).then(() => port.postMessage(cols));
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
    if ("add" in m) {
      for (const id of m.add) {
        if (!slots.has(id)) {
          slots.set(id, names.length);
          names.push(id);
        }
        ids.push(id);
      }
    } else running = false;
  });
  tick();
}

if (!isMainThread && (workerData as Setup | undefined)?.socket !== undefined) runLoad(workerData as Setup);
