/**
 * The client library for engines and their launchers:
 *
 *   import { ReaperClient } from "session-reaper/client";
 *   const client = new ReaperClient({ socketPath: "/run/session-reaper/reaper.sock" });
 *   await client.register({ engine: { pid: process.pid }, paths: [tmp] });
 *   client.on("fenced", () => shutDown());
 *   client.on("warning", (w) => tellUser(w.deadline)); // reclaimed then unless busy or extended
 *   client.start();               // heartbeats on one kept connection, ±10%
 *   client.idle(); client.busy(); // the activity sent with the next heartbeats
 *   await client.close();         // DELETE: the daemon runs the full cleanup
 *
 * The heartbeat loop follows etcd's lease keepalive: a jittered interval well inside the
 * timeout, so one lost beat never expires the session, and exponential backoff while the
 * daemon cannot be reached (a restart: the socket is gone or refuses), since daemon
 * downtime never counts against a session. The interval also falls within the daemon's
 * keep-alive timeout, so the loop keeps its connection: a heartbeat never waits to connect,
 * nor for a free slot on a crowded socket. `reaperctl run` is built on this class.
 */
import { spawn as spawnProcess, type ChildProcess, type SpawnOptions } from "node:child_process";
import { randomUUID } from "node:crypto";
import { EventEmitter } from "node:events";
import type { Writable } from "node:stream";
import { callApi, streamApi, type ApiResponse, type ApiStream } from "./transport.js";
import type { RegisterBody, UpdateBody } from "../model/requests.js";
import {
  SESSION_COOKIE,
  type Damage,
  type Leftover,
  type Outcome,
  type ProcessIdentity,
  type Reason,
  type SessionState,
  type StepName,
  type StepOutcome,
  type StepResult,
  type TimeReason,
} from "../model/session.js";

export type { RegisterBody, UpdateBody };

export { SESSION_COOKIE };

/**
 * Holds a command at a gate until its session is registered: the shell waits for "go" on
 * fd 3, closes it, and execs the command, which keeps the shell's pid and start time, the
 * identity the daemon registered (and contained: the command starts inside its session's
 * cgroup, so no child of it is ever born outside). End of file instead (the launcher died
 * first) means the command never runs.
 */
export const GATE = 'IFS= read -r go <&3 || exit 125; exec 3<&-; [ "$go" = go ] || exit 125; exec "$0" "$@"';

/**
 * A session as the API answers it (`src/http/present.ts` `sessionJson`; the client tests
 * pin the two types to each other). Written out rather than derived, so these declarations
 * do not pull the daemon's internals into an engine's type check.
 */
export interface Session {
  id: string;
  profile: string;
  owner: string | null;
  engine: ProcessIdentity;
  ownerPid: ProcessIdentity | null;
  ports: readonly number[];
  paths: readonly string[];
  labels: Readonly<Record<string, string>>;
  heartbeatTimeoutSec: number;
  idleTimeoutSec: number;
  maxLifetimeSec: number;
  state: SessionState;
  reason: Reason | null;
  outcome: Outcome | null;
  leftovers: readonly Leftover[];
  createdAt: string | null;
  lastHeartbeatAt: string | null;
  lastActivityAt: string | null;
  deadline: string | null;
  reapStartedAt: string | null;
  reapedAt: string | null;
  /** An extension (extend()): while live, its idle deadline is at least this; null if none. */
  extendedUntil: string | null;
  /**
   * While live: the warning given (the profile's warn_before_sec) and still standing: the
   * session is reaped at `deadline` unless it is active (a busy heartbeat) or extended first.
   */
  warning: SessionWarning | null;
  reapAttempts: number;
  /** Who registered the session (the unix socket peer's uid); uid null for loopback TCP. */
  registeredBy: { uid: number | null; admin: boolean; via: "unix" | "tcp" | null };
  /** A cgroup of its own, or none and why (null: registered before containment existed). */
  containment: { kind: "cgroup"; path: string; made: boolean } | { kind: "none"; why: string } | null;
  /**
   * How its processes were known, strongest first: "lineage" (every fork since the engine's
   * birth, from the kernel), "cgroup-from-birth", "cgroup", "snapshots" (null: before tracking).
   */
  tracking: "lineage" | "cgroup-from-birth" | "cgroup" | "snapshots" | null;
  /**
   * Stored values of its row the daemon cannot read (a damaged row; empty when intact): table,
   * row, column and what is wrong. A damaged session is never reaped clean; state "damaged":
   * its engine cannot be identified, and it takes no heartbeat (409 SR_SESSION_DAMAGED).
   */
  damage: readonly Damage[];
  /** On POST /v1/sessions only: what the registration could not give (tracking weaker than lineage). */
  warnings?: { code: string; message: string }[];
  /** On GET /v1/sessions/{id} only. */
  steps?: {
    name: StepName;
    outcome: StepOutcome;
    startedAt: string | null;
    durationMs: number;
    detail: StepResult["detail"];
    damage?: Damage;
  }[];
  /** On GET /v1/sessions/{id} only: while live, the engine's usage now; once reaped, what the session used. */
  usage?:
    | { cpu: number; memory: number; elapsed: number }
    | {
        cpuSec: number;
        peakMemoryBytes: number;
        peakMemorySource: "memory.peak" | "rss-samples";
        peakProcesses: number;
        lifetimeSec: number;
      }
    | null;
}

/** A warning given before the daemon reclaims a session (the profile's warn_before_sec, or memory pressure). */
export interface SessionWarning {
  reason: "idle_timeout" | "max_lifetime" | "memory_pressure";
  /** When the session is reaped unless it is active (a busy heartbeat) or extended first. */
  deadline: string;
  /** When the warning was given: one warning, one `at`. */
  at: string;
}

/** The answer to a heartbeat: the session's new deadline and the timeout that sets it. */
export interface HeartbeatAnswer {
  id: string;
  state: "live";
  deadline: string;
  expiresBy: TimeReason;
  /** The warning standing after this heartbeat, or null (a busy one voids an idle warning). */
  warning: SessionWarning | null;
}

/** What extend() answers. */
export interface ExtendAnswer {
  id: string;
  state: "live";
  /** Its idle deadline is at least this while it is live. */
  extendedUntil: string;
  /** When it is reaped if it stays idle and keeps heartbeating: its idle deadline, or its max lifetime. */
  keptUntil: string;
  /** "max_lifetime": the session's max lifetime ends before the extension does. */
  cappedBy: "max_lifetime" | null;
  /** The earliest deadline now: a missed heartbeat still reaps the session. */
  deadline: string;
  expiresBy: TimeReason;
}

export type Activity = "busy" | "idle";

/** The daemon answered with an error: `code` is the stable `SR_…` code. */
export class ReaperApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly detail?: Record<string, unknown>,
  ) {
    super(message);
    this.name = "ReaperApiError";
  }

  static from(res: ApiResponse<unknown>): ReaperApiError {
    const e = (res.body as { error?: { code?: string; message?: string; detail?: Record<string, unknown> } } | null)
      ?.error;
    return new ReaperApiError(
      res.status,
      e?.code ?? `HTTP_${res.status}`,
      e?.message ?? `the daemon answered HTTP ${res.status}`,
      e?.detail,
    );
  }
}

export interface RetryInfo {
  /** 1 for the first failed heartbeat of an outage. */
  attempt: number;
  /** The wait before the next try. */
  delayMs: number;
  error: Error;
}

/**
 * One audit event as GET /v1/events streams it (`src/http/present.ts` `eventJson`: the objects
 * of GET /v1/sessions/{id}/events), with `seq` null for an event the daemon could not store.
 */
export interface AuditEventLine {
  /** audit_events' seq, in commit order: resume after it with `since`. */
  seq: number | null;
  time: string;
  event: string;
  sessionId: string | null;
  reason: string | null;
  step: string | null;
  outcome: string | null;
  durationMs: number | null;
  detail: Record<string, unknown> | null;
  /** The stored detail cannot be read (then detail is null). */
  damage?: Damage;
}

export interface EventStreamOptions {
  /** After the backlog, each event as it is committed; a dropped connection is resumed (`retries`). */
  follow?: boolean;
  /** Only this session's events (a non-admin: one it registered). */
  session?: string;
  /** Only events after this seq. Default: following, from now; else from the oldest event kept. */
  since?: number;
  /** Aborting ends the iteration (without an error). */
  signal?: AbortSignal;
  /**
   * Following, once a stream was open: reconnections in a row that may fail before the
   * iteration throws the last error (default 10). The first connection is not retried.
   */
  retries?: number;
  /** The wait before each reconnection: from `initialMs` (100) doubling to `maxMs` (5000), ±10%. */
  backoff?: { initialMs?: number; maxMs?: number };
  /** Nothing received for this long drops the connection (default 45 s; the daemon sends an empty line every 15 s). */
  idleTimeoutMs?: number;
  /** Told before each reconnection: why, the wait, and the seq it resumes after. */
  onRetry?: (info: RetryInfo & { since: number | null }) => void;
}

/** The seq a stream starts after, as the daemon says (its `reaper-events-after` header). */
function streamStart(stream: ApiStream): number | null {
  const v = Number(stream.headers["reaper-events-after"]);
  return Number.isSafeInteger(v) && v >= 0 ? v : null;
}

function eventsPath(opts: EventStreamOptions, since: number | null): string {
  const q = new URLSearchParams();
  if (opts.follow === true) q.set("follow", "1");
  if (opts.session !== undefined) q.set("session", opts.session);
  if (since !== null) q.set("since", String(since));
  const query = q.toString();
  return query === "" ? "/v1/events" : `/v1/events?${query}`;
}

/** Waits `ms`; false if `signal` aborts first. */
function pause(ms: number, signal: AbortSignal | undefined): Promise<boolean> {
  return new Promise((resolve) => {
    if (signal?.aborted === true) return resolve(false);
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", aborted);
      resolve(true);
    }, ms);
    const aborted = (): void => {
      clearTimeout(timer);
      resolve(false);
    };
    signal?.addEventListener("abort", aborted, { once: true });
  });
}

/**
 * The daemon's audit events (GET /v1/events), oldest first: what is kept after `since`, then,
 * following, each new one as it is committed. A follower whose connection drops (the daemon
 * restarts, cuts a reader that fell behind, or stops answering) reconnects with `since` = the
 * last seq it received: no event is lost or repeated. Empty keep-alive lines are skipped.
 * Throws ReaperApiError for a refusal (400, 403, 404, 410 SR_EVENTS_PURGED: its detail's
 * `purgedThrough` is where to resume), and the last error once `retries` reconnections failed.
 */
export async function* streamEvents(
  socketPath: string,
  opts: EventStreamOptions = {},
): AsyncGenerator<AuditEventLine, void, undefined> {
  const retries = opts.retries ?? 10;
  const initialMs = opts.backoff?.initialMs ?? 100;
  const maxMs = opts.backoff?.maxMs ?? 5000;
  let since = opts.since ?? null;
  let opened = false;
  let failures = 0;
  for (;;) {
    let error: Error;
    let stream: ApiStream | null = null;
    try {
      stream = await streamApi(socketPath, eventsPath(opts, since), {
        ...(opts.idleTimeoutMs === undefined ? {} : { idleTimeoutMs: opts.idleTimeoutMs }),
        ...(opts.signal === undefined ? {} : { signal: opts.signal }),
      });
      if (stream.status !== 200) throw ReaperApiError.from({ status: stream.status, body: await stream.body() });
      opened = true;
      failures = 0;
      since ??= streamStart(stream);
      for await (const line of stream.lines) {
        if (line === "") continue; // a keep-alive
        const e = JSON.parse(line) as AuditEventLine;
        if (e.seq !== null) {
          if (since !== null && e.seq <= since) continue;
          since = e.seq;
        }
        yield e;
      }
      if (opts.follow !== true) return;
      error = Object.assign(new Error("the daemon ended the stream (it is stopping or restarting)"), {
        code: "ERR_STREAM_PREMATURE_CLOSE",
      });
    } catch (err) {
      if (opts.signal?.aborted === true) return;
      error = err instanceof Error ? err : new Error(String(err));
      const refused = err instanceof ReaperApiError && err.status < 500;
      if (opts.follow !== true || !opened || refused) throw error;
    } finally {
      stream?.close();
    }
    failures++;
    if (failures > retries) throw error;
    const delayMs = jitter(Math.min(maxMs, initialMs * 2 ** (failures - 1)));
    opts.onRetry?.({ attempt: failures, delayMs, error, since });
    if (!(await pause(delayMs, opts.signal))) return;
  }
}

/** Typed events of the heartbeat loop. */
export interface ReaperClientEvents {
  /** A heartbeat was accepted. */
  heartbeat: [HeartbeatAnswer];
  /**
   * A heartbeat's answer carries a warning this loop had not seen (once per warning): the
   * session will be reclaimed at `deadline` unless it is active (busy()) or extended first.
   */
  warning: [SessionWarning];
  /** A heartbeat could not be delivered (daemon unreachable, timeout, 5xx); the loop retries. */
  retrying: [RetryInfo];
  /**
   * The daemon refuses this session's heartbeats: 409 `SR_SESSION_FENCED` (it is being
   * reaped: the engine is about to be terminated), 410 `SR_SESSION_GONE` (reaped, its record
   * purged since), or 404 if it no longer knows it. The
   * loop has stopped; `close()` is not needed.
   */
  fenced: [ReaperApiError];
}

export interface ReaperClientOptions {
  socketPath: string;
  /**
   * Heartbeat interval before jitter; default a third of the session's heartbeatTimeoutSec, or
   * less so that the connection is kept: 80% of (the daemon's keep-alive timeout − 1 s).
   */
  intervalMs?: number;
  /** Each request's timeout; default 5000 ms. */
  requestTimeoutMs?: number;
  /** Backoff while heartbeats fail: doubles from `initialMs` (100) up to `maxMs` (5000). */
  backoff?: { initialMs?: number; maxMs?: number };
}

/** ±10%, so that many engines started together do not beat in lockstep. */
function jitter(ms: number): number {
  return Math.round(ms * (0.9 + 0.2 * Math.random()));
}

/** Node's agent drops a kept connection this long before the daemon's announced keep-alive timeout. */
const AGENT_KEEP_ALIVE_BUFFER_MS = 1000;
/**
 * The share of that time the default interval takes: with +10% jitter and a timer that fires
 * late on a busy host, the next heartbeat still finds the connection open.
 */
const KEEP_ALIVE_SHARE = 0.8;

export class ReaperClient extends EventEmitter<ReaperClientEvents> {
  readonly socketPath: string;
  private readonly intervalMs: number | undefined;
  private readonly requestTimeoutMs: number;
  private readonly backoffInitialMs: number;
  private readonly backoffMaxMs: number;
  private current: Session | null = null;
  private activity: Activity = "busy";
  private timer: NodeJS.Timeout | null = null;
  /** Bumped by every start and stop: an answer arriving for an older loop is ignored. */
  private loop = 0;
  private looping = false;
  private failures = 0;
  /** The `at` of the last warning emitted: each warning is told once. */
  private warnedAt: string | null = null;
  /** The daemon's keep-alive timeout, as its last answer announced it; null: none announced. */
  private keepAliveMs: number | null = null;

  constructor(opts: ReaperClientOptions) {
    super();
    this.socketPath = opts.socketPath;
    this.intervalMs = opts.intervalMs;
    this.requestTimeoutMs = opts.requestTimeoutMs ?? 5000;
    this.backoffInitialMs = opts.backoff?.initialMs ?? 100;
    this.backoffMaxMs = opts.backoff?.maxMs ?? 5000;
  }

  /** The session as last answered by register, close or get; null before register. */
  get session(): Session | null {
    return this.current;
  }

  /** Whether the heartbeat loop runs. */
  get running(): boolean {
    return this.looping;
  }

  /**
   * Starts `command` as this client's engine session, for launchers that spawn engines
   * themselves: the command waits at a gate (`GATE`) while its session is registered (with
   * `body`, an `id` chosen here unless given, and the waiting shell's pid as the engine), with
   * REAPER_SESSION_ID=<id> in its environment, then runs. So it is registered, contained where
   * the host allows, and marked before it executes anything. If registration fails, the
   * command is killed and never runs; the error is thrown.
   */
  async spawn(
    command: string,
    args: readonly string[] = [],
    opts: { body?: Omit<RegisterBody, "engine">; spawn?: SpawnOptions } = {},
  ): Promise<{ child: ChildProcess; session: Session }> {
    const id = opts.body?.id ?? randomUUID();
    const stdio = opts.spawn?.stdio;
    const base = Array.isArray(stdio) ? stdio.slice(0, 3) : [stdio ?? "ignore", stdio ?? "ignore", stdio ?? "ignore"];
    const child = spawnProcess("/bin/sh", ["-c", GATE, command, ...args], {
      ...opts.spawn,
      stdio: [...base, "pipe"],
      env: { ...(opts.spawn?.env ?? process.env), [SESSION_COOKIE]: id },
    });
    const gate = child.stdio[3] as Writable | null;
    gate?.on("error", () => undefined); // the shell died at the gate: its exit says so
    if (child.pid === undefined) {
      throw await new Promise<Error>((resolve) => child.once("error", resolve));
    }
    try {
      const session = await this.register({ ...opts.body, id, engine: { pid: child.pid } });
      gate?.end("go\n");
      return { child, session };
    } catch (err) {
      child.kill("SIGKILL");
      throw err;
    }
  }

  /** Registers the session (201); throws ReaperApiError with the daemon's code otherwise. */
  async register(body: RegisterBody): Promise<Session> {
    const res = await this.call<Session>("POST", "/v1/sessions", body);
    if (res.status !== 201) throw ReaperApiError.from(res);
    this.current = res.body;
    return res.body;
  }

  /**
   * Starts the heartbeat loop (the first beat after one interval). Its timer does not keep
   * the process alive: an engine that ends without close() is reaped as `engine_gone`.
   */
  start(): void {
    this.sessionId();
    if (this.looping) return;
    this.looping = true;
    this.failures = 0;
    this.schedule(++this.loop, this.nextInterval());
  }

  /** Stops the loop without closing the session (it then expires by heartbeat timeout). */
  stop(): void {
    this.looping = false;
    this.loop++;
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
  }

  /** Work is running: the next heartbeats move the idle deadline. The default. */
  busy(): void {
    this.activity = "busy";
  }

  /** Alive with nothing to do: the next heartbeats keep the session without moving activity. */
  idle(): void {
    this.activity = "idle";
  }

  /**
   * Adds ports, paths or labels to the live session (PATCH): a port the engine opened after
   * registration, a directory made later. Each port must be held by the engine's tree now
   * (SR_PORT_NOT_OWNED otherwise, and nothing changes). Resolves with the session.
   */
  async update(additions: UpdateBody): Promise<Session> {
    const res = await this.call<Session>("PATCH", this.path(), additions);
    if (res.status !== 200) throw ReaperApiError.from(res);
    return (this.current = res.body);
  }

  /**
   * Keeps the session at least `sec` seconds from now however idle (POST …/extend): up to the
   * profile's max_extend_sec (400 SR_EXTEND_ABOVE_MAX beyond, its detail naming the cap), never
   * past the session's max lifetime (`cappedBy`). Heartbeats must go on: a missed one still
   * reaps it. Throws ReaperApiError on a refusal.
   */
  async extend(sec: number): Promise<ExtendAnswer> {
    const res = await this.call<ExtendAnswer>("POST", `${this.path()}/extend`, { sec });
    if (res.status !== 200) throw ReaperApiError.from(res);
    return res.body;
  }

  /** One heartbeat now, outside the loop; throws ReaperApiError on a refusal. */
  async heartbeat(): Promise<HeartbeatAnswer> {
    const res = await this.call<HeartbeatAnswer>("POST", `${this.path()}/heartbeat`, { activity: this.activity });
    if (res.status !== 200) throw ReaperApiError.from(res);
    return res.body;
  }

  /**
   * Closes the session (DELETE: full cleanup, reason `closed`) and stops the loop. Resolves
   * with the session (now `reaping`), or null if the daemon had already ended it.
   */
  async close(): Promise<Session | null> {
    this.stop();
    const res = await this.call<Session>("DELETE", this.path());
    if (res.status === 202) return (this.current = res.body);
    // 409: being reaped or reaped already; 410: reaped, and its record purged since.
    if (res.status === 409 || res.status === 410) return null;
    throw ReaperApiError.from(res);
  }

  /** The session as the daemon holds it now, with its steps. */
  async get(): Promise<Session> {
    const res = await this.call<Session>("GET", this.path());
    if (res.status !== 200) throw ReaperApiError.from(res);
    return (this.current = res.body);
  }

  /**
   * The daemon's audit events as an async iterator (GET /v1/events; see `streamEvents`): this
   * caller's sessions' only, unless it is an admin. Needs no registered session.
   *
   *   for await (const e of client.events({ follow: true, session: id })) console.log(e.seq, e.event);
   */
  events(opts: EventStreamOptions = {}): AsyncGenerator<AuditEventLine, void, undefined> {
    return streamEvents(this.socketPath, opts);
  }

  /** Polls until the session is `reaped` (cleanup finished); rejects after `timeoutMs`. */
  async waitForReap(opts: { timeoutMs?: number; pollMs?: number; signal?: AbortSignal } = {}): Promise<Session> {
    const end = Date.now() + (opts.timeoutMs ?? 60_000);
    for (;;) {
      let s: Session;
      try {
        s = await this.get();
      } catch (err) {
        // Reaped, and its record purged since (store.retain_reaped_sec): what its tombstone says.
        if (err instanceof ReaperApiError && err.status === 410 && this.current !== null) return this.gone(err);
        throw err;
      }
      if (s.state === "reaped") return s;
      opts.signal?.throwIfAborted();
      if (Date.now() >= end) throw new Error(`session ${s.id} is still ${s.state}`);
      await new Promise((r) => setTimeout(r, opts.pollMs ?? 100));
    }
  }

  /** The session as last known, ended as its tombstone says (410 SR_SESSION_GONE's detail). */
  private gone(err: ReaperApiError): Session {
    const d = err.detail ?? {};
    const str = (v: unknown): string | null => (typeof v === "string" ? v : null);
    return (this.current = {
      ...(this.current as Session),
      state: "reaped",
      deadline: null,
      reason: str(d.reason) as Reason | null,
      outcome: str(d.outcome) as Outcome | null,
      reapedAt: str(d.endedAt),
    });
  }

  private sessionId(): string {
    if (this.current === null) throw new Error("ReaperClient: register() first");
    return this.current.id;
  }

  private path(): string {
    return `/v1/sessions/${encodeURIComponent(this.sessionId())}`;
  }

  private async call<T>(method: string, path: string, body?: unknown): Promise<ApiResponse<T>> {
    const res = await callApi<T>(this.socketPath, method, path, body, { timeoutMs: this.requestTimeoutMs });
    if (res.keepAliveMs !== undefined) this.keepAliveMs = res.keepAliveMs;
    return res;
  }

  private nextInterval(): number {
    if (this.intervalMs !== undefined) return jitter(this.intervalMs);
    const third = ((this.current?.heartbeatTimeoutSec ?? 30) * 1000) / 3;
    const kept = this.keepAliveMs === null ? 0 : KEEP_ALIVE_SHARE * (this.keepAliveMs - AGENT_KEEP_ALIVE_BUFFER_MS);
    return jitter(kept > 0 ? Math.min(third, kept) : third);
  }

  private schedule(loop: number, delayMs: number): void {
    if (loop !== this.loop) return; // stopped (or restarted) meanwhile, e.g. by a listener
    this.timer = setTimeout(() => void this.beat(loop), delayMs);
    this.timer.unref();
  }

  private async beat(loop: number): Promise<void> {
    let res: ApiResponse<HeartbeatAnswer>;
    try {
      res = await this.call<HeartbeatAnswer>("POST", `${this.path()}/heartbeat`, { activity: this.activity });
    } catch (err) {
      // Transport failure: the daemon is restarting, or the socket is gone for a while.
      if (loop === this.loop) this.retry(loop, err instanceof Error ? err : new Error(String(err)));
      return;
    }
    if (loop !== this.loop) return;
    if (res.status === 200) {
      this.failures = 0;
      const w = res.body.warning;
      this.emit("heartbeat", res.body);
      if (w !== null && w !== undefined && w.at !== this.warnedAt && loop === this.loop) {
        this.warnedAt = w.at; // told once: marked as it is emitted, never before
        this.emit("warning", w);
      }
      this.schedule(loop, this.nextInterval());
    } else if (res.status >= 500) {
      this.retry(loop, ReaperApiError.from(res)); // e.g. 503 while the daemon closes
    } else {
      // 409 fenced, 410 gone, 404 unknown: no later heartbeat can succeed. Stop before telling.
      this.stop();
      this.emit("fenced", ReaperApiError.from(res));
    }
  }

  private retry(loop: number, error: Error): void {
    this.failures++;
    const delayMs = jitter(Math.min(this.backoffMaxMs, this.backoffInitialMs * 2 ** (this.failures - 1)));
    this.emit("retrying", { attempt: this.failures, delayMs, error });
    this.schedule(loop, delayMs);
  }
}
