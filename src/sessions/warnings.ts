import type { Logger } from "pino";
import type { AuditTrail } from "../audit/audit.js";
import { runReleaseHooks } from "../cleanup/release-hooks.js";
import type { Config, Profile } from "../config/load.js";
import type { Deadline } from "../model/deadline.js";
import type { LiveSession, SessionWarning } from "../model/live-session.js";
import type { WarnReason } from "../model/session.js";
import type { Metrics } from "../metrics/metrics.js";
import type { Store } from "../store/store.js";
import type { LiveSessions } from "./live.js";

/** Warning hooks running at once; more wait their turn (a thousand deadlines may share a second). */
const HOOKS_AT_ONCE = 16;
/** Warnings whose hooks wait; beyond, a warning's hooks are not run (the event still is), and the log says so. */
const HOOK_QUEUE_MAX = 10_000;

export interface WarningsDeps {
  store: Store;
  audit: AuditTrail;
  registry: LiveSessions;
  config: Config;
  log: Logger;
  clock: { mono(): number };
  metrics?: Pick<Metrics, "warned"> | undefined;
}

/**
 * Warnings before a reap (profiles.NAME.warn_before_sec): a `session.warning` audit event,
 * the warning shown with the session until activity voids it, and the profile's warn_hooks.
 * Given by the detector's timer at the moment (an idle or lifetime deadline minus
 * warn_before_sec), and by the pressure watch before it reclaims a session that warns.
 */
export class Warnings {
  private running = 0;
  private readonly waiting: (() => Promise<void>)[] = [];
  private dropped = 0;

  constructor(private readonly deps: WarningsDeps) {}

  /** The detector's: a deadline's warning came due. */
  deadline(s: LiveSession, d: Deadline): void {
    this.give(s, d.reason as WarnReason, d.at);
  }

  /**
   * Records the warning and marks it on the session, then starts its hooks. The record
   * outside a transaction never fails the caller (a store that cannot commit marks the line
   * `stored: false`); the warning then stands all the same, so it is not repeated every second.
   */
  give(s: LiveSession, reason: WarnReason, deadlineMono: number): SessionWarning | null {
    const { registry, audit, clock } = this.deps;
    if (registry.get(s.id) !== s) return null;
    const inSec = Math.max(0, Math.round((deadlineMono - clock.mono()) / 1000));
    const deadline = new Date(registry.toWall(deadlineMono)).toISOString();
    audit.record({ event: "session.warning", sessionId: s.id, reason, detail: { deadline, inSec } });
    const warning = registry.warned(s, reason, deadlineMono);
    this.deps.metrics?.warned(reason);
    this.runHooks(s.id, reason, deadline, inSec);
    return warning;
  }

  private runHooks(id: string, reason: WarnReason, deadline: string, inSec: number): void {
    const session = this.deps.store.getSession(id);
    if (session === undefined) return;
    const profile: Profile | undefined = this.deps.config.profiles[session.profile];
    if (profile === undefined || profile.warnHooks.length === 0) return;
    if (this.waiting.length >= HOOK_QUEUE_MAX) {
      if (this.dropped++ % 1000 === 0) {
        this.deps.log.warn(
          { sessionId: id, dropped: this.dropped },
          `warning hooks not run: ${HOOK_QUEUE_MAX} warnings already wait for theirs (the session.warning events are recorded)`,
        );
      }
      return;
    }
    const log = this.deps.log.child({ sessionId: id });
    this.waiting.push(async () => {
      const signal = new AbortController().signal; // each hook has its own timeout
      await runReleaseHooks(
        profile.warnHooks,
        profile.hookPath,
        session,
        1,
        profile.stepTimeoutSec * 1000,
        signal,
        log,
        {
          kind: "warning",
          placeholders: { reason, in_sec: String(inSec) },
          body: { reason, deadline, inSec },
        },
      );
    });
    this.pump();
  }

  private pump(): void {
    while (this.running < HOOKS_AT_ONCE && this.waiting.length > 0) {
      const next = this.waiting.shift() as () => Promise<void>;
      this.running++;
      void next()
        .catch((err: unknown) => this.deps.log.error({ err }, "warning hooks failed"))
        .finally(() => {
          this.running--;
          this.pump();
        });
    }
  }

  /** Hooks still running or waiting (shutdown waits for none: a warning's hook is a notice). */
  get pending(): number {
    return this.running + this.waiting.length;
  }
}
