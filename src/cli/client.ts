import { request } from "node:http";
import { ReaperError } from "../errors.js";

export interface ApiResponse<T = unknown> {
  status: number;
  body: T;
}

/**
 * One JSON request to the daemon over its unix socket. Any HTTP answer resolves (callers
 * look at `status`); only transport failures reject: `SR_DAEMON_UNREACHABLE` (no socket, or
 * nobody listening), an error with code `ETIMEDOUT` (no answer in time), or the socket's own
 * error (`ECONNRESET`, `EPIPE`: the daemon went away mid-request).
 */
export function callApi<T = unknown>(
  socketPath: string,
  method: string,
  path: string,
  body?: unknown,
  opts: { timeoutMs?: number; rawBody?: string; headers?: Record<string, string> } = {},
): Promise<ApiResponse<T>> {
  const payload = opts.rawBody ?? (body === undefined ? undefined : JSON.stringify(body));
  return new Promise((resolve, reject) => {
    const req = request(
      {
        socketPath,
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
          resolve({ status: res.statusCode ?? 0, body: parsed as T });
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
    if (payload !== undefined) req.write(payload);
    req.end();
  });
}
