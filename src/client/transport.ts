import { Agent, request, type IncomingHttpHeaders } from "node:http";
import { reachablePath, SOCKET_PATH_MAX } from "../paths/socket-path.js";
import { ReaperError } from "../errors.js";

export interface ApiResponse<T = unknown> {
  status: number;
  body: T;
  /**
   * How long the daemon keeps this connection open while idle (its `Keep-Alive: timeout=N`
   * header, in ms), or null if it closes it: a request sent sooner reuses the connection.
   */
  keepAliveMs?: number | null;
}

/**
 * The connections to the daemon, kept open between requests and shared by every caller in
 * the process. A kept connection is dropped a second before the daemon's announced keep-alive
 * timeout (Node's agent reads `Keep-Alive: timeout=N`), so a request never races the daemon
 * closing it; the agent's own timeout only bounds a connection the daemon announced nothing
 * for. Kept connections never hold the process open.
 */
const agent = new Agent({ keepAlive: true, scheduling: "lifo", timeout: 60_000 });

/** `Keep-Alive: timeout=N` in ms; null without one. */
function keepAliveOf(header: string | string[] | undefined): number | null {
  const sec = typeof header !== "string" ? undefined : /(?:^|[\s,])timeout=(\d+)/.exec(header)?.[1];
  return sec === undefined ? null : Number(sec) * 1000;
}

/** The longest wait between two connects refused with EAGAIN. */
const CONNECT_RETRY_MAX_MS = 200;

type CallOptions = { timeoutMs?: number; rawBody?: string; headers?: Record<string, string> };

/**
 * One JSON request to the daemon over its unix socket. Any HTTP answer resolves (callers
 * look at `status`); only transport failures reject: `SR_DAEMON_UNREACHABLE` (no socket, or
 * nobody listening), an error with code `ETIMEDOUT` (no answer in time), or the socket's own
 * error (`ECONNRESET`, `EPIPE`: the daemon went away mid-request). A kept connection found
 * closed before any answer (the process was paused past the daemon's keep-alive) is not an
 * error: the request is sent once more on a new connection.
 *
 * A connect refused with EAGAIN (the socket's listen backlog is full: a burst, or a local
 * user crowding it) is tried again, from 5 ms doubling to 200 ms, within the timeout: nothing
 * was sent, so any request may be.
 */
export async function callApi<T = unknown>(
  socketPath: string,
  method: string,
  path: string,
  body?: unknown,
  opts: CallOptions = {},
): Promise<ApiResponse<T>> {
  const end = Date.now() + (opts.timeoutMs ?? 10_000);
  let staleRetried = false;
  for (let delay = 5; ; delay = Math.min(CONNECT_RETRY_MAX_MS, delay * 2)) {
    try {
      return await callOnce<T>(socketPath, method, path, body, opts);
    } catch (err) {
      const e = err as NodeJS.ErrnoException & { staleConnection?: boolean };
      // A kept connection the daemon had closed while this process could not see it (it was
      // stopped, SIGSTOP, past the keep-alive): the request never reached the daemon, and is
      // sent once more on a new connection.
      if (e.staleConnection === true && !staleRetried) {
        staleRetried = true;
        continue;
      }
      if (e.code !== "EAGAIN" || e.syscall !== "connect" || Date.now() + delay >= end) throw err;
    }
    await new Promise((r) => setTimeout(r, delay));
  }
}

function callOnce<T>(
  socketPath: string,
  method: string,
  path: string,
  body: unknown,
  opts: CallOptions,
): Promise<ApiResponse<T>> {
  const payload = opts.rawBody ?? (body === undefined ? undefined : JSON.stringify(body));
  const reachable = reachablePath(socketPath);
  if (reachable === null) {
    // The kernel would cut the path short and try another name.
    return Promise.reject(
      new ReaperError(
        "SR_DAEMON_UNREACHABLE",
        `cannot reach the daemon at ${socketPath}: the path is ${Buffer.byteLength(socketPath)} bytes, longer than a unix socket path may be (${SOCKET_PATH_MAX}); give a shorter one (--socket or REAPER_SOCKET), or run from a directory nearer to it`,
      ),
    );
  }
  return new Promise((resolve, reject) => {
    const req = request(
      {
        // A path too long for the kernel (a clone in a deep directory) is reached by its name
        // relative to the working directory, as the daemon bound it.
        socketPath: reachable,
        agent,
        method,
        path,
        headers: {
          host: "localhost",
          ...(payload === undefined ? {} : { "content-type": "application/json" }),
          ...opts.headers,
        },
        timeout: opts.timeoutMs ?? 10_000,
      },
      (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (d: string) => (text += d));
        res.on("end", () => {
          let parsed: unknown = text;
          try {
            parsed = text === "" ? null : JSON.parse(text);
          } catch {
            // not JSON (e.g. /metrics): keep the text
          }
          resolve({
            status: res.statusCode ?? 0,
            body: parsed as T,
            keepAliveMs: keepAliveOf(res.headers["keep-alive"]),
          });
        });
        res.on("error", reject);
      },
    );
    req.on("timeout", () =>
      req.destroy(
        Object.assign(new Error(`no answer from ${socketPath} within ${opts.timeoutMs ?? 10_000} ms`), {
          code: "ETIMEDOUT",
        }),
      ),
    );
    let answered = false;
    req.on("response", () => (answered = true));
    req.on("error", (err: NodeJS.ErrnoException) => {
      if (req.reusedSocket && !answered && (err.code === "ECONNRESET" || err.code === "EPIPE")) {
        reject(Object.assign(err, { staleConnection: true }));
      } else if (err.code === "ENOENT" || err.code === "ECONNREFUSED") {
        reject(
          new ReaperError(
            "SR_DAEMON_UNREACHABLE",
            `cannot reach the daemon at ${socketPath} (${err.code}): is it running?`,
          ),
        );
      } else reject(err);
    });
    if (payload !== undefined) req.write(payload);
    req.end();
  });
}

/** A streamed answer (GET /v1/events): its status and headers at once, its lines as they arrive. */
export interface ApiStream {
  status: number;
  headers: IncomingHttpHeaders;
  /**
   * The body's lines, without their newline (empty ones included), until the daemon ends the
   * body; throws if the connection breaks first, or (`ETIMEDOUT`) stays silent past the idle timeout.
   */
  lines: AsyncIterable<string>;
  /** The whole body, parsed as JSON when it is (an error's envelope). */
  body(): Promise<unknown>;
  /** Closes the connection (ends `lines`). */
  close(): void;
}

/**
 * A GET whose answer is read as it arrives, on a connection of its own (never the kept ones:
 * a stream holds its connection for as long as it runs). Rejects as `callApi` does when the
 * daemon cannot be reached. `idleTimeoutMs`: the connection is dropped (`ETIMEDOUT`) when
 * nothing arrives for that long, headers or body (default 45 s: three of the daemon's 15 s
 * keep-alive lines). `signal` closes it.
 */
export function streamApi(
  socketPath: string,
  path: string,
  opts: { idleTimeoutMs?: number; signal?: AbortSignal } = {},
): Promise<ApiStream> {
  const reachable = reachablePath(socketPath);
  if (reachable === null) {
    return Promise.reject(
      new ReaperError(
        "SR_DAEMON_UNREACHABLE",
        `cannot reach the daemon at ${socketPath}: the path is longer than a unix socket path may be (${SOCKET_PATH_MAX})`,
      ),
    );
  }
  const idleMs = opts.idleTimeoutMs ?? 45_000;
  return new Promise((resolve, reject) => {
    // Why the connection was dropped here, when it was (the body's own error only says "aborted").
    let dropped: Error | null = null;
    const req = request(
      {
        socketPath: reachable,
        agent: false,
        method: "GET",
        path,
        headers: { host: "localhost", accept: "application/x-ndjson" },
        timeout: idleMs,
        ...(opts.signal === undefined ? {} : { signal: opts.signal }),
      },
      (res) => {
        res.setEncoding("utf8");
        const lines = async function* (): AsyncGenerator<string> {
          let rest = "";
          try {
            for await (const chunk of res as AsyncIterable<string>) {
              rest += chunk;
              for (let nl = rest.indexOf("\n"); nl >= 0; nl = rest.indexOf("\n")) {
                yield rest.slice(0, nl);
                rest = rest.slice(nl + 1);
              }
            }
          } catch (err) {
            throw dropped ?? err;
          }
          if (dropped !== null) throw dropped;
          if (rest !== "") yield rest;
        };
        resolve({
          status: res.statusCode ?? 0,
          headers: res.headers,
          lines: lines(),
          body: async () => {
            let text = "";
            for await (const chunk of res as AsyncIterable<string>) text += chunk;
            try {
              return text === "" ? null : (JSON.parse(text) as unknown);
            } catch {
              return text;
            }
          },
          close: () => req.destroy(),
        });
      },
    );
    req.on("timeout", () => {
      dropped = Object.assign(new Error(`nothing from ${socketPath} within ${idleMs} ms`), { code: "ETIMEDOUT" });
      req.destroy(dropped);
    });
    req.on("error", (err: NodeJS.ErrnoException) => {
      if (err.code === "ENOENT" || err.code === "ECONNREFUSED") {
        reject(
          new ReaperError(
            "SR_DAEMON_UNREACHABLE",
            `cannot reach the daemon at ${socketPath} (${err.code}): is it running?`,
          ),
        );
      } else reject(err);
    });
    req.end();
  });
}
