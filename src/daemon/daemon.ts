import { readFileSync, readdirSync } from "node:fs";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { JOURNAL_VERSION, olderRecord } from "../cleanup/journal.js";
import type { FastifyInstance } from "fastify";
import pidusage from "pidusage";
import type { DestinationStream, Logger } from "pino";
import { Retention } from "../audit/retention.js";
import { AuditTrail } from "../audit/audit.js";
import { Callers } from "../auth/caller.js";
import { createLogger, type Loggers } from "../audit/logger.js";
import { systemClock, type Clock } from "../clock.js";
import type { Config } from "../config/load.js";
import { Detector } from "../detect/detector.js";
import { StallWatch } from "../detect/stall.js";
import { PressureWatch } from "../detect/pressure.js";
import { CrowdWatch } from "../detect/crowd.js";
import { ReaperError } from "../errors.js";
import { LiveSessions } from "../sessions/live.js";
import { WriteBehind } from "../sessions/write-behind.js";
import { Warnings } from "../sessions/warnings.js";
import { DatabaseLock } from "../store/lock.js";
import { SessionCgroups } from "../proc/containment.js";
import { SessionLineage, trackingOf } from "../proc/lineage.js";
import type { Server } from "node:http";
import { loadToken } from "../auth/tcp.js";
import { closeServer, listenFd, listenTcp, listenUnix } from "../http/listen.js";
import { buildServer, buildTcpServer, type DaemonInfo } from "../http/server.js";
import type { EventStreamLimits } from "../http/events-stream.js";
import type { AcceptPending } from "../http/accept-backlog.js";
import { ConnectionLimits } from "../http/connection-limits.js";
import { Metrics, type StallCause } from "../metrics/metrics.js";
import { OrphanSweep } from "../orphans/sweep.js";
import { Reaper } from "../reaper/reaper.js";
import { Resolver } from "../reaper/resolver.js";
import { Sessions } from "../sessions/sessions.js";
import { damageOf, engineReadable } from "../store/columns.js";
import { Store } from "../store/store.js";
import { DamageWatch } from "./damage.js";
import { addon } from "../native/addon.js";
import { pidfd } from "../proc/pidfd.js";
import { SystemdNotifier } from "../systemd/notify.js";

export const VERSION = (
  JSON.parse(readFileSync(new URL("../../../package.json", import.meta.url), "utf8")) as { version: string }
).version;

/** A loop that did not run for longer than this was stalled (see StallWatch). */
const STALL_THRESHOLD_MS = 1000;
/** While the store cannot commit, a probe write is tried this often. */
const STORE_PROBE_MS = 1000;
/** Housekeeping: the fd check every tick, the WAL checkpoint every CHECKPOINT_TICKS. */
const HOUSEKEEPING_MS = 10_000;
const CHECKPOINT_TICKS = 6;
/** Open fds above this share of the soft limit are warned about. */
const FD_WARN_SHARE = 0.9;
/** At most one warning per this many ms for a repeated resource error. */
const WARN_EVERY_MS = 60_000;

/** Recovering at least this many sessions is followed by one full garbage collection (collectOnce). */
const COLLECT_AFTER_RECOVERED = 10_000;

/**
 * One full garbage collection, now. Recovery builds every live session in one pass; what it
 * leaves behind (the rows read, the /proc snapshot, the admissions) survives young-generation
 * collections long enough to be promoted, and V8 may not run a full collection again for a
 * long while on a daemon that then mostly waits: the pages stay resident (100,000 sessions:
 * 40-50 MB of a 250 MB resident set was such garbage). Measured by figure 5; costs one pause
 * of tens of ms before the daemon is ready. `gc` is exposed for this call only (a fresh
 * context's global); if the flag cannot be set, nothing happens.
 */
function collectOnce(log: Logger): void {
  try {
    setFlagsFromString("--expose-gc");
    const gc = runInNewContext("gc") as unknown;
    if (typeof gc === "function") (gc as () => void)();
  } catch (err) {
    log.debug({ err }, "no full collection after recovery");
  }
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
  /**
   * Testing only: GET /v1/events' keep-alive period (15 s) and the unsent bytes past which a
   * follower is cut (4 MiB), shortened. Not configuration: clients rely on both (their idle
   * timeout is three keep-alive periods; SECURITY.md bounds a uid's unsent lines).
   */
  eventStreams?: Partial<EventStreamLimits>;
  /** Crash-safety testing only: step boundaries at which `crash` is called. */
  failpoints?: ReadonlySet<string>;
  crash?: () => void;
}

/**
 * Wires the parts together and owns the lifecycle: start (lock, integrity check, migrations,
 * recovery, resume), stop (SHUTTING_DOWN first, keep serving, finish or pause reaps, flush,
 * close), and the daemon's own faults: stalls of its loop, a store that cannot commit,
 * file descriptors running out.
 */
export class Daemon {
  readonly config: Config;
  readonly clock: Clock;
  readonly loggers: Loggers;
  readonly log: Logger;
  readonly store: Store;
  readonly metrics: Metrics;
  readonly audit: AuditTrail;
  /** Names every damaged stored value the store meets (log, metric, session.damaged). */
  readonly damage: DamageWatch;
  readonly registry: LiveSessions;
  /** Where session cgroups are made (or why none can be). */
  readonly cgroups: SessionCgroups;
  /** Lineage of every process from the kernel's process events (opened at start). */
  readonly lineage = new SessionLineage();
  readonly detector: Detector;
  readonly reaper: Reaper;
  /** Watches the processes reaps left unkillable, and resolves each reap once they are gone. */
  readonly unkillable: Resolver;
  readonly sessions: Sessions;
  readonly orphans: OrphanSweep;
  /** Purges reaped sessions past store.retain_reaped_sec, leaving tombstones. */
  readonly retention: Retention;
  readonly app: FastifyInstance;
  /** Peer credentials per connection, shared by the unix socket and loopback TCP. */
  readonly callers: Callers;
  private stateValue: DaemonState = "starting";
  private startedAt = 0;
  private readonly lock: DatabaseLock;
  private readonly writeBehind: WriteBehind;
  /** Warnings before a reap (profiles.NAME.warn_before_sec). */
  private readonly warnings: Warnings;
  /** Reclaims idle sessions while memory pressure holds ([pressure]; off by default). */
  private readonly pressure: PressureWatch;
  private readonly stallWatch: StallWatch;
  /** Connections turned away that may have kept heartbeats out (src/detect/crowd.ts). */
  private readonly crowdWatch: CrowdWatch;
  private readonly connectionLimits: ConnectionLimits;
  /** The addon's accept4 loop for the listeners (src/http/accept-backlog.ts), if built. */
  private readonly acceptPending: AcceptPending | undefined;
  private statusTimer: NodeJS.Timeout | null = null;
  private watchdogTimer: NodeJS.Timeout | null = null;
  private probeTimer: NodeJS.Timeout | null = null;
  private housekeepingTimer: NodeJS.Timeout | null = null;
  private housekeepingTicks = 0;
  /** Monotonic time the store stopped committing, or null while it commits. */
  private storeDownSince: number | null = null;
  private readonly lastWarned = new Map<string, number>();
  private readonly notifier: SystemdNotifier;
  private readonly watchdogMs: number | null;
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
    // Before anything is written, the log file included: one daemon per database.
    this.lock = DatabaseLock.acquire(config.store.path, process.pid);
    try {
      this.config = config;
      this.clock = clock;
      this.watchdogMs = opts.watchdogMs ?? null;
      this.loggers = createLogger({ level: config.log.level, file: config.log.file, clock, stream: opts.logStream });
      this.log = this.loggers.log;
      this.notifier = new SystemdNotifier(opts.notifySocket, this.log);
      this.store = new Store(config.store.path, clock.now());
    } catch (err) {
      this.lock.release();
      throw err;
    }
    const sink = this.loggers.sink;
    this.audit = new AuditTrail(this.store, this.loggers.audit, clock);
    this.retention = new Retention({
      store: this.store,
      audit: this.audit,
      clock,
      log: this.log,
      policy: { retainReapedSec: config.store.retainReapedSec, retainTombstonesSec: config.store.retainTombstonesSec },
    });
    if (sink !== null) sink.onRecovered = () => this.reportDroppedLines();
    this.metrics = new Metrics({
      store: this.store,
      profiles: Object.keys(config.profiles),
      logLinesDropped: () => sink?.dropped ?? 0,
      lineage: () => ({ available: this.lineage.status.available, ...this.lineage.counters() }),
      connections: () => this.connectionLimits.open,
      unkillable: () => this.unkillable.processes,
    });
    this.damage = new DamageWatch({ store: this.store, audit: this.audit, metrics: this.metrics, log: this.log });
    this.cgroups =
      config.store.path === ":memory:"
        ? SessionCgroups.none("an in-memory database (tests)")
        : SessionCgroups.find(config.containment.cgroupBase, config.store.path, this.log);
    this.reaper = new Reaper({
      store: this.store,
      audit: this.audit,
      metrics: this.metrics,
      clock,
      log: this.log,
      config,
      daemonPid,
      lineage: this.lineage,
      cgroups: this.cgroups,
      failpoints: opts.failpoints,
      crash: opts.crash,
      unkillable: { watch: (id) => this.unkillable.watch(id) },
    });
    this.unkillable = new Resolver({
      store: this.store,
      audit: this.audit,
      clock,
      log: this.log,
      config,
      daemonPid,
      reaper: this.reaper,
      onPidfdError: (code) => this.resourceError("pidfd", code),
    });
    this.registry = new LiveSessions(clock);
    this.stallWatch = new StallWatch(clock, STALL_THRESHOLD_MS, (ms) => this.stalled("loop", ms));
    this.warnings = new Warnings({
      store: this.store,
      audit: this.audit,
      registry: this.registry,
      config,
      log: this.log,
      clock,
      metrics: this.metrics,
    });
    this.detector = new Detector({
      registry: this.registry,
      clock,
      livenessSchedule: config.detect.livenessSchedule,
      livenessCpuPercent: config.detect.livenessCpuPercent,
      log: this.log,
      expire: (id, reason, detail) => this.expire(id, reason, detail),
      warn: (s, deadline) => this.warnings.deadline(s, deadline),
      // A stall is noticed before any deadline is read; nothing is judged on time while the
      // store cannot commit.
      mayJudgeTime: () => (this.stallWatch.check(), this.store.available),
      lineage: this.lineage,
      onPidfdError: (code) => this.resourceError("pidfd", code),
    });
    this.pressure = new PressureWatch({
      config: config.pressure,
      registry: this.registry,
      clock,
      log: this.log,
      expire: (id, reason, detail) => this.expire(id, reason, detail),
      warn: (s, sec) => this.warnings.give(s, "memory_pressure", clock.mono() + sec * 1000),
    });
    this.sessions = new Sessions({
      store: this.store,
      audit: this.audit,
      registry: this.registry,
      cgroups: this.cgroups,
      reaper: this.reaper,
      clock,
      config,
      metrics: this.metrics,
      daemonPid,
      accepting: () => this.stateValue === "running" || this.stateValue === "starting",
      lineage: this.lineage,
    });
    this.writeBehind = new WriteBehind(this.registry, this.store, this.log, config.store.flushIntervalMs);
    this.callers = new Callers({ adminGid: config.api.adminGid, daemonUid });
    this.crowdWatch = new CrowdWatch({
      clock,
      log: this.log,
      maxHeartbeatTimeoutMs: Math.max(...Object.values(config.profiles).map((p) => p.heartbeatTimeoutSec)) * 1000,
      resume: () => this.registry.resumeHeartbeats(),
      ended: (e) => {
        const detail = { refused: e.refused, forgivenMs: Math.round(e.forgivenMs), budgetSpent: e.exhausted };
        this.stalled("crowded", e.last - e.since, detail);
      },
    });
    this.connectionLimits = new ConnectionLimits({
      total: config.api.maxConnections,
      perUid: config.api.maxConnectionsPerUid,
      callers: this.callers,
      metrics: this.metrics,
      log: this.log,
      clock,
      crowded: () => this.crowdWatch.refused(),
    });
    this.orphans = new OrphanSweep({
      config,
      store: this.store,
      audit: this.audit,
      reaper: this.reaper,
      detector: this.detector,
      registry: this.registry,
      metrics: this.metrics,
      clock,
      log: this.log,
      daemonPid,
    });
    // An addon built before acceptPending existed leaves libuv's one connection a turn.
    const acceptPending = typeof addon?.acceptPending === "function" ? addon.acceptPending.bind(addon) : undefined;
    this.acceptPending = acceptPending;
    this.app = buildServer({
      sessions: this.sessions,
      store: this.store,
      audit: this.audit,
      metrics: this.metrics,
      orphans: this.orphans,
      log: this.log,
      api: config.api,
      callers: this.callers,
      connectionLimits: this.connectionLimits,
      acceptPending,
      info: () => this.info(),
      eventStreams: opts.eventStreams,
    });
    this.store.onHealth({
      unavailable: (fault) => this.storeUnavailable(fault),
      available: () => this.storeAvailable(),
    });
    // Locked or full already at start: served, with changes refused until it commits.
    if (!this.store.available) this.storeUnavailable(this.store.lastFault ?? "unavailable at start");
  }

  get state(): DaemonState {
    return this.stateValue;
  }

  info(): DaemonInfo {
    const status = this.lineage.status;
    const { events, lost, processes } = this.lineage.counters();
    return {
      state: this.stateValue === "running" || this.stateValue === "starting" ? "running" : "shutting_down",
      version: VERSION,
      startedAt: new Date(this.startedAt).toISOString(),
      ready: this.stateValue === "running",
      database: this.config.store.path,
      lineage: {
        available: status.available,
        ...(status.available ? {} : { why: status.why }),
        events,
        lost,
        processes,
      },
    };
  }

  /**
   * Recovery follows the restart rule: live sessions get their time-based clocks restarted
   * from now (downtime never counts against them); those whose engine or owner died
   * meanwhile are reaped at once; reaps left unfinished resume.
   */
  /** `inheritedFd`: the listening socket systemd passed (socket activation), recorded in daemon.started. */
  async start(inheritedFd: number | null = null): Promise<void> {
    this.startedAt = this.clock.now();
    await this.app.ready();
    // Before anything is recovered: the table of the host's processes is seeded by a walk.
    const lineage = this.lineage.open((lost, fellBack) => this.lineageLost(lost, fellBack));
    if (!lineage.available) {
      this.log.warn(
        { why: lineage.why },
        "no lineage from the kernel's process events: sessions are tracked by cgroups and walks of /proc (tracking shows which)",
      );
    }
    // Forks made while no daemon listened are unknown: no unfinished session keeps "lineage".
    this.store.downgradeTracking();
    // Reaps written by an older build resume on records of the current journal version.
    const upgraded = this.store.upgradeJournal(olderRecord);
    if (upgraded > 0)
      this.log.info({ records: upgraded, version: JOURNAL_VERSION }, "journal records of unfinished reaps upgraded");
    const resumed = this.reaper.resumeAll();
    let recovered = 0;
    // A damaged row never stops a start (src/store/columns.ts): its session is watched if its
    // engine can still be identified, else quarantined (state damaged: watched by nothing,
    // nothing signalled, an operator's). Each is named by a session.damaged event.
    const damaged = { watched: 0, quarantined: 0 };
    for (const s of this.store.liveForRecovery()) {
      if (s.damage.length > 0) {
        if (!engineReadable(s)) {
          damaged.quarantined++;
          continue;
        }
        damaged.watched++;
      }
      recovered++;
      // A damaged containment: the cgroup made for the session, if any (its tree, if damaged
      // too, reads as none: the engine, its cgroup and its lineage are where its processes are).
      const made = damageOf(s, "containment") === undefined ? null : this.cgroups.madeFor(s.id);
      const cgroup = made?.kind === "cgroup" ? made.path : (s.cgroup ?? null);
      this.registry.recover({
        ...s,
        cgroup,
        busyCpuPercent: this.config.profiles[s.profile]?.busyCpuPercent ?? null,
        warnBeforeSec: this.config.profiles[s.profile]?.warnBeforeSec ?? 0,
      });
      // Lineage from now on: the engine's descendants by the seed walk, and the tree kept durable.
      this.lineage.adopt(s.id, s.engine);
      this.lineage.include(s.id, s.tree);
    }
    // Named now, before any of them is judged (the table is no longer being read).
    this.damage.flush();
    if (addon === null) {
      this.log.error("the native addon is not built (npm ci builds it): every path delete will be refused");
    } else if (pidfd === null) {
      this.log.warn("no pidfd on this kernel: signals fall back to an identity check before kill(2)");
    }
    const goneAtStart = this.detector.checkLiveness();
    // Recovery's garbage out of the old space before the daemon settles (see collectOnce).
    if (recovered >= COLLECT_AFTER_RECOVERED) collectOnce(this.log);
    // Reaps whose unkillable processes were still alive at the last stop: watched again (one
    // gone meanwhile resolves at once, after this start).
    const unkillable = this.unkillable.start();
    this.stallWatch.start();
    this.detector.start();
    this.writeBehind.start();
    this.housekeepingTimer = setInterval(() => this.housekeeping(), HOUSEKEEPING_MS);
    this.housekeepingTimer.unref();
    this.stateValue = "running";
    this.audit.record({
      event: "daemon.started",
      detail: {
        version: VERSION,
        pid: process.pid,
        config: this.config.source,
        database: this.config.store.path,
        // Under socket activation the configured path is not what serves: systemd's socket is.
        socket: inheritedFd === null ? this.config.api.socket : `fd ${inheritedFd} (socket activation)`,
        inheritedFd,
        recovered,
        resumedReaps: resumed,
        reapedAtStart: goneAtStart,
        unkillable,
        damaged,
        lineage: lineage.available ? { available: true } : { available: false, why: lineage.why },
      },
    });
    // After recovery, so that every session the table still knows claims its processes.
    this.orphans.start();
    this.retention.start();
    this.pressure.start();
  }

  /**
   * Serves the API: on the inherited socket (systemd socket activation) or the configured
   * unix socket, and on loopback TCP when api.tcp is configured. Called after start().
   */
  async listen(inheritedFd: number | null = null): Promise<void> {
    if (inheritedFd !== null) await listenFd(this.app, inheritedFd);
    else await listenUnix(this.app, this.config.api.socket, this.config.api.socketMode, this.config.api.socketGid);
    this.watchAccept(this.app.server, true);
    const tcp = this.config.api.tcp;
    if (tcp !== null && this.tcpToken !== null) {
      const server = buildTcpServer(
        this.app,
        {
          api: this.config.api,
          callers: this.callers,
          metrics: this.metrics,
          acceptPending: this.acceptPending,
          log: this.log,
        },
        this.tcpToken,
      );
      await listenTcp(server, tcp.host, tcp.port);
      this.watchAccept(server);
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
    const store = this.store.available ? "" : `; STORE UNAVAILABLE (${this.store.lastFault ?? "?"})`;
    const damaged = (c.damaged ?? 0) > 0 ? `, ${c.damaged} DAMAGED (quarantined: close or force-reap)` : "";
    return `${this.stateValue === "running" ? "Running" : "Stopping"}: ${c.live} live${damaged}, ${c.reaping} reaping (${queued} in flight or queued), ${c.reaped} reaped${store}`;
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
   * resume at the next start; then flush, close the socket and the database. Each part stops
   * in its own try/catch (graphile-worker's allSettled): one that fails is logged, and the
   * rest still stop, the database is still closed and the lock released.
   */
  async stop(): Promise<void> {
    if (this.stateValue === "shutting_down" || this.stateValue === "stopped") return;
    this.stateValue = "shutting_down";
    const failed: string[] = [];
    const part = async (name: string, fn: () => unknown): Promise<void> => {
      try {
        await fn();
      } catch (err) {
        failed.push(name);
        try {
          this.log.error({ err, part: name }, "stopping a part of the daemon failed");
        } catch {
          // the log sink counts what it cannot write
        }
      }
    };
    await part("status", () => {
      if (this.statusTimer) clearInterval(this.statusTimer);
      this.notifier.send({ STOPPING: "1", STATUS: this.statusLine() });
    });
    await part("audit", () =>
      this.audit.record({
        event: "daemon.stopping",
        detail: { inFlightReaps: this.reaper.inFlight, queuedReaps: this.reaper.pending },
      }),
    );
    await part("detector", () => (this.detector.stop(), this.pressure.stop()));
    await part("stall watch", () => (this.stallWatch.stop(), this.crowdWatch.stop()));
    await part("orphan sweep", () => this.orphans.stop());
    await part("retention", () => this.retention.stop());
    // Watchdog pings go on while reaps drain: a long, healthy stop is not a hang.
    await part("reaper", () => this.reaper.drain(this.config.reaper.shutdownGraceSec * 1000));
    await part("unkillable watch", () => this.unkillable.drain(this.config.reaper.shutdownGraceSec * 1000));
    await part("timers", () => {
      if (this.watchdogTimer) clearInterval(this.watchdogTimer);
      if (this.probeTimer) clearInterval(this.probeTimer);
      if (this.housekeepingTimer) clearInterval(this.housekeepingTimer);
      this.writeBehind.stop();
    });
    await part("heartbeat flush", () => this.writeBehind.flushAll());
    await part("http", () => Promise.all([this.app.close(), this.tcpServer ? closeServer(this.tcpServer) : undefined]));
    await part("process watches", () => this.detector.close());
    await part("dropped log lines", () => this.reportDroppedLines());
    await part("audit", () =>
      this.audit.record({ event: "daemon.stopped", detail: { counts: this.store.counts(), failed } }),
    );
    await part("store", () => this.store.close());
    await part("cgroups", () => this.cgroups.close());
    await part("lineage", () => this.lineage.close());
    await part("lock", () => this.lock.release());
    await part("pidusage", () => pidusage.clear());
    this.stateValue = "stopped";
    this.loggers.flush();
    this.loggers.sink?.close();
  }

  /**
   * SIGHUP: the log file is opened again at its configured path (logrotate moved it away), a
   * line closing the old file and one opening the new. Logging to stdout, there is nothing to
   * reopen. Never throws: a file that cannot be opened leaves lines going to the old one.
   */
  reopenLog(): void {
    const sink = this.loggers.sink;
    const file = this.config.log.file;
    if (sink === null || !sink.ownsFile) {
      this.log.info({ signal: "SIGHUP" }, "SIGHUP: logging to stdout, no log file to reopen");
      return;
    }
    this.log.info({ signal: "SIGHUP", file }, "reopening the log file");
    try {
      sink.reopen();
      this.log.info({ signal: "SIGHUP", file }, "log file reopened");
    } catch (err) {
      this.log.error({ err, file }, "the log file could not be reopened: lines go on to the file already open");
    }
  }

  /** Lines the log sink dropped and has written again since: on record (daemon.lines_dropped). */
  private reportDroppedLines(): void {
    const sink = this.loggers.sink;
    if (sink !== null && this.stateValue !== "stopped") this.audit.recordDroppedLines(() => sink.takeDropped());
  }

  /**
   * The detector's expiry, made safe: a store that cannot commit leaves the session live
   * (judged again once it commits), and nothing here throws into a timer or a pidfd callback.
   */
  private expire(id: string, reason: Parameters<Sessions["expire"]>[1], detail: Record<string, unknown>): void {
    try {
      this.sessions.expire(id, reason, detail);
    } catch (err) {
      if (err instanceof ReaperError && err.code === "SR_STORE_UNAVAILABLE") return;
      this.log.error({ err, sessionId: id, reason }, "expiry failed");
    }
  }

  /**
   * The daemon comes back from time it did not see pass: the restart rule applies from now
   * (no session is reaped for heartbeats it could not read), and the stall is on record.
   * Crowding (connections turned away) moved heartbeat deadlines as it went (CrowdWatch).
   */
  private stalled(cause: StallCause, ms: number, detail: Record<string, unknown> = {}): void {
    if (cause !== "crowded") this.registry.resume();
    this.metrics.stalled(cause, ms);
    this.log.warn(
      { cause, stalledMs: Math.round(ms), ...detail },
      cause === "crowded"
        ? "the daemon turned connections away: heartbeat deadlines restarted from the last refusal"
        : "the daemon was stalled: time-based deadlines restart from now",
    );
    this.audit.record({ event: "daemon.stalled", detail: { cause, stalledMs: Math.round(ms), ...detail } });
  }

  /**
   * Process events were lost (the kernel's buffer overran, or ours): counted (the metric reads
   * the counters), logged, and the sessions whose lineage was complete fall back to what their
   * containment gives; the table is already mended from a walk, and the walks go on.
   */
  private lineageLost(lost: number, fellBack: readonly string[]): void {
    this.log.warn(
      { lost, sessions: fellBack.length },
      "process events were lost: lineage was mended from a walk of /proc, and the sessions of the moment fall back to their cgroups and walks",
    );
    for (const id of fellBack) {
      try {
        const s = this.store.getSession(id);
        if (s !== undefined) this.store.setTracking(id, trackingOf(undefined, s.containment));
      } catch (err) {
        this.log.error({ err, sessionId: id }, "could not record the session's tracking");
      }
    }
  }

  private storeUnavailable(fault: string): void {
    this.storeDownSince ??= this.clock.mono();
    this.metrics.storeFault();
    this.log.error(
      { fault },
      "the store cannot commit: changes answer 503 SR_STORE_UNAVAILABLE and nothing is reaped on time alone until it does",
    );
    if (this.probeTimer === null) {
      this.probeTimer = setInterval(() => {
        try {
          if (this.store.probe(this.clock.now())) return;
          // What is still missing (a lock; room on the disk, and how much), once a minute.
          const now = this.clock.mono();
          if (now - (this.lastWarned.get("store") ?? Number.NEGATIVE_INFINITY) < WARN_EVERY_MS) return;
          this.lastWarned.set("store", now);
          this.log.warn({ fault: this.store.lastFault }, "the store still cannot commit");
        } catch (err) {
          this.log.error({ err }, "store probe failed");
        }
      }, STORE_PROBE_MS);
      this.probeTimer.unref();
    }
  }

  private storeAvailable(): void {
    if (this.probeTimer !== null) clearInterval(this.probeTimer);
    this.probeTimer = null;
    const since = this.storeDownSince ?? this.clock.mono();
    this.storeDownSince = null;
    this.stalled("store", this.clock.mono() - since);
    try {
      this.store.checkpoint();
    } catch {
      // the next housekeeping tick tries again
    }
    this.reaper.storeAvailable();
    this.detector.rearm();
    void this.writeBehind.flush();
  }

  /** Every HOUSEKEEPING_MS: file descriptors checked; every minute, the WAL truncated. */
  private housekeeping(): void {
    try {
      this.checkFds();
      if (++this.housekeepingTicks % CHECKPOINT_TICKS === 0 && this.store.available) this.store.checkpoint();
    } catch (err) {
      if (!(err instanceof ReaperError && err.code === "SR_STORE_UNAVAILABLE")) {
        this.log.error({ err }, "housekeeping failed");
      }
    }
  }

  /**
   * Open fds near the soft limit are warned about before they run out: at the limit, a
   * pidfd cannot be opened (exits are then seen only by the liveness pass) and libuv accepts
   * and closes new connections without a word (its EMFILE trick). process_open_fds and
   * process_max_fds are exported by the default metrics.
   */
  private checkFds(): void {
    const limit = fdLimit();
    if (limit === null) return;
    const open = readdirSync("/proc/self/fd").length;
    if (open >= limit * FD_WARN_SHARE) this.resourceError("fds", `${open} of ${limit} open`);
  }

  /** A resource error: counted, and logged at most once a minute per kind. */
  private resourceError(op: "pidfd" | "accept" | "fds", code: string): void {
    if (op !== "fds") this.metrics.fdError(op, code);
    const now = this.clock.mono();
    const key = `${op}:${code}`;
    if (now - (this.lastWarned.get(key) ?? Number.NEGATIVE_INFINITY) < WARN_EVERY_MS) return;
    this.lastWarned.set(key, now);
    const what = {
      pidfd: "a pidfd could not be opened: engine exits are seen by the liveness pass only",
      accept: "a connection could not be accepted",
      fds: "file descriptors are close to the limit (raise LimitNOFILE)",
    }[op];
    this.log.error({ op, code }, what);
  }

  /**
   * Accept errors (EMFILE, ENFILE) that Node reports on the server are counted, never fatal; on
   * the unix socket, a connection that could not be accepted may have been a heartbeat.
   */
  private watchAccept(server: Server, crowds = false): void {
    server.on("error", (err: NodeJS.ErrnoException) => {
      this.resourceError("accept", err.code ?? "EUNKNOWN");
      if (crowds) this.crowdWatch.refused();
    });
  }
}

/** RLIMIT_NOFILE's soft limit, from /proc/self/limits; null if unreadable or unlimited. */
function fdLimit(): number | null {
  try {
    const line = readFileSync("/proc/self/limits", "utf8")
      .split("\n")
      .find((l) => l.startsWith("Max open files"));
    const soft = line?.split(/\s{2,}/)[1];
    return soft !== undefined && /^\d+$/.test(soft) ? Number(soft) : null;
  } catch {
    return null;
  }
}
