import { callApi } from "../../src/client/transport.js";
import { identify } from "../../src/proc/identity.js";
import { NOT_YET_REAPED, type ProcessIdentity, type Session } from "../../src/model/session.js";
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
 * An engine that seeded sessions name: a pid, with the ports and paths each session naming it
 * declares (as registration would record them; default none).
 */
export interface SeedEngine {
  pid: number;
  ports?: readonly number[];
  paths?: readonly string[];
}

/**
 * Writes `count` live sessions straight into a database (migrated by the daemon's own Store),
 * as a daemon that registered them and then stopped would have left them. Session i names
 * engine i modulo `engines.length`: figures 3, 5 and 6 pass a few real, long-lived processes
 * (100,000 real engine processes cannot run on this machine), so recovery checks every
 * identity, holds a pidfd, and the liveness pass checks and snapshots every engine, exactly as
 * for distinct engines, and what is shared is only the kernel-side process; figure 8 passes
 * as many engines as sessions, each with its port and dir. Deadlines are `timeoutSec` from
 * `now`. `engineTree`: store each session's tree as registration does (the engine's
 * descendants: the engine alone, for engines that fork nothing); default an empty tree.
 * Returns the engines' identities, in the order given.
 */
export function seedLiveSessions(
  dbPath: string,
  count: number,
  engines: readonly (number | SeedEngine)[],
  opts: { now?: number; timeoutSec?: number; prefix?: string; engineTree?: boolean } = {},
): ProcessIdentity[] {
  const now = opts.now ?? Date.now();
  const timeoutSec = opts.timeoutSec ?? 3600;
  const seeds = engines.map((e): SeedEngine => (typeof e === "number" ? { pid: e } : e));
  const identities = seeds.map((e) => identify(e.pid, "engine", process.pid));
  const store = new Store(dbPath, now);
  try {
    const batch = 10_000;
    for (let from = 0; from < count; from += batch) {
      store.transaction(() => {
        for (let i = from; i < Math.min(count, from + batch); i++) {
          const seed = seeds[i % seeds.length] as SeedEngine;
          const engine = identities[i % identities.length] as ProcessIdentity;
          const session: Session = {
            id: `${opts.prefix ?? "seed"}-${String(i).padStart(7, "0")}`,
            profile: "default",
            owner: `owner-${i % 100}`,
            engine,
            ownerPid: null,
            ports: seed.ports ?? [],
            paths: seed.paths ?? [],
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
            tracking: null,
          };
          store.insertSession(session, opts.engineTree === true ? [engine] : []);
        }
      });
    }
  } finally {
    store.close();
  }
  return identities;
}
