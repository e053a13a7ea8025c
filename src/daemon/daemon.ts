import { readFileSync } from "node:fs";
import type { FastifyInstance } from "fastify";
import pidusage from "pidusage";
import type { DestinationStream, Logger } from "pino";
import { AuditTrail } from "../audit/audit.js";
import { Callers } from "../auth/caller.js";
import { createLogger, type Loggers } from "../audit/logger.js";
import { systemClock, type Clock } from "../clock.js";
import type { Config } from "../config/load.js";
import { Detector, type LiveSession } from "../detect/detector.js";
import type { Server } from "node:http";
import { loadToken } from "../auth/tcp.js";
import { closeServer, listenFd, listenTcp, listenUnix } from "../http/listen.js";
import { buildServer, buildTcpServer, type DaemonInfo } from "../http/server.js";
import { Metrics } from "../metrics/metrics.js";
import { OrphanSweep } from "../orphans/sweep.js";
import { Reaper } from "../reaper/reaper.js";
import { Sessions } from "../sessions/sessions.js";
import { deadlineOf } from "../detect/deadline.js";
import { Store, type HeartbeatWrite } from "../store/store.js";
import { addon } from "../native/addon.js";
import { pidfd } from "../proc/pidfd.js";
import { SystemdNotifier } from "../systemd/notify.js";
import type { ProcessIdentity } from "../sessions/types.js";

export const VERSION = (
  JSON.parse(readFileSync(new URL("../../../package.json", import.meta.url), "utf8")) as { version: string }
).version;

/** Rows per heartbeat flush transaction: keeps each event-loop block to a few ms. */
const FLUSH_CHUNK = 500;

/** Shared by recovered sessions until the first liveness pass gives their engine its tree. */
const NO_TREE: ProcessIdentity[] = [];

/**
 * Whether the stored (indexed) deadline must be rewritten: unknown, or nearer than half the
 * real deadline's distance from now (see Daemon.takeDirty).
 */
function deadlineStale(stored: number | undefined, at: number, now: number): boolean {
  return stored === undefined || stored - now < (at - now) / 2;
}

export type DaemonState = "starting" | "running" | "shutting_down" | "stopped";

export interface DaemonOptions {
  config: Config;
  clock?: Clock;
  /** Where log and audit lines go; default: the configured file or stdout. */
  logStream?: DestinationStream;
  /** The daemon's own pid, never signalled. */
  pid?: number;
  /** The daemon's effective uid (an administrator of its own API); default process.geteuid(). */
  uid?: number;
  /** $NOTIFY_SOCKET: where sd_notify messages go; unset outside systemd. */
  notifySocket?: string | undefined;
  /** Watchdog ping interval (WATCHDOG_USEC / 2), or null. */
  watchdogMs?: number | null;
  /** Crash-safety testing only: step boundaries at which `crash` is called. */
  failpoints?: ReadonlySet<string>;
  crash?: () => void;
}

/**
 * Wires the parts together and owns the lifecycle: start (migrations, recovery, resume),
 * stop (SHUTTING_DOWN first, keep serving, finish or pause reaps, flush, close).
 */
export class Daemon {
  readonly config: Config;
  readonly clock: Clock;
  readonly loggers: Loggers;
  readonly log: Logger;
  readonly store: Store;
  readonly metrics: Metrics;
  readonly audit: AuditTrail;
  readonly detector: Detector;
  readonly reaper: Reaper;
  readonly sessions: Sessions;
  readonly orphans: OrphanSweep;
  readonly app: FastifyInstance;
  /** Peer credentials per connection, shared by the unix socket and loopback TCP. */
  readonly callers: Callers;
  private stateValue: DaemonState = "starting";
  private startedAt = 0;
  private flushTimer: NodeJS.Timeout | null = null;
  private statusTimer: NodeJS.Timeout | null = null;
  private watchdogTimer: NodeJS.Timeout | null = null;
  private readonly notifier: SystemdNotifier;
  private readonly watchdogMs: number | null;
  private flushing: Promise<void> | null = null;
  /** sha256 of the loopback TCP bearer token; null when api.tcp is not configured. */
  private readonly tcpToken: Buffer | null;
  private tcpServer: Server | null = null;

  constructor(opts: DaemonOptions) {
    const config = opts.config;
    const clock = opts.clock ?? systemClock;
    const daemonPid = opts.pid ?? process.pid;
    const daemonUid = opts.uid ?? process.geteuid?.() ?? 0;
    // Before anything is opened: a bad token file is a configuration error (exit 78).
    this.tcpToken = config.api.tcp ? loadToken(config.api.tcp.tokenFile, daemonUid) : null;
    this.config = config;
    this.clock = clock;
    this.watchdogMs = opts.watchdogMs ?? null;
    this.loggers = createLogger({ level: config.log.level, file: config.log.file, clock, stream: opts.logStream });
    this.log = this.loggers.log;
    this.notifier = new SystemdNotifier(opts.notifySocket, this.log);
    this.store = new Store(config.store.path, clock.now());
    this.audit = new AuditTrail(this.store, this.loggers.audit, clock);
    this.metrics = new Metrics({ store: this.store, profiles: Object.keys(config.profiles) });
    this.reaper = new Reaper({
      store: this.store,
      audit: this.audit,
      metrics: this.metrics,
      clock,
      log: this.log,
      config,
      daemonPid,
      failpoints: opts.failpoints,
      crash: opts.crash,
    });
    this.detector = new Detector(clock, config.detect.livenessSchedule, this.log, (id, reason, detail) =>
      this.sessions.expire(id, reason, detail),
    );
    this.sessions = new Sessions({
      store: this.store,
      audit: this.audit,
      detector: this.detector,
      reaper: this.reaper,
      clock,
      config,
      metrics: this.metrics,
      daemonPid,
      accepting: () => this.stateValue === "running" || this.stateValue === "starting",
    });
    this.callers = new Callers({ adminGid: config.api.adminGid, daemonUid });
    this.orphans = new OrphanSweep({
      config,
      store: this.store,
      audit: this.audit,
      reaper: this.reaper,
      detector: this.detector,
      metrics: this.metrics,
      clock,
      log: this.log,
      daemonPid,
    });
    this.app = buildServer({
      sessions: this.sessions,
      store: this.store,
      metrics: this.metrics,
      orphans: this.orphans,
      log: this.log,
      api: config.api,
      callers: this.callers,
      info: () => this.info(),
    });
  }

  get state(): DaemonState {
    return this.stateValue;
  }

  info(): DaemonInfo {
    return {
      state: this.stateValue === "running" || this.stateValue === "starting" ? "running" : "shutting_down",
      version: VERSION,
      startedAt: new Date(this.startedAt).toISOString(),
      ready: this.stateValue === "running",
    };
  }

  /**
   * Recovery follows the restart rule: live sessions get their time-based clocks restarted
   * from now (downtime never counts against them); those whose engine or owner died
   * meanwhile are reaped at once; reaps left unfinished resume.
   */
  async start(): Promise<void> {
    const now = this.clock.now();
    this.startedAt = now;
    await this.app.ready();
    const resumed = this.reaper.resumeAll();
    let recovered = 0;
    for (const s of this.store.liveForRecovery()) {
      recovered++;
      const live: LiveSession = {
        id: s.id,
        engine: s.engine,
        ownerPid: s.ownerPid,
        registeredBy: s.registeredBy,
        createdAt: s.createdAt,
        lastHeartbeatAt: s.lastHeartbeatAt,
        lastActivityAt: s.lastActivityAt,
        heartbeatTimeoutSec: s.heartbeatTimeoutSec,
        idleTimeoutSec: s.idleTimeoutSec,
        maxLifetimeSec: s.maxLifetimeSec,
        recoveredAt: now,
        dirty: false,
        storedDeadline: s.deadline ?? undefined,
        tree: NO_TREE, // replaced, never mutated, by the liveness pass
        busyCpuPercent: this.config.profiles[s.profile]?.busyCpuPercent ?? null,
      };
      // The heartbeat fields are as stored; only a deadline that recovery moved far is written.
      live.dirty = deadlineStale(live.storedDeadline, deadlineOf(live).at, now);
      this.detector.add(live);
    }
    if (addon === null) {
      this.log.error("the native addon is not built (npm ci builds it): every path delete will be refused");
    } else if (pidfd === null) {
      this.log.warn("no pidfd on this kernel: signals fall back to an identity check before kill(2)");
    }
    const goneAtStart = this.detector.checkLiveness();
    this.detector.start();
    this.flushTimer = setInterval(() => void this.flushHeartbeats(), this.config.store.flushIntervalMs);
    this.flushTimer.unref();
    this.stateValue = "running";
    this.audit.record({
      event: "daemon.started",
      detail: {
        version: VERSION,
        pid: process.pid,
        config: this.config.source,
        database: this.config.store.path,
        socket: this.config.api.socket,
        recovered,
        resumedReaps: resumed,
        reapedAtStart: goneAtStart,
      },
    });
    // After recovery, so that every session the table still knows claims its processes.
    this.orphans.start();
  }

  /**
   * Serves the API: on the inherited socket (systemd socket activation) or the configured
   * unix socket, and on loopback TCP when api.tcp is configured. Called after start().
   */
  async listen(inheritedFd: number | null = null): Promise<void> {
    if (inheritedFd !== null) await listenFd(this.app, inheritedFd);
    else await listenUnix(this.app, this.config.api.socket, this.config.api.socketMode);
    const tcp = this.config.api.tcp;
    if (tcp !== null && this.tcpToken !== null) {
      const server = buildTcpServer(
        this.app,
        { api: this.config.api, callers: this.callers, metrics: this.metrics },
        this.tcpToken,
      );
      await listenTcp(server, tcp.host, tcp.port);
      this.tcpServer = server;
    }
    this.log.info(
      {
        socket: inheritedFd === null ? this.config.api.socket : `fd ${inheritedFd} (socket activation)`,
        tcp: tcp === null ? null : `${tcp.host.includes(":") ? `[${tcp.host}]` : tcp.host}:${tcp.port}`,
      },
      "listening",
    );
  }

  /** Where loopback TCP listens (port 0 in the config picks a free one), or null. */
  get tcpAddress(): { address: string; port: number } | null {
    const a = this.tcpServer?.address();
    return a && typeof a === "object" ? { address: a.address, port: a.port } : null;
  }

  /** One line for systemctl status: the session counts. */
  statusLine(): string {
    const c = this.store.counts();
    const queued = this.reaper.pending + this.reaper.inFlight;
    return `${this.stateValue === "running" ? "Running" : "Stopping"}: ${c.live} live, ${c.reaping} reaping (${queued} in flight or queued), ${c.reaped} reaped`;
  }

  /**
   * Tells systemd the daemon is ready (after migrations, recovery and listening: main.ts
   * calls this last), then keeps STATUS= fresh and pings the watchdog from the event loop,
   * so a stalled loop stops the pings and systemd restarts the daemon.
   */
  announceReady(): void {
    if (this.notifier.enabled !== true) return;
    this.notifier.send({ READY: "1", STATUS: this.statusLine(), MAINPID: String(process.pid) });
    this.statusTimer = setInterval(() => this.notifier.send({ STATUS: this.statusLine() }), 10_000);
    this.statusTimer.unref();
    if (this.watchdogMs !== null) {
      this.watchdogTimer = setInterval(() => this.notifier.send({ WATCHDOG: "1" }), this.watchdogMs);
      this.watchdogTimer.unref();
    }
  }

  /**
   * Graceful stop (Trino's lesson): report shutting_down first and keep answering heartbeats
   * and reads; take no new sessions; never expire a live session because we stop; let
   * in-flight reaps finish within the grace budget, or pause them at a step boundary to
   * resume at the next start; then flush, close the socket and the database.
   */
  async stop(): Promise<void> {
    if (this.stateValue === "shutting_down" || this.stateValue === "stopped") return;
    this.stateValue = "shutting_down";
    if (this.statusTimer) clearInterval(this.statusTimer);
    this.notifier.send({ STOPPING: "1", STATUS: this.statusLine() });
    this.audit.record({
      event: "daemon.stopping",
      detail: { inFlightReaps: this.reaper.inFlight, queuedReaps: this.reaper.pending },
    });
    this.detector.stop();
    this.orphans.stop();
    // Watchdog pings go on while reaps drain: a long, healthy stop is not a hang.
    await this.reaper.drain(this.config.reaper.shutdownGraceSec * 1000);
    if (this.watchdogTimer) clearInterval(this.watchdogTimer);
    if (this.flushTimer) clearInterval(this.flushTimer);
    await this.flushing;
    this.flushAllNow();
    await Promise.all([this.app.close(), this.tcpServer ? closeServer(this.tcpServer) : undefined]);
    this.detector.close();
    this.audit.record({ event: "daemon.stopped", detail: { counts: this.store.counts() } });
    this.store.close();
    pidusage.clear();
    this.stateValue = "stopped";
    this.loggers.flush();
  }

  /** Writes coalesced heartbeats in chunks, yielding to the event loop between chunks. */
  flushHeartbeats(): Promise<void> {
    this.flushing ??= (async () => {
      try {
        const dirty = this.takeDirty();
        for (let i = 0; i < dirty.length; i += FLUSH_CHUNK) {
          if (!this.store.db.open) return;
          this.store.writeHeartbeats(dirty.slice(i, i + FLUSH_CHUNK));
          await new Promise((r) => setImmediate(r));
        }
      } catch (err) {
        this.log.error({ err }, "heartbeat flush failed");
      } finally {
        this.flushing = null;
      }
    })();
    return this.flushing;
  }

  private flushAllNow(): void {
    if (this.store.db.open) this.store.writeHeartbeats(this.takeDirty());
  }

  /**
   * The sessions whose heartbeat fields changed since the last flush. The stored deadline
   * only narrows the /v1/expiring probe (a stored deadline never later than the real one
   * keeps the probe a superset), so it is rewritten only once the real deadline has moved
   * past twice the stored one's distance from now: the indexed column then moves about once
   * per half timeout per session instead of at every flush, and the probe for the sessions
   * due within N seconds still meets only sessions due within 2N.
   */
  private takeDirty(): HeartbeatWrite[] {
    const now = this.clock.now();
    const out: HeartbeatWrite[] = [];
    for (const s of this.detector.takeDirty()) {
      const at = deadlineOf(s).at;
      const stale = deadlineStale(s.storedDeadline, at, now);
      if (stale) s.storedDeadline = at;
      out.push({
        id: s.id,
        lastHeartbeatAt: s.lastHeartbeatAt,
        lastActivityAt: s.lastActivityAt,
        deadline: stale ? at : null,
      });
    }
    return out;
  }
}
