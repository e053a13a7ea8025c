import { callApi } from "../../src/cli/client.js";
import { identify } from "../../src/proc/identity.js";
import { NOT_YET_REAPED, type Session } from "../../src/sessions/types.js";
import { Store } from "../../src/store/store.js";

/**
 * Registers sessions through the API (the real path: identity checks, ports and paths
 * verified, one transaction and one audit line each), `inFlight` requests at a time.
 */
export async function registerMany(
  socket: string,
  bodies: readonly Record<string, unknown>[],
  inFlight = 16,
): Promise<Record<string, unknown>[]> {
  const out = new Array<Record<string, unknown>>(bodies.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < bodies.length) {
      const i = next++;
      const res = await callApi<Record<string, unknown>>(socket, "POST", "/v1/sessions", bodies[i], {
        timeoutMs: 60_000,
      });
      if (res.status !== 201) throw new Error(`registration ${i} answered ${res.status}: ${JSON.stringify(res.body)}`);
      out[i] = res.body;
    }
  };
  await Promise.all(Array.from({ length: inFlight }, worker));
  return out;
}

/**
 * Writes `count` live sessions straight into a database (migrated by the daemon's own Store),
 * as a daemon that registered them and then stopped would have left them. 100,000 real
 * engine processes cannot run on this machine, so the sessions name `engines` (a few real,
 * long-lived processes) round-robin: recovery checks every identity, holds a pidfd, and the
 * liveness pass checks and snapshots every engine, exactly as for distinct engines; what is
 * shared is only the kernel-side process. Deadlines are `timeoutSec` from `now`.
 */
export function seedLiveSessions(
  dbPath: string,
  count: number,
  enginePids: readonly number[],
  opts: { now?: number; timeoutSec?: number; prefix?: string } = {},
): void {
  const now = opts.now ?? Date.now();
  const timeoutSec = opts.timeoutSec ?? 3600;
  const engines = enginePids.map((pid) => identify(pid, "engine", process.pid));
  const store = new Store(dbPath, now);
  try {
    const batch = 10_000;
    for (let from = 0; from < count; from += batch) {
      store.transaction(() => {
        for (let i = from; i < Math.min(count, from + batch); i++) {
          const session: Session = {
            id: `${opts.prefix ?? "seed"}-${String(i).padStart(7, "0")}`,
            profile: "default",
            owner: `owner-${i % 100}`,
            engine: engines[i % engines.length] as Session["engine"],
            ownerPid: null,
            ports: [],
            paths: [],
            labels: { bench: "seed" },
            heartbeatTimeoutSec: timeoutSec,
            idleTimeoutSec: timeoutSec,
            maxLifetimeSec: 0,
            createdAt: now,
            lastHeartbeatAt: now,
            lastActivityAt: now,
            deadline: now + timeoutSec * 1000,
            ...NOT_YET_REAPED,
            registeredBy: { uid: 0, admin: true, via: "unix" },
            containment: null,
          };
          store.insertSession(session);
        }
      });
    }
  } finally {
    store.close();
  }
}
