import { connect, type Socket } from "node:net";
import { performance } from "node:perf_hooks";

/**
 * The load tool, the same for every server measured: `connections` keep-alive connections
 * over a unix socket, each sending one request and waiting for its complete answer before
 * the next (no pipelining). Requests are pre-built bytes written straight to the socket and
 * answers are parsed just enough to find their end (status line, Content-Length), so the
 * client stays far cheaper than any server it measures: a load generator that is itself the
 * bottleneck would make every server look equally fast.
 */
export interface LoadOptions {
  socketPath: string;
  connections: number;
  durationMs: number;
  /** The requests, used round-robin across all connections (e.g. one per session id). */
  requests: readonly Buffer[];
}

export interface LoadResult {
  requests: number;
  /** Answers that were not 2xx. */
  errors: number;
  statuses: Record<number, number>;
  reqPerSec: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
}

/** A JSON POST as the client library sends it. */
export function postRequest(path: string, body: string): Buffer {
  return Buffer.from(
    `POST ${path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n` +
      `Content-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
  );
}

const CRLFCRLF = Buffer.from("\r\n\r\n");
const CONTENT_LENGTH = /\r\ncontent-length:\s*(\d+)/i;
/** Latency histogram: 10 µs buckets up to 2 s (beyond: the last bucket). */
const BUCKET_US = 10;
const BUCKETS = 200_000;

export async function runLoad(opts: LoadOptions): Promise<LoadResult> {
  const hist = new Uint32Array(BUCKETS);
  let maxMs = 0;
  let count = 0;
  let errors = 0;
  const statuses: Record<number, number> = {};
  let next = 0;
  const nextRequest = (): Buffer => {
    const r = opts.requests[next] as Buffer;
    next = next + 1 === opts.requests.length ? 0 : next + 1;
    return r;
  };
  let stopping = false;
  const t0 = performance.now();
  let t1 = t0;

  const one = (): Promise<void> =>
    new Promise((resolve, reject) => {
      const sock: Socket = connect({ path: opts.socketPath });
      sock.setNoDelay(true);
      let buf: Buffer = Buffer.alloc(0);
      let sentAt = 0;
      const send = (): void => {
        if (stopping) {
          sock.end();
          return;
        }
        sentAt = performance.now();
        sock.write(nextRequest());
      };
      sock.on("connect", send);
      sock.on("data", (chunk: Buffer) => {
        buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
        for (;;) {
          const headEnd = buf.indexOf(CRLFCRLF);
          if (headEnd < 0) return;
          const head = buf.toString("latin1", 0, headEnd);
          const status = Number(head.slice(9, 12));
          let bodyLen = 0;
          if (status !== 204 && status !== 304) {
            const m = CONTENT_LENGTH.exec(head);
            if (m === null) {
              sock.destroy();
              reject(new Error(`answer without Content-Length (chunked?): ${head}`));
              return;
            }
            bodyLen = Number(m[1]);
          }
          const total = headEnd + 4 + bodyLen;
          if (buf.length < total) return;
          buf = buf.subarray(total);
          const now = performance.now();
          const ms = now - sentAt;
          if (ms > maxMs) maxMs = ms;
          const bucket = Math.min(BUCKETS - 1, Math.floor((ms * 1000) / BUCKET_US));
          hist[bucket] = (hist[bucket] as number) + 1;
          count++;
          statuses[status] = (statuses[status] ?? 0) + 1;
          if (status < 200 || status > 299) errors++;
          t1 = now;
          send();
        }
      });
      sock.on("error", reject);
      sock.on("close", () => resolve());
    });

  const timer = setTimeout(() => (stopping = true), opts.durationMs);
  try {
    await Promise.all(Array.from({ length: opts.connections }, one));
  } finally {
    clearTimeout(timer);
  }
  const quantile = (q: number): number => {
    const target = Math.ceil(q * count);
    let seen = 0;
    for (let i = 0; i < BUCKETS; i++) {
      seen += hist[i] as number;
      if (seen >= target) return ((i + 1) * BUCKET_US) / 1000;
    }
    return maxMs;
  };
  return {
    requests: count,
    errors,
    statuses,
    reqPerSec: (count * 1000) / (t1 - t0),
    p50Ms: quantile(0.5),
    p99Ms: quantile(0.99),
    maxMs,
  };
}
