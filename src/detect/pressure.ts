import { readFileSync } from "node:fs";
import { join } from "node:path";
import type { Logger } from "pino";
import type { Clock } from "../clock.js";
import type { PressureConfig } from "../config/load.js";
import type { LiveSession } from "../model/live-session.js";
import { cgroupPids } from "../proc/cgroup.js";
import { readStat } from "../proc/stat.js";
import { processUsage } from "../proc/usage.js";
import type { LiveSessions } from "../sessions/live.js";

/** How often the PSI file is read (one small read on the loop). */
const READ_EVERY_MS = 1000;
/** The CPU of the candidates is sampled over this window before one is chosen. */
const CPU_WINDOW_MS = 1000;
/** Candidates measured afresh (memory, CPU), the largest by the last liveness pass first. */
const MEASURED = 8;
/** At most one log line per this many ms about an unreadable PSI file. */
const NOTE_EVERY_MS = 60_000;

/**
 * `some avg10` of a PSI file's text (the kernel's format: "some avg10=1.23 avg60=… total=…"),
 * or null if the line is not there.
 */
export function someAvg10(text: string): number | null {
  const m = /^some avg10=(\d+(?:\.\d+)?) /m.exec(text);
  return m ? Number(m[1]) : null;
}

/** What a session's processes hold and have used, read now. */
export interface Footprint {
  readonly rssBytes: number;
  readonly cpuSec: number;
}

/**
 * Its processes' resident memory and CPU now: a contained session's cgroup (memory.current
 * where the memory controller is on, else the members' resident sum; cpu.stat), else its
 * engine and tracked tree, each taken only if it is still the process the session knew (its
 * start time: a recycled pid's memory is nobody's). Null if nothing of it is left.
 */
export function footprint(s: LiveSession): Footprint | null {
  if (s.cgroup !== null) {
    const pids = cgroupPids(s.cgroup);
    let cpuSec = 0;
    try {
      const m = /^usage_usec (\d+)$/m.exec(readFileSync(join(s.cgroup, "cpu.stat"), "latin1"));
      cpuSec = m ? Number(m[1]) / 1e6 : 0;
    } catch {
      return null;
    }
    let rssBytes: number;
    try {
      rssBytes = Number(readFileSync(join(s.cgroup, "memory.current"), "latin1").trim());
    } catch {
      rssBytes = processUsage(pids).memoryBytes;
    }
    return pids.length === 0 ? null : { rssBytes, cpuSec };
  }
  const pids = new Set<number>();
  for (const p of [s.engine, ...s.tree]) {
    if (readStat(p.pid)?.startTime === p.startTime) pids.add(p.pid);
  }
  if (pids.size === 0) return null;
  const u = processUsage([...pids]);
  return { rssBytes: u.memoryBytes, cpuSec: u.cpuSec };
}

export interface PressureDeps {
  config: PressureConfig;
  registry: LiveSessions;
  clock: Clock;
  log: Logger;
  /** Fences the session with this reason and queues its reap. */
  expire: (id: string, reason: "memory_pressure", detail: Record<string, unknown>) => void;
  /** Gives a session a memory-pressure warning due in `sec` (the profile's warn_before_sec). */
  warn: (s: LiveSession, sec: number) => void;
}

/** A session warned of a reclaim: reaped when its warning's time comes, if pressure and its idleness still hold. */
interface Pending {
  readonly s: LiveSession;
  /** When it was warned, and when it is taken (monotonic ms). */
  readonly warnedMono: number;
  readonly atMono: number;
  readonly rssBytes: number;
}

/**
 * Reclaims idle sessions while the host's memory pressure holds ([pressure]), before the
 * kernel's OOM killer picks a busy process. The PSI file's `some avg10` is read every second;
 * once it has stayed at or above the threshold for `duration_sec`, one idle session is
 * reclaimed (reason `memory_pressure`), the largest resident memory first, then none for
 * `cooldown_sec`, and so on while pressure holds. A session is never taken if it was active
 * (a busy heartbeat, busy CPU as its profile counts it) within `spare_active_sec`, or if its
 * processes used more than `spare_cpu_percent` of a core over a one-second sample. A session
 * whose profile warns (warn_before_sec) is warned first and taken when the warning's time
 * comes, if pressure still holds and it stayed idle; a busy heartbeat meanwhile spares it.
 */
export class PressureWatch {
  private timer: NodeJS.Timeout | null = null;
  /** Monotonic ms since which pressure has held, or null. */
  private heldSince: number | null = null;
  private cooldownUntil = Number.NEGATIVE_INFINITY;
  private choosing = false;
  private pending: Pending | null = null;
  private lastNote = Number.NEGATIVE_INFINITY;
  /** The last `some avg10` read, or null (unreadable, or off). */
  last: number | null = null;

  constructor(private readonly deps: PressureDeps) {}

  get enabled(): boolean {
    return this.deps.config.someAvg10 > 0;
  }

  /** Whether pressure holds now (at or above the threshold at the last reading). */
  get holding(): boolean {
    return this.heldSince !== null;
  }

  start(): void {
    if (!this.enabled || this.timer !== null) return;
    this.timer = setInterval(() => this.tick(), READ_EVERY_MS);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
  }

  /** One reading of the PSI file and what follows from it (exported for the tests' pace). */
  tick(): void {
    const { config, clock } = this.deps;
    const now = clock.mono();
    const value = this.read(now);
    this.last = value;
    const holding = value !== null && value >= config.someAvg10;
    if (!holding) {
      this.heldSince = null;
      this.pending = null; // a warned session is not taken once pressure ends (its warning lapses with activity)
      return;
    }
    this.heldSince ??= now;
    if (this.pending !== null) {
      if (now >= this.pending.atMono) this.takeWarned(this.pending, value);
      return;
    }
    if (now - this.heldSince < config.durationSec * 1000 || now < this.cooldownUntil || this.choosing) return;
    this.choosing = true;
    void this.choose(value)
      .catch((err: unknown) => this.deps.log.error({ err }, "memory pressure: choosing a session failed"))
      .finally(() => (this.choosing = false));
  }

  private read(now: number): number | null {
    try {
      const v = someAvg10(readFileSync(this.deps.config.file, "latin1"));
      if (v !== null) return v;
      this.note(now, `${this.deps.config.file} has no "some avg10=" line`);
    } catch (err) {
      this.note(now, `${this.deps.config.file} cannot be read: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
    }
    return null;
  }

  private note(now: number, message: string): void {
    if (now - this.lastNote < NOTE_EVERY_MS) return;
    this.lastNote = now;
    this.deps.log.warn(`memory pressure cannot be read: ${message}; nothing is reclaimed under pressure`);
  }

  /** Idle long enough: no activity within spare_active_sec. */
  private idle(s: LiveSession, now: number): boolean {
    return now - s.activityMono >= this.deps.config.spareActiveSec * 1000;
  }

  /**
   * The session to reclaim: among the idle ones, the MEASURED largest by the last liveness
   * pass's resident memory, measured afresh, their CPU sampled over CPU_WINDOW_MS; the largest
   * that stayed idle and under spare_cpu_percent. Warned first if its profile warns.
   */
  private async choose(avg10: number): Promise<void> {
    const { registry, clock } = this.deps;
    const now = clock.mono();
    const idle: LiveSession[] = [];
    for (const s of registry.values()) if (this.idle(s, now)) idle.push(s);
    idle.sort((a, b) => b.lastRssBytes - a.lastRssBytes);
    const measured = idle.slice(0, MEASURED).map((s) => ({ s, before: footprint(s) }));
    await new Promise((r) => setTimeout(r, CPU_WINDOW_MS));
    const spareCpu = this.deps.config.spareCpuPercent;
    const candidates: { s: LiveSession; rssBytes: number; cpuPercent: number }[] = [];
    for (const { s, before } of measured) {
      if (before === null || registry.get(s.id) !== s || !this.idle(s, clock.mono())) continue;
      const after = footprint(s);
      if (after === null) continue;
      const cpuPercent = ((after.cpuSec - before.cpuSec) / (CPU_WINDOW_MS / 1000)) * 100;
      if (cpuPercent > spareCpu) {
        this.deps.log.info({ sessionId: s.id, cpuPercent }, "memory pressure: session spared, its processes are busy");
        continue;
      }
      candidates.push({ s, rssBytes: after.rssBytes, cpuPercent });
    }
    candidates.sort((a, b) => b.rssBytes - a.rssBytes);
    const victim = candidates[0];
    if (victim === undefined) {
      this.deps.log.warn(
        { someAvg10: avg10, idle: idle.length },
        "memory pressure holds and no idle session can be reclaimed",
      );
      this.cooldownUntil = clock.mono() + this.deps.config.cooldownSec * 1000;
      return;
    }
    const { s, rssBytes } = victim;
    if (s.warnBeforeSec > 0) {
      const warnedMono = clock.mono();
      this.deps.warn(s, s.warnBeforeSec);
      this.pending = { s, warnedMono, atMono: warnedMono + s.warnBeforeSec * 1000, rssBytes };
      return;
    }
    this.take(s, rssBytes, avg10, false);
  }

  /** The warned session's time came: taken if it stayed idle since its warning. */
  private takeWarned(p: Pending, avg10: number): void {
    this.pending = null;
    const { registry } = this.deps;
    if (registry.get(p.s.id) !== p.s) return;
    if (p.s.activityMono > p.warnedMono) {
      this.deps.log.info({ sessionId: p.s.id }, "memory pressure: warned session spared, it was active since");
      return;
    }
    this.take(p.s, p.rssBytes, avg10, true);
  }

  private take(s: LiveSession, rssBytes: number, avg10: number, warned: boolean): void {
    const { config, clock } = this.deps;
    this.cooldownUntil = clock.mono() + config.cooldownSec * 1000;
    this.deps.expire(s.id, "memory_pressure", {
      someAvg10: avg10,
      threshold: config.someAvg10,
      file: config.file,
      rssBytes,
      idleSec: Math.round((clock.mono() - s.activityMono) / 1000),
      warned,
    });
  }
}
