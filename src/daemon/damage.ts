import type { Logger } from "pino";
import type { AuditTrail } from "../audit/audit.js";
import type { Metrics } from "../metrics/metrics.js";
import { describeDamage, engineDamage, whereIs } from "../store/columns.js";
import type { Store } from "../store/store.js";
import type { Damage, SessionState } from "../model/session.js";

/**
 * What the daemon does with a session whose row is damaged, by the session's state:
 * - watched: live, its engine identified: watched and reaped as usual, what is damaged treated
 *   conservatively (damaged paths never deleted, no hook fed a damaged value, never `clean`);
 * - quarantined: `damaged`, its engine cannot be identified: nothing watched, nothing signalled;
 *   an operator closes or force-reaps it;
 * - reaping: its reap goes on, on the same terms (with nothing signalled if its engine cannot be
 *   identified) and ends, `partial` or `failed`, with the damage in its reap.finished;
 * - none: it has ended; it is shown with what can be read.
 */
export type DamageAction = "watched" | "quarantined" | "reaping" | "none";

const ACTIONS: Record<SessionState, DamageAction> = {
  live: "watched",
  damaged: "quarantined",
  reaping: "reaping",
  reaped: "none",
};

/**
 * Names every damaged stored value the store meets (src/store/columns.ts), once per value and
 * daemon run: a warning in the log, `session_reaper_store_damage_total{table,column}`, and one
 * `session.damaged` audit event per session with the values newly found and what the daemon does
 * about it. The event is recorded at the next turn of the event loop: the store tells of damage
 * in the middle of its reads (a statement being iterated takes no write).
 */
export class DamageWatch {
  private readonly seen = new Set<string>();
  private pending = new Map<string, Damage[]>();
  private scheduled = false;

  constructor(private readonly deps: { store: Store; audit: AuditTrail; metrics: Metrics; log: Logger }) {
    deps.store.onDamage((sessionId, damage) => this.found(sessionId, damage));
  }

  private found(sessionId: string, damage: readonly Damage[]): void {
    for (const d of damage) {
      const key = `${d.table}\0${JSON.stringify(d.row)}\0${d.column}`;
      if (this.seen.has(key)) continue;
      this.seen.add(key);
      this.deps.metrics.storeDamage(d.table, d.column);
      this.deps.log.warn(
        { sessionId, table: d.table, row: d.row, column: d.column, error: d.error },
        `a stored value cannot be read: ${whereIs(d)}: ${d.error}`,
      );
      let list = this.pending.get(sessionId);
      if (list === undefined) this.pending.set(sessionId, (list = []));
      list.push(d);
    }
    if (this.pending.size > 0 && !this.scheduled) {
      this.scheduled = true;
      setImmediate(() => this.flush());
    }
  }

  /** Records the `session.damaged` events of the values found since the last flush. */
  flush(): void {
    this.scheduled = false;
    const batch = this.pending;
    this.pending = new Map();
    for (const [sessionId, damage] of batch) {
      try {
        const session = this.deps.store.getSession(sessionId);
        const state = session?.state ?? null;
        const action = state === null ? "none" : ACTIONS[state];
        this.deps.audit.record({ event: "session.damaged", sessionId, detail: { damage, state, action } });
        if (action === "quarantined" && session !== undefined) {
          this.deps.log.error(
            { sessionId, damage: session.damage },
            `session ${sessionId} is quarantined (state damaged): its engine cannot be identified (${describeDamage(engineDamage(session))}); nothing is signalled for it: deal with its processes, then close or force-reap it`,
          );
        }
      } catch (err) {
        this.deps.log.error({ err, sessionId }, "could not record a session's damage");
      }
    }
  }
}
