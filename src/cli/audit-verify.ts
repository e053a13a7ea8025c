/**
 * `reaperctl audit verify [LOG]`: proves from an audit trail (the daemon's JSON lines, from a
 * file or journald through stdin) that every session that left `live` reached
 * `reap.finished`, and cross-checks each session it names against the daemon's own events
 * when the daemon answers. Problems are listed, never fatal: the verifier reads everything.
 * Lines the daemon could not write (a full disk) are accounted for by its `daemon.lines_dropped`
 * events, which name each audit line dropped: a named line counts as if it were there.
 */
import { open } from "node:fs/promises";
import { createInterface } from "node:readline";
import type { Readable } from "node:stream";
import { AUDIT_EVENTS } from "../audit/audit.js";
import { ReaperError } from "../errors.js";
import { EXIT, UsageError, type Context } from "./command.js";
import { table } from "./format.js";

/** The events that take a session out of `live` (and session.damaged with action "quarantined"). */
const LEAVING_LIVE = new Set(["session.closed", "session.expired", "reap.started"]);
const KNOWN = new Set<string>(AUDIT_EVENTS);

/** session.damaged's `action` when the session's engine cannot be identified: it left live, for an operator. */
const QUARANTINED = "quarantined";

interface SessionTrail {
  id: string;
  leftLive: boolean;
  finished: boolean;
  reason: string | null;
  outcome: string | null;
  lastEvent: string;
  lastLine: number;
  /** From session.registered: whether it got a cgroup (null: not in this log, or older). */
  contained: boolean | null;
  /** reap.finished's `verified` (null: a line from before the verification pass). */
  verified: string[] | null;
  /** reap.finished's `tracking` (null: a line from before tracking was recorded). */
  tracking: string | null;
  /** Columns session.damaged named (a damaged row), in order; empty when none. */
  damaged: string[];
  /** A session.damaged said "quarantined": its engine cannot be identified. */
  quarantined: boolean;
}

/** What a `clean` must have been verified by, given the session's containment. */
const MUST_VERIFY = ["tree", "cookie", "ports", "paths", "ipc"];

/** What one pass over the lines found. */
export interface Trail {
  lines: number;
  /** JSON lines without an `event` (operational pino lines: "signal sent", …): skipped. */
  nonAudit: number;
  /** Events that concern no session: daemon.*, store.purged, and orphan.found in report mode. */
  daemonEvents: number;
  malformed: { line: number; text: string }[];
  unknown: { line: number; event: string; sessionId: string | null }[];
  sessions: Map<string, SessionTrail>;
  /** What the daemon.lines_dropped events say was dropped (summed over them). */
  dropped: DroppedTotals;
}

/**
 * Lines the daemon could not write to this log (a full disk), by its `daemon.lines_dropped`
 * events: `records` such events, `lines` dropped (operational and audit), `auditLines` among
 * them, `unnamed` audit lines no event names (the daemon keeps at most 10,000 names).
 */
export interface DroppedTotals {
  records: number;
  lines: number;
  auditLines: number;
  unnamed: number;
}

export function newTrail(): Trail {
  return {
    lines: 0,
    nonAudit: 0,
    daemonEvents: 0,
    malformed: [],
    unknown: [],
    sessions: new Map(),
    dropped: { records: 0, lines: 0, auditLines: 0, unnamed: 0 },
  };
}

/**
 * Adds one line. Lines may carry a prefix before the JSON (journalctl's default output,
 * "Nov 22 06:46:41 host node[42]: {…}"), which is skipped; blank lines and npm's banner are
 * ignored.
 */
export function addLine(trail: Trail, text: string): void {
  const line = ++trail.lines;
  const trimmed = text.trim();
  if (trimmed === "") return;
  // npm's banner when the daemon runs as `npm start` ("> session-reaper@0.1.0 start", then
  // "> node dist/src/main.js"): not the daemon's, and never a piece of a JSON line.
  if (trimmed.startsWith("> ") && !trimmed.includes("{")) {
    trail.nonAudit++;
    return;
  }
  const malformed = (): void => void trail.malformed.push({ line, text: trimmed.slice(0, 80) });
  const start = trimmed.indexOf("{");
  let parsed: unknown;
  try {
    parsed = start < 0 ? undefined : JSON.parse(trimmed.slice(start));
  } catch {
    parsed = undefined;
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) return malformed();
  const rec = parsed as Record<string, unknown>;
  if (rec.event === undefined) {
    // An audit line always names its event; an operational line never does.
    if (rec.audit === true) return malformed();
    trail.nonAudit++;
    return;
  }
  if (typeof rec.event !== "string") return malformed();
  if (rec.event === "daemon.lines_dropped") addDropped(trail, line, rec.detail);
  addEvent(trail, line, rec.event, rec, malformed);
}

/** One audit event (a line, or a line a daemon.lines_dropped names) into the trail. */
function addEvent(
  trail: Trail,
  line: number,
  event: string,
  rec: Record<string, unknown>,
  malformed: () => void,
): void {
  const sessionId = typeof rec.sessionId === "string" ? rec.sessionId : null;
  if (!KNOWN.has(event)) {
    trail.unknown.push({ line, event: event.slice(0, 80), sessionId });
    return;
  }
  // A report-mode orphan.found concerns a process or path, not a session; in reap mode it
  // names the session it became, and counts in that session's trail.
  // store.purged (retention) names counts and a time range, no session: the sessions it
  // removed are asked of the daemon, which answers their tombstones (410).
  if (event.startsWith("daemon.") || event.startsWith("store.") || (event === "orphan.found" && sessionId === null)) {
    trail.daemonEvents++;
    return;
  }
  if (sessionId === null) return malformed(); // a session event must say which session
  let s = trail.sessions.get(sessionId);
  if (s === undefined) {
    s = {
      id: sessionId,
      leftLive: false,
      finished: false,
      reason: null,
      outcome: null,
      lastEvent: "",
      lastLine: 0,
      contained: null,
      verified: null,
      tracking: null,
      damaged: [],
      quarantined: false,
    };
    trail.sessions.set(sessionId, s);
  }
  s.lastEvent = event;
  s.lastLine = line;
  if (typeof rec.reason === "string") s.reason = rec.reason;
  if (LEAVING_LIVE.has(event)) s.leftLive = true;
  const detail = (rec.detail ?? {}) as {
    containment?: { kind?: unknown };
    verified?: unknown;
    tracking?: unknown;
    damage?: unknown;
    action?: unknown;
  };
  if (event === "session.damaged") {
    for (const d of Array.isArray(detail.damage) ? detail.damage : []) {
      const column = (d as { table?: unknown; column?: unknown } | null)?.column;
      const table = (d as { table?: unknown } | null)?.table;
      const name = typeof table === "string" && typeof column === "string" ? `${table}.${column}` : "?";
      if (!s.damaged.includes(name)) s.damaged.push(name);
    }
    if (detail.action === QUARANTINED) {
      s.quarantined = true;
      s.leftLive = true;
    }
  }
  if (event === "session.registered" && detail.containment !== undefined) {
    s.contained = detail.containment?.kind === "cgroup";
  }
  if (event === "reap.finished") {
    s.finished = true;
    s.outcome = typeof rec.outcome === "string" ? rec.outcome : null;
    s.verified = Array.isArray(detail.verified) ? detail.verified.filter((v) => typeof v === "string") : null;
    s.tracking = typeof detail.tracking === "string" ? detail.tracking : null;
  }
  // A reap that left unkillable processes, resolved once they were gone: its outcome and the
  // checks that back it are the resolution's from then on (its end is still reap.finished).
  if (event === "reap.resolved" && s.finished) {
    s.outcome = typeof rec.outcome === "string" ? rec.outcome : s.outcome;
    s.verified = Array.isArray(detail.verified) ? detail.verified.filter((v) => typeof v === "string") : s.verified;
  }
}

/**
 * A daemon.lines_dropped: its counts are summed, and each audit line it names counts as if it
 * were in the log (by event and session: a named reap.finished has no outcome, so it is not
 * judged as clean). A detail of another shape is malformed.
 */
function addDropped(trail: Trail, line: number, detail: unknown): void {
  const d = detail as { lines?: unknown; auditLines?: unknown; unnamed?: unknown; events?: unknown } | null;
  const count = (v: unknown): number | null => (Number.isSafeInteger(v) && (v as number) >= 0 ? (v as number) : null);
  const [lines, auditLines, unnamed] = [count(d?.lines), count(d?.auditLines), count(d?.unnamed)];
  const malformed = (): void =>
    void trail.malformed.push({ line, text: `daemon.lines_dropped: ${JSON.stringify(detail)}`.slice(0, 80) });
  if (lines === null || auditLines === null || unnamed === null || !Array.isArray(d?.events)) return malformed();
  trail.dropped.records++;
  trail.dropped.lines += lines;
  trail.dropped.auditLines += auditLines;
  trail.dropped.unnamed += unnamed;
  for (const named of d.events as unknown[]) {
    const n = named as { event?: unknown; sessionId?: unknown } | null;
    if (typeof n?.event !== "string") {
      malformed();
      continue;
    }
    addEvent(
      trail,
      line,
      n.event,
      { event: n.event, ...(typeof n.sessionId === "string" ? { sessionId: n.sessionId } : {}) },
      malformed,
    );
  }
}

export async function readTrail(input: Readable): Promise<Trail> {
  const trail = newTrail();
  for await (const text of createInterface({ input, crlfDelay: Infinity })) addLine(trail, text);
  return trail;
}

/**
 * What the daemon's events say about one session; `known: false` when it answers 404;
 * `purged` when it answers 410 (reaped, its record purged by retention: only its tombstone is left).
 */
export type DaemonView =
  { known: false } | { known: true; leftLive: boolean; finished: boolean; quarantined?: boolean; purged?: boolean };

export type DaemonCheck =
  | { status: "checked"; socket: string; sessions: number }
  | { status: "unreachable"; socket: string; message: string }
  | { status: "skipped" };

export interface VerifyReport {
  complete: boolean;
  source: string;
  lines: number;
  nonAudit: number;
  sessions: { seen: number; live: number; reaped: number; missing: number };
  /**
   * Left live with a reap.finished in neither the log nor the daemon's events (a session
   * quarantined for a damaged row, its engine unidentified, counts here until an operator
   * closes or force-reaps it).
   */
  missing: { sessionId: string; reason: string | null; lastEvent: string; line: number; daemon: string }[];
  /**
   * Sessions whose stored row was found damaged (session.damaged): the columns named, whether
   * the session was quarantined, whether it reached reap.finished. Listed; a quarantined one not
   * finished is also missing.
   */
  damaged: { sessionId: string; columns: string[]; quarantined: boolean; finished: boolean }[];
  /** The log and the daemon disagree about a session's end. */
  mismatches: { sessionId: string; detail: string }[];
  /**
   * Sessions reaped `clean` whose clean was verified by less than their containment allowed
   * (no `cgroup` check for a contained session, a check missing, or none at all): listed, not
   * counted against `complete` (a trail from before the verification pass has none).
   */
  weaklyVerified: { sessionId: string; verified: string[] | null; missing: string[] }[];
  /**
   * Sessions reaped `clean` whose reap.finished says `tracking: "snapshots"`: their processes
   * were known from walks of /proc and the cookie only. Listed, not counted against `complete`.
   */
  snapshotsOnlyCleanReaps: { count: number; sessions: string[] };
  /** Sessions reaped `clean` whose reap.finished has no `tracking` (older builds): not counted as snapshots. */
  trackingUnknownCleanReaps: { count: number; sessions: string[] };
  malformed: { line: number; text: string }[];
  unknown: { line: number; event: string; sessionId: string | null }[];
  /**
   * Lines the daemon could not write (daemon.lines_dropped): named audit lines are counted in
   * the sessions above; `unnamed` ones make the log incomplete (the daemon's SQLite rows hold them).
   */
  droppedLines: DroppedTotals;
  daemon: DaemonCheck;
}

export function verifyTrail(
  trail: Trail,
  source: string,
  daemon: DaemonCheck,
  views: ReadonlyMap<string, DaemonView>,
): VerifyReport {
  const missing: VerifyReport["missing"] = [];
  const mismatches: VerifyReport["mismatches"] = [];
  const weaklyVerified: VerifyReport["weaklyVerified"] = [];
  const snapshotsOnly: string[] = [];
  const trackingUnknown: string[] = [];
  const damaged: VerifyReport["damaged"] = [];
  let live = 0;
  let reaped = 0;
  for (const s of trail.sessions.values()) {
    const v = views.get(s.id);
    const daemonLeft = v?.known === true && v.leftLive;
    const daemonFinished = v?.known === true && v.finished;
    if (s.damaged.length > 0 || s.quarantined || (v?.known === true && v.quarantined === true)) {
      damaged.push({
        sessionId: s.id,
        columns: s.damaged,
        quarantined: s.quarantined || (v?.known === true && v.quarantined === true),
        finished: s.finished || daemonFinished,
      });
    }
    if (s.finished || daemonFinished) reaped++;
    else if (s.leftLive || daemonLeft) {
      missing.push({
        sessionId: s.id,
        reason: s.reason,
        lastEvent: s.lastEvent,
        line: s.lastLine,
        daemon:
          v === undefined
            ? "not checked"
            : !v.known
              ? "unknown session"
              : v.quarantined === true && v.leftLive
                ? "damaged: quarantined (its engine cannot be identified), awaiting an operator's close or force-reap"
                : v.leftLive
                  ? "no reap.finished either (still reaping?)"
                  : "live",
      });
    } else live++;
    if (s.finished && s.outcome === "clean") {
      const must = s.contained === true ? ["cgroup", ...MUST_VERIFY] : MUST_VERIFY;
      const lacking = must.filter((m) => !(s.verified ?? []).includes(m));
      if (lacking.length > 0) weaklyVerified.push({ sessionId: s.id, verified: s.verified, missing: lacking });
      if (s.tracking === "snapshots") snapshotsOnly.push(s.id);
      else if (s.tracking === null) trackingUnknown.push(s.id);
    }
    if (v === undefined) continue;
    if (s.finished && !v.known) mismatches.push({ sessionId: s.id, detail: "the daemon does not know this session" });
    else if (s.finished && !daemonFinished)
      mismatches.push({ sessionId: s.id, detail: "the daemon's events hold no reap.finished" });
    else if (s.leftLive && !s.finished && daemonFinished)
      mismatches.push({ sessionId: s.id, detail: "the log lacks the reap.finished the daemon holds" });
  }
  return {
    complete:
      missing.length + mismatches.length + trail.malformed.length + trail.unknown.length + trail.dropped.unnamed === 0,
    source,
    lines: trail.lines,
    nonAudit: trail.nonAudit,
    sessions: { seen: trail.sessions.size, live, reaped, missing: missing.length },
    missing,
    damaged,
    mismatches,
    weaklyVerified,
    snapshotsOnlyCleanReaps: { count: snapshotsOnly.length, sessions: snapshotsOnly },
    trackingUnknownCleanReaps: { count: trackingUnknown.length, sessions: trackingUnknown },
    malformed: trail.malformed,
    unknown: trail.unknown,
    droppedLines: { ...trail.dropped },
    daemon,
  };
}

/** The daemon's view of each session, 8 requests at a time; throws when it cannot be reached. */
async function askDaemon(ctx: Context, ids: string[]): Promise<Map<string, DaemonView>> {
  const views = new Map<string, DaemonView>();
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < ids.length) {
      const id = ids[next++] as string;
      const res = await ctx.api<{ events: { event: string; detail: { action?: unknown } | null }[] }>(
        "GET",
        `/v1/sessions/${encodeURIComponent(id)}/events`,
      );
      if (res.status === 200) {
        const names = res.body.events.map((e) => e.event);
        const quarantined = res.body.events.some(
          (e) => e.event === "session.damaged" && e.detail?.action === QUARANTINED,
        );
        views.set(id, {
          known: true,
          leftLive: quarantined || names.some((n) => LEAVING_LIVE.has(n)),
          finished: names.includes("reap.finished"),
          quarantined,
        });
      } else if (res.status === 410) {
        // Reaped, and its record purged since (retention): its tombstone stands for its events.
        views.set(id, { known: true, leftLive: true, finished: true, purged: true });
      } else if (res.status === 404 || res.status === 400) {
        views.set(id, { known: false }); // 400: not even a valid session id
      } else {
        throw new Error(`GET /v1/sessions/${id}/events answered HTTP ${res.status}`);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(8, ids.length) }, worker));
  return views;
}

export async function auditVerify(ctx: Context, stdin: Readable & { isTTY?: boolean }): Promise<number> {
  if (ctx.args.length > 1) throw new UsageError("audit verify takes at most one LOG file");
  const file = ctx.args[0];
  const fromStdin = file === undefined || file === "-";
  if (fromStdin && stdin.isTTY) {
    throw new UsageError("give a LOG file, or pipe the audit lines in (journalctl -o cat -u session-reaper | …)");
  }
  let trail: Trail;
  try {
    // Opened first, so that a missing file is an error here, not inside the line reader.
    trail = await readTrail(fromStdin ? stdin : (await open(file)).createReadStream());
  } catch (err) {
    ctx.note(`cannot read ${file ?? "stdin"}: ${(err as Error).message}`);
    return EXIT.error;
  }

  let daemon: DaemonCheck = { status: "skipped" };
  let views = new Map<string, DaemonView>();
  if (ctx.values.offline !== true) {
    try {
      await ctx.api("GET", "/v1/daemon"); // reachable at all?
      views = await askDaemon(ctx, [...trail.sessions.keys()]);
      daemon = { status: "checked", socket: ctx.socket, sessions: views.size };
    } catch (err) {
      views = new Map();
      const message =
        err instanceof ReaperError && err.code === "SR_DAEMON_UNREACHABLE"
          ? `cannot reach the daemon at ${ctx.socket}`
          : (err as Error).message;
      daemon = { status: "unreachable", socket: ctx.socket, message };
    }
  }
  const report = verifyTrail(trail, fromStdin ? "stdin" : file, daemon, views);
  ctx.out(ctx.json ? JSON.stringify(report, null, 2) + "\n" : renderReport(report));
  return report.complete ? EXIT.ok : EXIT.auditIncomplete;
}

export function renderReport(r: VerifyReport): string {
  const daemon =
    r.daemon.status === "checked"
      ? `${r.daemon.sessions} sessions cross-checked with the daemon at ${r.daemon.socket}`
      : r.daemon.status === "unreachable"
        ? `not cross-checked: ${r.daemon.message}; the log was verified alone`
        : "not cross-checked (--offline)";
  let text = table([
    ["source", `${r.source} (${r.lines} lines; ${r.nonAudit} non-audit lines skipped)`],
    ["sessions seen", String(r.sessions.seen)],
    ["reaped", String(r.sessions.reaped)],
    ["still live", String(r.sessions.live)],
    ["missing reap.finished", String(r.sessions.missing)],
    ["damaged rows", String(r.damaged.length)],
    ["log/daemon mismatches", String(r.mismatches.length)],
    ["clean, weakly verified", String(r.weaklyVerified.length)],
    ["clean, snapshots only", String(r.snapshotsOnlyCleanReaps.count)],
    [
      "clean, tracking unknown",
      r.trackingUnknownCleanReaps.count === 0
        ? "0"
        : `${r.trackingUnknownCleanReaps.count} (reap.finished from an older build, without tracking)`,
    ],
    ["malformed lines", String(r.malformed.length)],
    ["unknown events", String(r.unknown.length)],
    ["dropped lines", droppedRow(r.droppedLines)],
    ["daemon", daemon],
    ["result", r.complete ? "complete" : "INCOMPLETE"],
  ]);
  if (r.missing.length > 0) {
    text +=
      "\nSessions that left live without reap.finished:\n" +
      table(
        [
          ["SESSION", "REASON", "LAST EVENT", "LINE", "DAEMON"],
          ...r.missing.map((m) => [m.sessionId, m.reason ?? "-", m.lastEvent, String(m.line), m.daemon]),
        ],
        true,
      );
  }
  if (r.damaged.length > 0) {
    text +=
      "\nSessions whose stored row is damaged (reaperctl show ID names each value):\n" +
      table(
        [
          ["SESSION", "DAMAGED", "ENGINE", "REAP.FINISHED"],
          ...r.damaged.map((d) => [
            d.sessionId,
            d.columns.join(",") || "-",
            d.quarantined ? "unidentified: quarantined" : "identified",
            d.finished ? "yes" : "no",
          ]),
        ],
        true,
      );
  }
  if (r.mismatches.length > 0) {
    text +=
      "\nLog and daemon disagree:\n" +
      table([["SESSION", "DETAIL"], ...r.mismatches.map((m) => [m.sessionId, m.detail])], true);
  }
  if (r.weaklyVerified.length > 0) {
    text +=
      "\nClean, but verified by less than the session's containment allowed:\n" +
      table(
        [
          ["SESSION", "VERIFIED", "NOT VERIFIED"],
          ...r.weaklyVerified.map((w) => [w.sessionId, (w.verified ?? ["(none)"]).join(","), w.missing.join(",")]),
        ],
        true,
      );
  }
  if (r.snapshotsOnlyCleanReaps.count > 0) {
    text +=
      `\nClean, but tracked by snapshots only: ${r.snapshotsOnlyCleanReaps.count}. Their clean is only as good as walks of /proc:\n` +
      "a process born and re-parented between two walks, carrying no cookie, could have been missed.\n" +
      idList(r.snapshotsOnlyCleanReaps.sessions);
  }
  if (r.malformed.length > 0) {
    text +=
      "\nMalformed lines:\n" + table([["LINE", "TEXT"], ...r.malformed.map((m) => [String(m.line), m.text])], true);
  }
  if (r.droppedLines.unnamed > 0) {
    text +=
      `\n${r.droppedLines.unnamed} audit lines were dropped with no name kept: this log cannot account for them.\n` +
      "The daemon's database holds every event (reaperctl events ID).\n";
  }
  if (r.unknown.length > 0) {
    text +=
      "\nUnknown events:\n" +
      table(
        [["LINE", "EVENT", "SESSION"], ...r.unknown.map((u) => [String(u.line), u.event, u.sessionId ?? "-"])],
        true,
      );
  }
  return text;
}

/** The "dropped lines" row: what the daemon could not write to this log, and how it is accounted for. */
function droppedRow(d: DroppedTotals): string {
  if (d.records === 0) return "0";
  const unnamed = d.unnamed > 0 ? `, ${d.unnamed} of them UNNAMED` : "";
  return `${d.lines} (log full; ${d.auditLines} audit lines named by ${d.records} daemon.lines_dropped${unnamed})`;
}

/** How many ids a human report lists before "and N more" (--json lists them all). */
export const LISTED_IDS = 20;

/** The first LISTED_IDS ids, comma-separated in lines of at most ~100 columns, then "and N more". */
function idList(ids: readonly string[]): string {
  const lines: string[] = [];
  let line = "";
  for (const [i, id] of ids.slice(0, LISTED_IDS).entries()) {
    const item = i < Math.min(ids.length, LISTED_IDS) - 1 ? `${id},` : id;
    if (line !== "" && line.length + 1 + item.length > 98) {
      lines.push(line);
      line = "";
    }
    line += (line === "" ? "" : " ") + item;
  }
  if (line !== "") lines.push(line);
  if (ids.length > LISTED_IDS) lines.push(`and ${ids.length - LISTED_IDS} more (--json lists them all)`);
  return lines.map((l) => `  ${l}\n`).join("");
}
