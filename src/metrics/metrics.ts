import { monitorEventLoopDelay } from "node:perf_hooks";
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";
import {
  SESSION_STATES,
  type Damage,
  type Outcome,
  type Reason,
  type StepName,
  type TimeReason,
} from "../model/session.js";
import type { Store } from "../store/store.js";

export interface MetricsDeps {
  store: Store;
  /** The configured profiles: their series are reported (as 0) even with no session. */
  profiles: readonly string[];
  /** Log and audit lines the sink could not write (src/audit/sink.ts), read at scrape time. */
  logLinesDropped?: () => number;
  /** The lineage connector's state and counters (src/proc/lineage.ts), read at scrape time. */
  lineage?: () => { available: boolean; events: number; lost: number; processes: number };
  /** Connections open on the unix socket, by kind of peer (src/http/connection-limits.ts), read at scrape time. */
  connections?: () => { admin: number; user: number };
  /** Unkillable processes the daemon watches (src/reaper/resolver.ts), read at scrape time. */
  unkillable?: () => number;
  /** [pressure]: the last `some avg10` read (null: unreadable or off) and whether pressure holds, read at scrape time. */
  pressure?: () => { someAvg10: number | null; holding: boolean };
}

/**
 * Why the daemon ended an event stream (GET /v1/events) its reader was not done with:
 * slow_reader (too many bytes unsent, or live events held while its backlog was read),
 * store_error (the store could not be read for it), shutdown (the daemon closed its API).
 */
export type EventStreamCut = "slow_reader" | "store_error" | "shutdown";
const EVENT_STREAM_CUTS: readonly EventStreamCut[] = ["slow_reader", "store_error", "shutdown"];

/** What made the daemon lose time: its loop, its store, or connections it turned away. */
export type StallCause = "loop" | "store" | "crowded";

/**
 * The daemon's Prometheus metrics, on a registry of its own (never prom-client's global one:
 * tests run several daemons in one process). Everything counted here is cheap to count: one
 * unlabelled inc() per heartbeat, one labelled inc() per API request, a few observations per
 * reap. Session counts are read at scrape time.
 */
export class Metrics {
  readonly registry = new Registry();
  /**
   * Accepted heartbeats, a plain number handed to the counter at scrape time: prom-client's
   * inc() hashes its (empty) label set and validates the value on every call, which the
   * hottest request of the daemon need not pay.
   */
  private heartbeatCount = 0;
  private readonly reaps: Counter<"reason" | "outcome">;
  private readonly stepDuration: Histogram<"step">;
  private readonly detectionLag: Histogram<"reason">;
  /**
   * API requests by route, method and status, counted in plain Maps and handed to the
   * counter at scrape time: a labelled prom-client inc() costs ~0.9 µs (it builds a label
   * hash), a few percent of a heartbeat request; these lookups cost a few tens of ns.
   */
  private readonly httpCounts = new Map<string, Map<string, HttpCount>>();
  /**
   * Reaped sessions by profile: counted once at start, then one more per finished reap.
   * `reaped` only grows and is most of the table, so counting it at every scrape would be a
   * scan (600 ms at a million rows); live and reaping are read from the (state, deadline)
   * index at scrape time.
   */
  private readonly reapedByProfile: Map<string, number>;
  private readonly orphansFound: Counter<"profile" | "kind">;
  /** The orphan sweep's current findings (its last pass), by profile and kind. */
  private orphanCounts: { profile: string; kind: string }[] = [];
  private readonly stalls: Counter<"cause">;
  private readonly stalledSeconds: Counter<"cause">;
  private readonly storeFaults: Counter;
  private readonly storeDamageFound: Counter<"table" | "column">;
  private readonly fdErrors: Counter<"op" | "code">;
  private readonly connectionsRefused: Counter<"limit">;
  private readonly connectionsEvicted: Counter<"limit">;
  private readonly usageCpu: Histogram<"profile">;
  private readonly usageMemory: Histogram<"profile">;
  private readonly usageLifetime: Histogram<"profile">;
  private readonly warnings: Counter<"reason">;
  private readonly eventStreamCuts: Counter<"reason">;
  /** Event streams open now, by kind (src/http/events-stream.ts registers its count). */
  private eventStreams: () => { follow: number; backlog: number } = () => ({ follow: 0, backlog: 0 });

  constructor(deps: MetricsDeps) {
    const registers = [this.registry];
    // The event-loop lag monitor samples on a timer of this period: prom-client's default
    // (10 ms) wakes an idle daemon 100 times a second, about 0.6 % of a core by itself on
    // this machine; 100 ms still gives the lag histogram ten samples a second.
    // prom-client's own loop-delay histogram is replaced (eventLoopDelay): its timer is given
    // the longest period a timer takes, so that it never wakes the daemon.
    collectDefaultMetrics({ register: this.registry, eventLoopMonitoringPrecision: 2 ** 31 - 1 });
    eventLoopDelay(this.registry);
    this.reapedByProfile = new Map(deps.store.reapedByProfile().map((r) => [r.profile, r.n]));
    const reapedByProfile = this.reapedByProfile;
    new Gauge({
      name: "session_reaper_sessions",
      help: "Sessions by state and profile (live, damaged and reaping read from SQLite at scrape time).",
      labelNames: ["state", "profile"],
      registers,
      collect() {
        this.reset();
        for (const profile of deps.profiles) for (const state of SESSION_STATES) this.set({ state, profile }, 0);
        for (const r of deps.store.unfinishedByProfile()) this.set({ state: r.state, profile: r.profile }, r.n);
        for (const [profile, n] of reapedByProfile) this.set({ state: "reaped", profile }, n);
      },
    });
    const heartbeats = (): number => this.heartbeatCount;
    new Counter({
      name: "session_reaper_heartbeats_total",
      help: "Heartbeats accepted (for a live session); rejected ones show in session_reaper_http_requests_total.",
      registers,
      collect() {
        this.reset();
        this.inc(heartbeats());
      },
    });
    this.reaps = new Counter({
      name: "session_reaper_reaps_total",
      help: "Reaps finished (reap.finished), by reason and outcome.",
      labelNames: ["reason", "outcome"],
      registers,
    });
    this.stepDuration = new Histogram({
      name: "session_reaper_reap_step_duration_seconds",
      help: "Duration of each cleanup step (reap.step), by step.",
      labelNames: ["step"],
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
      registers,
    });
    this.detectionLag = new Histogram({
      name: "session_reaper_detection_lag_seconds",
      help: "Start of a time-based reap minus the session's deadline, by reason (evidence-based reaps have no deadline: not observed).",
      labelNames: ["reason"],
      buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      registers,
    });
    this.orphansFound = new Counter({
      name: "session_reaper_orphans_found_total",
      help: "Orphan sweep findings (orphan.found: once per process identity or path until it disappears), by profile and kind.",
      labelNames: ["profile", "kind"],
      registers,
    });
    const orphans = (): { profile: string; kind: string }[] => this.orphanCounts;
    new Gauge({
      name: "session_reaper_orphans",
      help: "Findings of the orphan sweep's last pass, by profile and kind (GET /v1/orphans).",
      labelNames: ["profile", "kind"],
      registers,
      collect() {
        this.reset();
        for (const f of orphans()) this.inc({ profile: f.profile, kind: f.kind });
      },
    });
    const httpCounts = this.httpCounts;
    new Counter({
      name: "session_reaper_http_requests_total",
      help: "API requests answered, by method, route pattern (never the raw URL) and status.",
      labelNames: ["method", "route", "status"],
      registers,
      collect() {
        this.reset();
        for (const [route, byMethod] of httpCounts) {
          for (const [method, count] of byMethod) {
            for (const [status, n] of count.counts()) this.inc({ method, route, status: String(status) }, n);
          }
        }
      },
    });
    this.stalls = new Counter({
      name: "session_reaper_stalls_total",
      help: "Times the daemon came back from a stall: its event loop did not run for over a second (cause loop: SIGSTOP, a VM freeze, a blocked loop), its store could not commit (cause store), or it turned away connections of peers within their limits (cause crowded). Time-based deadlines restart after each (after crowded, heartbeat deadlines only).",
      labelNames: ["cause"],
      registers,
    });
    this.stalledSeconds = new Counter({
      name: "session_reaper_stalled_seconds_total",
      help: "Seconds spent stalled, by cause (see session_reaper_stalls_total).",
      labelNames: ["cause"],
      registers,
    });
    this.storeFaults = new Counter({
      name: "session_reaper_store_faults_total",
      help: "Times the store stopped committing (locked by another process, disk full, I/O error).",
      registers,
    });
    this.storeDamageFound = new Counter({
      name: "session_reaper_store_damage_total",
      help: "Stored values found unreadable (a damaged row: bad JSON, JSON of the wrong shape, a value of the wrong type), once per value and daemon run, by table and column; each is named in the log and in a session.damaged event.",
      labelNames: ["table", "column"],
      registers,
    });
    const store = deps.store;
    new Gauge({
      name: "session_reaper_store_available",
      help: "1 while the store commits; 0 while it cannot (changes answer 503 SR_STORE_UNAVAILABLE, nothing is reaped on time alone).",
      registers,
      collect() {
        this.set(store.available ? 1 : 0);
      },
    });
    const dropped = deps.logLinesDropped ?? (() => 0);
    new Counter({
      name: "session_reaper_log_lines_dropped_total",
      help: "Log and audit lines that could not be written (disk full, closed pipe); the audit rows in SQLite are kept.",
      registers,
      collect() {
        this.reset();
        this.inc(dropped());
      },
    });
    this.usageCpu = new Histogram({
      name: "session_reaper_session_cpu_seconds",
      help: "CPU seconds a session used, observed when its reap finishes.",
      labelNames: ["profile"],
      buckets: [0.1, 1, 10, 60, 600, 3600, 36000],
      registers,
    });
    this.usageMemory = new Histogram({
      name: "session_reaper_session_peak_memory_bytes",
      help: "The most memory a session was seen with (memory.peak, else the largest resident sum sampled).",
      labelNames: ["profile"],
      buckets: [2 ** 24, 2 ** 26, 2 ** 28, 2 ** 30, 2 ** 32, 2 ** 34],
      registers,
    });
    this.usageLifetime = new Histogram({
      name: "session_reaper_session_lifetime_seconds",
      help: "From a session's registration to its fence, observed when its reap finishes.",
      labelNames: ["profile"],
      buckets: [10, 60, 600, 3600, 4 * 3600, 86400, 7 * 86400],
      registers,
    });
    const lineage = deps.lineage ?? (() => ({ available: false, events: 0, lost: 0, processes: 0 }));
    new Gauge({
      name: "session_reaper_lineage_available",
      help: "1 while the kernel's process events connector is read (lineage of every fork); 0 where it is unavailable (sessions are tracked by cgroups and walks).",
      registers,
      collect() {
        this.set(lineage().available ? 1 : 0);
      },
    });
    new Counter({
      name: "session_reaper_lineage_events_total",
      help: "Process events (forks and exits) read from the kernel's connector.",
      registers,
      collect() {
        this.reset();
        this.inc(lineage().events);
      },
    });
    new Counter({
      name: "session_reaper_lineage_lost_total",
      help: "Process events lost (the socket's buffer overran, ENOBUFS, or the daemon's was full): each loss falls the sessions of the moment back to walks.",
      registers,
      collect() {
        this.reset();
        this.inc(lineage().lost);
      },
    });
    new Gauge({
      name: "session_reaper_lineage_processes",
      help: "Processes in the lineage table (one per live process on the host).",
      registers,
      collect() {
        this.set(lineage().processes);
      },
    });
    this.fdErrors = new Counter({
      name: "session_reaper_fd_errors_total",
      help: "File descriptors the daemon could not open, by operation (pidfd, accept) and errno (EMFILE, ENFILE).",
      labelNames: ["op", "code"],
      registers,
    });
    this.connectionsRefused = new Counter({
      name: "session_reaper_connections_refused_total",
      help: "Unix socket connections closed at accept, by the limit that refused them: uid (the peer's uid held api.max_connections_per_uid, all busy) or total (api.max_connections held, all busy).",
      labelNames: ["limit"],
      registers,
    });
    this.connectionsEvicted = new Counter({
      name: "session_reaper_connections_evicted_total",
      help: "Idle unix socket connections closed to make room for a new one, by limit: uid (the same uid's, at its limit) or total (the uid holding the most's).",
      labelNames: ["limit"],
      registers,
    });
    const unkillable = deps.unkillable ?? (() => 0);
    new Gauge({
      name: "session_reaper_unkillable_processes",
      help: "Processes reaps left alive after SIGKILL (unkillable leftovers: uninterruptible sleep in a hung file system, a frozen cgroup, a driver) that the daemon still watches; each reap is resolved (reap.resolved) once all of its are gone.",
      registers,
      collect() {
        this.set(unkillable());
      },
    });
    const connections = deps.connections ?? (() => ({ admin: 0, user: 0 }));
    new Gauge({
      name: "session_reaper_connections",
      help: "Unix socket connections open now, by peer: admin (root, the daemon's uid, api.admin_group: not limited) or user (counted against the limits).",
      labelNames: ["peer"],
      registers,
      collect() {
        const open = connections();
        this.set({ peer: "admin" }, open.admin);
        this.set({ peer: "user" }, open.user);
      },
    });
    this.warnings = new Counter({
      name: "session_reaper_warnings_total",
      help: "Warnings given before a reap (session.warning), by reason: idle_timeout, max_lifetime, memory_pressure.",
      labelNames: ["reason"],
      registers,
    });
    const eventStreams = (): { follow: number; backlog: number } => this.eventStreams();
    new Gauge({
      name: "session_reaper_event_streams",
      help: "Audit event streams (GET /v1/events) open now, by kind: follow (follow=1, its backlog included) or backlog (the backlog only).",
      labelNames: ["kind"],
      registers,
      collect() {
        const open = eventStreams();
        this.set({ kind: "follow" }, open.follow);
        this.set({ kind: "backlog" }, open.backlog);
      },
    });
    this.eventStreamCuts = new Counter({
      name: "session_reaper_event_streams_cut_total",
      help: "Audit event streams the daemon ended before their reader was done, by reason: slow_reader (more than 4 MiB unsent, or 10,000 live events held while its backlog was read: cut), store_error (the store could not be read for it: cut), shutdown (the daemon closed its API: a follower ended cleanly, or cut if its socket was still full; a backlog cut short).",
      labelNames: ["reason"],
      registers,
    });
    for (const reason of EVENT_STREAM_CUTS) this.eventStreamCuts.inc({ reason }, 0);
    const pressure = deps.pressure;
    if (pressure !== undefined) {
      new Gauge({
        name: "session_reaper_memory_pressure_some_avg10",
        help: "The last `some avg10` read from [pressure] file (percent); absent while it cannot be read or [pressure] is off.",
        registers,
        collect() {
          this.reset();
          const p = pressure();
          if (p.someAvg10 !== null) this.set(p.someAvg10);
        },
      });
      new Gauge({
        name: "session_reaper_memory_pressure_holding",
        help: "1 while memory pressure holds at or above [pressure] some_avg10 (idle sessions are being reclaimed), else 0.",
        registers,
        collect() {
          this.set(pressure().holding ? 1 : 0);
        },
      });
    }
  }

  /** How many event streams are open, read at scrape time (the API's event hub). */
  countEventStreams(read: () => { follow: number; backlog: number }): void {
    this.eventStreams = read;
  }

  /** The daemon ended an event stream its reader was not done with. */
  eventStreamCut(reason: EventStreamCut): void {
    this.eventStreamCuts.inc({ reason });
  }

  /** A warning was given (session.warning). */
  warned(reason: string): void {
    this.warnings.inc({ reason });
  }

  /** The loop did not run (cause "loop"), the store did not commit ("store") or connections were turned away ("crowded") for `ms`. */
  stalled(cause: StallCause, ms: number): void {
    this.stalls.inc({ cause });
    this.stalledSeconds.inc({ cause }, ms / 1000);
  }

  /** What a session cost, when its reap finished. */
  sessionUsage(profile: string, u: { cpuSec: number; peakMemoryBytes: number; lifetimeSec: number }): void {
    this.usageCpu.observe({ profile }, u.cpuSec);
    this.usageMemory.observe({ profile }, u.peakMemoryBytes);
    this.usageLifetime.observe({ profile }, u.lifetimeSec);
  }

  /** The store stopped committing (one per outage). */
  storeFault(): void {
    this.storeFaults.inc();
  }

  /** A damaged stored value, found for the first time since the daemon started. */
  storeDamage(table: Damage["table"], column: string): void {
    this.storeDamageFound.inc({ table, column });
  }

  /** A file descriptor could not be had: `op` is "pidfd" or "accept". */
  fdError(op: "pidfd" | "accept", code: string): void {
    this.fdErrors.inc({ op, code });
  }

  /** A unix socket connection closed at accept (src/http/connection-limits.ts). */
  connectionRefused(limit: "uid" | "total"): void {
    this.connectionsRefused.inc({ limit });
  }

  /** An idle unix socket connection closed to make room for a new one. */
  connectionEvicted(limit: "uid" | "total"): void {
    this.connectionsEvicted.inc({ limit });
  }

  /** The heartbeat path: one integer increment, nothing else. */
  heartbeat(): void {
    this.heartbeatCount++;
  }

  reapFinished(reason: Reason, outcome: Outcome, profile: string): void {
    this.reaps.inc({ reason, outcome });
    this.reapedByProfile.set(profile, (this.reapedByProfile.get(profile) ?? 0) + 1);
  }

  stepFinished(step: StepName, durationMs: number): void {
    this.stepDuration.observe({ step }, durationMs / 1000);
  }

  /** How late a time-based expiry started its reap (the fence), in ms after the deadline. */
  detectedLate(reason: TimeReason, lagMs: number): void {
    this.detectionLag.observe({ reason }, Math.max(0, lagMs) / 1000);
  }

  /** One orphan.found. */
  orphanFound(profile: string, kind: string): void {
    this.orphansFound.inc({ profile, kind });
  }

  /** The findings of the sweep's last pass (the gauge is computed from them at scrape time). */
  setOrphans(findings: readonly { profile: string; kind: string }[]): void {
    this.orphanCounts = findings.map((f) => ({ profile: f.profile, kind: f.kind }));
  }

  /** `route` is fastify's route pattern (`/v1/sessions/:id`): ids would explode cardinality. */
  httpRequest(method: string, route: string, status: number): void {
    this.httpCount(method, route).add(status);
  }

  /**
   * The requests answered on one method and route, kept by the caller: for the heartbeat,
   * answered so often that finding its count in the maps showed in its CPU profile.
   */
  httpCount(method: string, route: string): HttpCount {
    let byMethod = this.httpCounts.get(route);
    if (byMethod === undefined) this.httpCounts.set(route, (byMethod = new Map<string, HttpCount>()));
    let count = byMethod.get(method);
    if (count === undefined) byMethod.set(method, (count = new HttpCount()));
    return count;
  }

  /** The text exposition format. */
  async exposition(): Promise<{ contentType: string; body: string }> {
    return { contentType: this.registry.contentType, body: await this.registry.metrics() };
  }
}

/** Requests answered on one method and route, by status (200, by far the most, in a field of its own). */
export class HttpCount {
  private ok = 0;
  private readonly others = new Map<number, number>();

  add(status: number): void {
    if (status === 200) this.ok++;
    else this.others.set(status, (this.others.get(status) ?? 0) + 1);
  }

  counts(): [number, number][] {
    const all = [...this.others];
    if (this.ok > 0) all.push([200, this.ok]);
    return all;
  }
}

/** The event-loop delay monitor's sampling period (prom-client's default, 10 ms, would wake an idle daemon 100 times a second). */
const LOOP_SAMPLE_MS = 100;

/**
 * prom-client's `nodejs_eventloop_lag_{min,max,mean,p50,p90,p99}_seconds`, corrected: Node's
 * monitorEventLoopDelay records the time between two of its timer's firings, the sampling
 * period included (an idle daemon showed 0.100 s at p50 with the 100 ms period), so each is
 * reported here less that period (never below 0); stddev is unchanged. Same names, so that
 * dashboards built on them read the delay itself. `nodejs_eventloop_lag_seconds` (a
 * setImmediate's wait at scrape time) is prom-client's own.
 */
function eventLoopDelay(registry: Registry): void {
  const histogram = monitorEventLoopDelay({ resolution: LOOP_SAMPLE_MS });
  histogram.enable();
  const periodNs = LOOP_SAMPLE_MS * 1e6;
  const delay = (ns: number): number => Math.max(0, ns - periodNs) / 1e9;
  const what = " (the time between two firings of a 100 ms timer, less the 100 ms), since the previous scrape";
  const read: [string, string, (h: typeof histogram) => number][] = [
    ["min", "The minimum recorded event loop delay", (h) => delay(h.min)],
    ["max", "The maximum recorded event loop delay", (h) => delay(h.max)],
    ["mean", "The mean of the recorded event loop delays", (h) => delay(h.mean)],
    ["stddev", "The standard deviation of the recorded event loop delays", (h) => h.stddev / 1e9],
    ["p50", "The 50th percentile of the recorded event loop delays", (h) => delay(h.percentile(50))],
    ["p90", "The 90th percentile of the recorded event loop delays", (h) => delay(h.percentile(90))],
    ["p99", "The 99th percentile of the recorded event loop delays", (h) => delay(h.percentile(99))],
  ];
  // The first gauge's collect sets all seven, then starts the next window: a scrape reads the
  // registry's metrics one after the other in the order registered, min first of the seven.
  const gauges: { gauge: Gauge; value: (h: typeof histogram) => number }[] = [];
  const all = (): void => {
    // No sample yet (the first scrape within 100 ms of start): Node's min is then 2^63 ns.
    for (const g of gauges) g.gauge.set(histogram.count > 0 ? g.value(histogram) : 0);
    histogram.reset();
  };
  for (const [i, [stat, help, value]] of read.entries()) {
    const name = `nodejs_eventloop_lag_${stat}_seconds`;
    registry.removeSingleMetric(name);
    const gauge = new Gauge({ name, help: help + what, registers: [registry], ...(i === 0 ? { collect: all } : {}) });
    gauges.push({ gauge, value });
  }
}
