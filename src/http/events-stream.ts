/**
 * GET /v1/events: the audit trail as a stream of NDJSON lines, one audit event per line (the
 * objects GET /v1/sessions/{id}/events answers, with their `seq`). First the backlog, read
 * from SQLite a page at a time; then, with `follow=1`, each event as it is committed, from
 * AuditTrail's `audit` emitter (published after commit, so a line never announces a decision
 * the database does not hold).
 *
 * The handoff has no gap and no duplicate: a follower is subscribed before the first page is
 * read, the live events it is told of meanwhile are held, and once the backlog has caught up
 * they are written if their seq is above the last one the backlog read. seq is audit_events'
 * AUTOINCREMENT, given in commit order, so a client that reconnects with `since` = the last
 * seq it saw resumes exactly where it stopped.
 *
 * What a caller sees: an admin every event; a non-admin only the events of the sessions it
 * registered (as src/auth/policy.ts `checkActor` decides who may act on one), never the
 * daemon's own (no session). The backlog joins each row's registering uid in SQL; a live
 * event's is remembered per session (from its session.registered, else one lookup), so a
 * follower costs no SQLite read per event.
 *
 * Memory is bounded per stream: the backlog waits for the socket to drain between lines, at
 * most MAX_HELD_EVENTS live events are held while it pages, and a follower whose unsent bytes
 * pass MAX_UNSENT_BYTES is disconnected: a reader that falls that far behind reconnects with
 * `since`. A quiet follower gets an empty line every KEEP_ALIVE_MS (clients skip empty lines),
 * so that a client's idle timeout can tell a quiet daemon from a dead connection; the server's
 * own timeouts (headers, request, keep-alive) no longer apply once the request is read.
 *
 * Both are contracts, not settings: the client library's idle timeout (45 s) is three
 * keep-alive periods, and SECURITY.md bounds one uid's unsent lines by MAX_UNSENT_BYTES ×
 * MAX_STREAMS_PER_UID. Tests shorten them (DaemonOptions.eventStreams), never the config file.
 * Open streams are the session_reaper_event_streams gauge; those the daemon ends before their
 * reader is done, session_reaper_event_streams_cut_total by reason.
 */
import type { ServerResponse } from "node:http";
import { performance } from "node:perf_hooks";
import type { FastifyInstance } from "fastify";
import type { Logger } from "pino";
import type { AuditTrail, RecordedAuditEvent } from "../audit/audit.js";
import type { Caller, Callers } from "../auth/caller.js";
import { ReaperError } from "../errors.js";
import { loopTurn } from "../pace/turns.js";
import type { EventStreamCut, Metrics } from "../metrics/metrics.js";
import type { Sessions } from "../sessions/sessions.js";
import type { EventFilter, EventPage, Store } from "../store/store.js";
import { eventJson } from "./present.js";
import { eventStreamLine, eventStreamQuery } from "./schemas.js";

/** Rows of audit_events read per turn of the event loop (a millisecond or two). */
const PAGE_ROWS = 500;
/** Live events held for a follower while its backlog pages: past this, it is disconnected. */
const MAX_HELD_EVENTS = 10_000;
/** Bytes written to a follower and not yet taken by its socket: past this, it is disconnected. */
const MAX_UNSENT_BYTES = 4 * 1024 * 1024;
/** Event streams one non-admin uid may hold open at once (each may hold MAX_UNSENT_BYTES): 32 MiB at most. */
const MAX_STREAMS_PER_UID = 8;
/** A follower with nothing to read for this long gets an empty line (checked every third of it). */
const KEEP_ALIVE_MS = 15_000;
/** Sessions whose registering uid is remembered (live ones, mostly); past this, forgotten at once. */
const UIDS_REMEMBERED = 100_000;
/** At most one warning per this many ms about readers disconnected for falling behind. */
const WARN_EVERY_MS = 60_000;

export const NDJSON = "application/x-ndjson";
/** The seq the stream starts after (the `since` it was given, or where it chose to start). */
export const EVENTS_AFTER_HEADER = "reaper-events-after";

export interface EventStreamQuery {
  follow: 0 | 1;
  session?: string;
  since?: number;
}

/** KEEP_ALIVE_MS and MAX_UNSENT_BYTES, shortened by tests only (DaemonOptions.eventStreams). */
export interface EventStreamLimits {
  readonly keepAliveMs: number;
  readonly maxUnsentBytes: number;
}

export interface EventStreamDeps {
  store: Pick<Store, "eventsAfter" | "lastEventSeq" | "purgedThroughSeq" | "registeredByUid">;
  sessions: Pick<Sessions, "get">;
  audit: Pick<AuditTrail, "events">;
  callers: Pick<Callers, "of">;
  metrics: Pick<Metrics, "countEventStreams" | "eventStreamCut">;
  log: Logger;
  /** Default: KEEP_ALIVE_MS and MAX_UNSENT_BYTES. */
  eventStreams?: Partial<EventStreamLimits> | undefined;
}

/** Which events a stream shows. */
interface Filter {
  /** Only this session's (the caller may see it: checked when the stream opened). */
  readonly session: string | undefined;
  /** A non-admin's uid: only events of sessions it registered; null for an admin: every event. */
  readonly uid: number | null;
}

/** A stream the request may have: what it shows, and where it starts. */
interface Opening {
  readonly filter: Filter;
  /** The reader's uid (an admin's too; null over TCP), for the log. */
  readonly uid: number | null;
  readonly follow: boolean;
  readonly after: number;
}

/** The GET /v1/events route, and the end of every open stream when the server closes. */
export function eventStreamRoutes(app: FastifyInstance, deps: EventStreamDeps): void {
  const hub = new EventHub(deps);
  // fastify closes its server after these hooks: open streams would hold it open.
  app.addHook("preClose", (done) => {
    hub.closeAll();
    done();
  });
  app.get<{ Querystring: EventStreamQuery }>(
    "/v1/events",
    {
      schema: {
        summary: "The audit events as NDJSON, oldest first; with follow=1, then each new one as it is committed",
        description:
          "One JSON object per line. An admin sees every event; a non-admin only those of the sessions it registered. " +
          "Resume with since = the last seq seen (no gap, no duplicate); a since below what retention purged answers 410 SR_EVENTS_PURGED.",
        querystring: eventStreamQuery,
        response: {
          200: {
            description: `The events, one per line (${NDJSON}); the ${EVENTS_AFTER_HEADER} header is the seq they follow`,
            content: { [NDJSON]: { schema: eventStreamLine } },
          },
        },
      },
    },
    async (req, reply) => {
      // open() and serve() run in one turn: no event is committed between the start chosen and the subscription.
      const opening = hub.open(deps.callers.of(req.raw.socket), req.query);
      const headers = {
        "content-type": NDJSON,
        "cache-control": "no-store",
        [EVENTS_AFTER_HEADER]: String(opening.after),
      };
      if (req.method === "HEAD") return reply.headers(headers).send();
      reply.hijack();
      await hub.serve(reply.raw, opening, headers);
      return reply;
    },
  );
}

/** Resolves once the response can take more (or is closed). */
function drained(res: ServerResponse): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      res.off("drain", done);
      res.off("close", done);
      resolve();
    };
    res.on("drain", done);
    res.on("close", done);
  });
}

/** A live event as its line: eventJson's shape, with seq null for an event that could not be stored. */
function liveLine(e: RecordedAuditEvent): string {
  return (
    JSON.stringify({
      seq: e.seq ?? null,
      time: new Date(e.at).toISOString(),
      event: e.event,
      sessionId: e.sessionId ?? null,
      reason: e.reason ?? null,
      step: e.step ?? null,
      outcome: e.outcome ?? null,
      durationMs: e.durationMs ?? null,
      detail: e.detail ?? null,
    }) + "\n"
  );
}

/** One response being written: its backlog, then (following) the live events. */
class EventStream {
  /** The highest seq passed: written, or read by the backlog and not for this caller. */
  after: number;
  /** Live events held while the backlog pages; null once live. */
  private held: { seq: number | null; line: string }[] | null = [];
  closed = false;
  /** When the last line was written (monotonic ms). */
  private wroteAt = performance.now();
  readonly filter: Filter;
  readonly follow: boolean;

  constructor(
    readonly res: ServerResponse,
    readonly opening: Opening,
    private readonly limits: EventStreamLimits,
    private readonly tooSlow: (s: EventStream, why: string) => void,
  ) {
    this.filter = opening.filter;
    this.follow = opening.follow;
    this.after = opening.after;
    res.once("close", () => (this.closed = true));
    // A write to a connection the peer has just closed fails there; 'close' follows and ends the stream.
    res.on("error", () => undefined);
  }

  /** A live event this stream may show. */
  offer(seq: number | null, line: string): void {
    if (this.closed || !this.follow) return;
    if (this.held === null) this.write(seq, line);
    else if (this.held.length < MAX_HELD_EVENTS) this.held.push({ seq, line });
    else this.tooSlow(this, `${MAX_HELD_EVENTS} events held while its backlog was read`);
  }

  /** Writes a line unless its seq was passed already (an event of no seq: always). */
  write(seq: number | null, line: string): void {
    if (this.closed) return;
    if (seq !== null) {
      if (seq <= this.after) return;
      this.after = seq;
    }
    this.res.write(line);
    this.wroteAt = performance.now();
    if (this.res.writableLength > this.limits.maxUnsentBytes) {
      this.tooSlow(this, `more than ${this.limits.maxUnsentBytes} bytes unsent`);
    }
  }

  /** The backlog read up to `seq`: what it did not write was not for this caller. */
  passed(seq: number): void {
    if (seq > this.after) this.after = seq;
  }

  /** The backlog has caught up: the held events above it go out, and the next ones as they come. */
  goLive(): void {
    const held = this.held ?? [];
    this.held = null;
    for (const h of held) this.write(h.seq, h.line);
  }

  /** An empty line if nothing was written for KEEP_ALIVE_MS (live followers only). */
  keepAlive(now: number): void {
    if (this.closed || this.held !== null || !this.follow || now - this.wroteAt < this.limits.keepAliveMs) return;
    this.res.write("\n");
    this.wroteAt = now;
  }

  /** The stream is complete (a backlog's end), or the daemon closes its API: a clean end. */
  end(): void {
    if (this.closed) return;
    this.closed = true;
    this.res.end();
  }

  /** Cut off: the client sees a broken response, never a clean end, and resumes with since. */
  cut(): void {
    this.closed = true;
    this.res.destroy();
  }

  /** The daemon closes its API: a follower ends cleanly; a backlog cut short must not look complete. */
  close(): void {
    if (this.follow && !this.res.writableNeedDrain) this.end();
    else this.cut();
  }
}

/** Every open stream of the server, the one subscription to the audit trail they share, and the keep-alive timer. */
class EventHub {
  private readonly streams = new Set<EventStream>();
  /** Session id → the uid that registered it (null: an admin over TCP, or no such session). */
  private readonly uids = new Map<string, number | null>();
  private timer: NodeJS.Timeout | null = null;
  private lastWarning = Number.NEGATIVE_INFINITY;
  /** Readers cut for falling behind since the last warning (that warning's own excluded). */
  private unwarned = 0;
  private readonly limits: EventStreamLimits;

  constructor(private readonly deps: EventStreamDeps) {
    this.limits = {
      keepAliveMs: deps.eventStreams?.keepAliveMs ?? KEEP_ALIVE_MS,
      maxUnsentBytes: deps.eventStreams?.maxUnsentBytes ?? MAX_UNSENT_BYTES,
    };
    deps.metrics.countEventStreams(() => this.counts());
  }

  /** Open streams: following, or reading a backlog only (the gauge, at scrape time). */
  private counts(): { follow: number; backlog: number } {
    let follow = 0;
    for (const s of this.streams) if (s.follow) follow++;
    return { follow, backlog: this.streams.size - follow };
  }

  /**
   * What this caller may stream, or a 4xx: a session it may not see (403 SR_NOT_SESSION_OWNER),
   * or does not exist (404, 410); a since past the newest event (400) or below what retention
   * purged (410 SR_EVENTS_PURGED, with no session named: a session's events go only with it).
   */
  open(caller: Caller, q: EventStreamQuery): Opening {
    if (!caller.admin && caller.uid === null) {
      throw new ReaperError(
        "SR_CALLER_UNKNOWN",
        "the daemon could not read this connection's peer credentials (SO_PEERCRED): a non-admin sees only the events of the sessions it registered, and this caller's uid is unknown",
      );
    }
    if (q.session !== undefined) {
      const { registeredBy } = this.deps.sessions.get(q.session); // 404 unknown, 410 purged
      if (!caller.admin && registeredBy.uid !== caller.uid) {
        throw new ReaperError(
          "SR_NOT_SESSION_OWNER",
          `session "${q.session}" was registered by ${registeredBy.uid === null ? "an admin" : `uid ${registeredBy.uid}`}; uid ${caller.uid} may follow only the events of sessions it registered`,
        );
      }
    }
    if (!caller.admin) {
      // Each stream may hold MAX_UNSENT_BYTES: a uid's streams are capped, so that one local
      // user who never reads cannot make the daemon hold its connections' worth of buffers.
      let open = 0;
      for (const st of this.streams) if (st.filter.uid === caller.uid) open++;
      if (open >= MAX_STREAMS_PER_UID) {
        throw new ReaperError(
          "SR_TOO_MANY_STREAMS",
          `uid ${caller.uid} already has ${open} event streams open (at most ${MAX_STREAMS_PER_UID} per non-admin uid); close one first`,
          { open, max: MAX_STREAMS_PER_UID },
        );
      }
    }
    const last = this.deps.store.lastEventSeq();
    if (q.since !== undefined) this.checkSince(q.since, last, q.session);
    return {
      filter: { session: q.session, uid: caller.admin ? null : caller.uid },
      uid: caller.uid,
      follow: q.follow === 1,
      // Without since: a follower starts now, a reader of the backlog at the oldest event kept.
      after: q.since ?? (q.follow === 1 ? last : 0),
    };
  }

  private checkSince(since: number, last: number, session: string | undefined): void {
    if (since > last) {
      throw new ReaperError(
        "SR_BAD_REQUEST",
        `querystring.since: ${since} is past the newest event's seq (${last}): not a seq of this database`,
        { since, lastSeq: last },
      );
    }
    if (session !== undefined) return;
    const purged = this.deps.store.purgedThroughSeq();
    if (since < purged) {
      throw new ReaperError(
        "SR_EVENTS_PURGED",
        `events after seq ${since} may have been purged (store.retain_reaped_sec; seq ${purged} and below): resume with since=${purged} for the events kept after them`,
        { since, purgedThrough: purged },
      );
    }
  }

  /** Writes the stream: its backlog, then (following) the live events until either side closes it. */
  async serve(res: ServerResponse, o: Opening, headers: Record<string, string>): Promise<void> {
    // Gone while the request waited for its handler: its 'close' was emitted already.
    if (res.destroyed || res.socket === null || res.socket.destroyed) return;
    const s = new EventStream(res, o, this.limits, (stream, why) => this.tooSlow(stream, why));
    this.add(s);
    res.once("close", () => this.remove(s));
    // A follower's connection serves nothing after it: closed with the stream.
    res.writeHead(200, o.follow ? { ...headers, connection: "close" } : headers);
    res.flushHeaders();
    try {
      await this.backlog(s);
    } catch (err) {
      this.deps.log.warn({ err, uid: o.uid }, "an event stream's backlog could not be read: its connection was cut");
      this.cut(s, "store_error");
      return;
    }
    if (s.closed) return;
    if (o.follow) s.goLive();
    else s.end();
  }

  /** The rows after the stream's start, a page per turn, waiting for the socket to drain. */
  private async backlog(s: EventStream): Promise<void> {
    const { session, uid } = s.filter;
    // One session's (the caller's: checked at open), else an admin's all, else the caller's sessions'.
    const only: EventFilter | undefined =
      session !== undefined ? { sessionId: session } : uid === null ? undefined : { registeredBy: uid };
    for (;;) {
      const page: EventPage = this.deps.store.eventsAfter(s.after, PAGE_ROWS, only);
      for (const e of page.events) {
        if (s.closed) return;
        s.write(e.seq, JSON.stringify(eventJson(e)) + "\n");
        if (s.res.writableNeedDrain) await drained(s.res);
      }
      if (page.lastSeq !== null) s.passed(page.lastSeq);
      if (!page.full || s.closed) return;
      await loopTurn();
    }
  }

  private add(s: EventStream): void {
    if (this.streams.size === 0) {
      this.deps.audit.events.on("audit", this.onAudit);
      this.timer = setInterval(() => this.keepAlive(), this.limits.keepAliveMs / 3);
      this.timer.unref();
    }
    this.streams.add(s);
  }

  private remove(s: EventStream): void {
    if (!this.streams.delete(s) || this.streams.size > 0) return;
    this.deps.audit.events.off("audit", this.onAudit);
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
    this.uids.clear();
  }

  /** The daemon closes its API: every stream ends now (server.close() would wait for them). */
  closeAll(): void {
    for (const s of [...this.streams]) {
      if (s.closed) continue;
      this.deps.metrics.eventStreamCut("shutdown");
      s.close();
    }
  }

  /** Ends a stream its reader is not done with: a broken response, counted by why. */
  private cut(s: EventStream, reason: EventStreamCut): void {
    if (s.closed) return;
    this.deps.metrics.eventStreamCut(reason);
    s.cut();
  }

  private keepAlive(): void {
    const now = performance.now();
    for (const s of this.streams) s.keepAlive(now);
  }

  /** A committed event, to every stream that may show it: its line is made once. */
  private readonly onAudit = (e: RecordedAuditEvent): void => {
    if (e.event === "session.registered" && e.sessionId !== undefined) this.learn(e.sessionId, e.detail);
    let line: string | undefined;
    for (const s of this.streams) {
      if (s.closed || !s.follow) continue;
      try {
        if (!this.visible(s.filter, e)) continue;
      } catch (err) {
        // The registering uid could not be read (the store failed): this stream resumes later.
        this.deps.log.warn(
          { err, uid: s.opening.uid },
          "an event stream could not tell whose event it was: its connection was cut",
        );
        this.cut(s, "store_error");
        continue;
      }
      s.offer(e.seq ?? null, (line ??= liveLine(e)));
    }
    if (e.event === "reap.finished" && e.sessionId !== undefined) this.uids.delete(e.sessionId); // few events follow
  };

  private visible(f: Filter, e: RecordedAuditEvent): boolean {
    if (f.session !== undefined) return e.sessionId === f.session;
    if (f.uid === null) return true;
    return e.sessionId !== undefined && this.uidOf(e.sessionId) === f.uid;
  }

  /** A new session's registering uid, from its session.registered event (else it is looked up once). */
  private learn(id: string, detail: Record<string, unknown> | undefined): void {
    const uid = (detail?.registeredBy as { uid?: unknown } | undefined)?.uid;
    if (typeof uid === "number" || uid === null) this.remember(id, uid);
    else this.uids.delete(id);
  }

  private uidOf(id: string): number | null {
    const known = this.uids.get(id);
    if (known !== undefined) return known;
    const uid = this.deps.store.registeredByUid(id) ?? null;
    this.remember(id, uid);
    return uid;
  }

  private remember(id: string, uid: number | null): void {
    if (this.uids.size >= UIDS_REMEMBERED) this.uids.clear();
    this.uids.set(id, uid);
  }

  private tooSlow(s: EventStream, why: string): void {
    if (s.closed) return;
    // Read before the cut: destroy() drops what was buffered.
    const unsentBytes = s.res.writableLength;
    this.cut(s, "slow_reader");
    const now = performance.now();
    if (now - this.lastWarning < WARN_EVERY_MS) {
      this.unwarned++;
      return;
    }
    this.lastWarning = now;
    const alsoCut = this.unwarned;
    this.unwarned = 0;
    this.deps.log.warn(
      {
        uid: s.opening.uid,
        session: s.filter.session,
        unsentBytes,
        maxUnsentBytes: this.limits.maxUnsentBytes,
        why,
        // Readers cut for falling behind since the last such warning, not logged one by one.
        alsoCut,
      },
      "an event stream's reader fell behind: its connection was cut; it resumes with since= (logged at most once a minute)",
    );
  }
}
