/**
 * More of what the engine tests need beside lib.ts: independent looks at a process's cwd,
 * its established connections and its IPC; a real `reaperd` process driven over its socket
 * (for restarts); and the cleanup of the cgroup dirs a daemon made for a test's database.
 * Nothing here uses the daemon's own checks: /proc, `ss` and the file system only.
 */
import { readlinkSync } from "node:fs";
import type { Session } from "../../src/client/index.js";
import { callApi, type ApiResponse } from "../../src/client/transport.js";
import { until } from "../helpers.js";
import { postgresIpcOf, ssUsers } from "./lib.js";

/**
 * No periodic liveness pass during the test (once a year): its tree snapshot would see a
 * child only by luck of timing. (postgres.test.ts has the same.)
 */
export const NO_LIVENESS_PASS = { liveness_schedule: "0 0 0 1 1 *" };

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Where /proc says the process's working directory is (null: gone or unreadable). */
export function cwdOf(pid: number): string | null {
  try {
    return readlinkSync(`/proc/${pid}/cwd`);
  } catch {
    return null;
  }
}

/** Who holds an ESTABLISHED TCP connection whose local port is `port`, from `ss -Htnp`. */
export function establishedOn(port: number): { pid: number; comm: string; line: string }[] {
  return ssUsers(["-Htnp", "state", "established", `sport = :${port}`]);
}

export { removeCgroupBaseAfter } from "../helpers.js";

/**
 * The PostgreSQL IPC objects of `uid` still present that no `ipc` leftover of the session names
 * (`sysv_shm <id>`, `posix_shm <file>`): the SysV segment (the daemon matches it by creator
 * pid), and with `posix` the /dev/shm/PostgreSQL.* files too (the daemon matches those by owner
 * and birth time, since the registration less 1 s: a cluster registered later than that after
 * its start has its segments never looked at; see the todo test in postgres.test.ts).
 */
export function unreportedIpc(s: Pick<Session, "leftovers">, uid: number, opts: { posix: boolean }): string[] {
  const named = (item: string): boolean => s.leftovers.some((l) => l.kind === "ipc" && l.item === item);
  const { shmids, files } = postgresIpcOf(uid);
  return [
    ...shmids
      .filter((id) => !named(`sysv_shm ${id}`))
      .map((id) => `SysV shm ${id} of uid ${uid} is left and unreported`),
    ...(opts.posix ? files : [])
      .filter((f) => !named(`posix_shm ${f}`))
      .map((f) => `${f} of uid ${uid} is left and unreported`),
  ];
}

/** An audit event as GET /v1/sessions/{id}/events lists it. */
export interface ApiEvent {
  event: string;
  sessionId?: string;
  reason?: string;
  outcome?: string;
  detail?: Record<string, unknown>;
}

/** A daemon reached over its socket only (a real `reaperd` process, across its restarts). */
export interface SocketApi {
  api<T = Record<string, unknown>>(method: string, path: string, body?: unknown): Promise<ApiResponse<T>>;
  session(id: string): Promise<Session>;
  events(id: string): Promise<ApiEvent[]>;
  /** Resolves with the session once it is `reaped` (polled), rejects after `timeoutMs`. */
  reaped(id: string, timeoutMs?: number): Promise<Session>;
}

export function socketApi(socket: string): SocketApi {
  const api = <T>(method: string, path: string, body?: unknown): Promise<ApiResponse<T>> =>
    callApi<T>(socket, method, path, body);
  const session = async (id: string): Promise<Session> => {
    const r = await api<Session>("GET", `/v1/sessions/${id}`);
    if (r.status !== 200) throw new Error(`GET /v1/sessions/${id}: ${r.status} ${JSON.stringify(r.body)}`);
    return r.body;
  };
  return {
    api,
    session,
    events: async (id) => (await api<{ events: ApiEvent[] }>("GET", `/v1/sessions/${id}/events`)).body.events,
    reaped: async (id, timeoutMs = 30_000) => {
      let s: Session | undefined;
      await until(
        async () => {
          s = await session(id);
          return s.state === "reaped";
        },
        timeoutMs,
        `session ${id} reaped`,
      );
      return s as Session;
    },
  };
}
