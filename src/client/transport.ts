import { Agent, request } from "node:http";
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
