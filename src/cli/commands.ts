/** The commands that read or act on the daemon's sessions: one API call (or page loop) each. */
import { ReaperApiError, streamEvents, type AuditEventLine, type ExtendAnswer, type Session } from "../client/index.js";
import { ReaperError, errorMessage } from "../errors.js";
import type { ExpiringJson, OrphanJson } from "../http/present.js";
import { SESSION_STATES } from "../model/session.js";
import { EXIT, UsageError, apiFailure, parseAdditions, stringOption, type Context } from "./command.js";
import { parseDuration, plural, relativeTime, table } from "./format.js";

function print(ctx: Context, value: unknown, human: () => string): void {
  ctx.out(ctx.json ? JSON.stringify(value, null, 2) + "\n" : human());
}

function sessionIdArg(ctx: Context, command: string): string {
  if (ctx.args.length !== 1) throw new UsageError(`${command} takes exactly one session id`);
  return encodeURIComponent(ctx.args[0] as string);
}

function noArgs(ctx: Context, command: string): void {
  if (ctx.args.length > 0) throw new UsageError(`${command} takes no arguments`);
}

export async function status(ctx: Context): Promise<number> {
  noArgs(ctx, "status");
  const res = await ctx.api<{ state: string; version: string; startedAt: string; counts: Record<string, number> }>(
    "GET",
    "/v1/daemon",
  );
  if (res.status !== 200) return apiFailure(ctx, res);
  const d = res.body;
  const now = Date.now();
  print(ctx, d, () =>
    table([
      ["state", d.state],
      ["version", d.version],
      ["started", `${d.startedAt} (${relativeTime(d.startedAt, now)})`],
      ["live", String(d.counts.live ?? 0)],
      ...((d.counts.damaged ?? 0) > 0
        ? [
            [
              "damaged",
              `${d.counts.damaged} (engine unidentified: close or force-reap; reaperctl list --state damaged)`,
            ],
          ]
        : []),
      ["reaping", String(d.counts.reaping ?? 0)],
      ["reaped", String(d.counts.reaped ?? 0)],
    ]),
  );
  return EXIT.ok;
}

const STATES: readonly string[] = SESSION_STATES;

export async function list(ctx: Context): Promise<number> {
  noArgs(ctx, "list");
  const state = stringOption(ctx.values, "state");
  if (state !== undefined && !STATES.includes(state)) {
    throw new UsageError(`--state: "${state}" is not a state; use one of ${STATES.join(", ")}`);
  }
  const limit = stringOption(ctx.values, "limit");
  if (limit !== undefined && (!/^\d{1,4}$/.test(limit) || Number(limit) < 1 || Number(limit) > 1000)) {
    throw new UsageError(`--limit: "${limit}" is not a number from 1 to 1000`);
  }
  const sessions: Session[] = [];
  const params = new URLSearchParams();
  for (const key of ["state", "profile", "owner", "limit"]) {
    const v = stringOption(ctx.values, key);
    if (v !== undefined) params.set(key, v);
  }
  const limited = params.has("limit");
  let cursor: string | null = null;
  do {
    if (cursor !== null) params.set("cursor", cursor);
    const res = await ctx.api<{ sessions: Session[]; next: string | null }>("GET", `/v1/sessions?${params.toString()}`);
    if (res.status !== 200) return apiFailure(ctx, res);
    sessions.push(...res.body.sessions);
    cursor = limited ? null : res.body.next;
  } while (cursor !== null);
  const now = Date.now();
  print(ctx, { sessions }, () =>
    table(
      [
        ["ID", "STATE", "PROFILE", "OWNER", "PID", "CREATED", "EXPIRES / REASON"],
        ...sessions.map((s) => [
          s.id,
          // A damaged row shows as such whatever its state: "live, damaged: paths".
          s.damage.length > 0 && s.state !== "damaged"
            ? `${s.state}, damaged: ${[...new Set(s.damage.map((d) => d.column))].join(",")}`
            : s.state,
          s.profile,
          s.owner ?? "-",
          String(s.engine.pid),
          s.createdAt ? relativeTime(s.createdAt, now) : "-",
          s.state === "live" && s.deadline
            ? relativeTime(s.deadline, now)
            : `${s.reason ?? ""}${s.outcome ? ` (${s.outcome})` : ""}`,
        ]),
      ],
      true,
    ),
  );
  return EXIT.ok;
}

export async function show(ctx: Context): Promise<number> {
  const res = await ctx.api<Session>("GET", `/v1/sessions/${sessionIdArg(ctx, "show")}`);
  if (res.status !== 200) return apiFailure(ctx, res);
  const s = res.body;
  print(ctx, s, () => showSession(s, Date.now()));
  return EXIT.ok;
}

function showSession(s: Session, now: number): string {
  const when = (iso: string | null): string => (iso ? `${iso} (${relativeTime(iso, now)})` : "-");
  const rows: string[][] = [
    ["id", s.id],
    ["state", s.state + (s.reason ? ` (${s.reason})` : "")],
    ["outcome", s.outcome ?? "-"],
    ["profile", s.profile],
    ["owner", s.owner ?? "-"],
    ["engine pid", `${s.engine.pid} (uid ${s.engine.uid})`],
    [
      "registered by",
      s.registeredBy.via === "tcp"
        ? "loopback TCP (token)"
        : `${s.registeredBy.uid === null ? "unknown uid" : `uid ${s.registeredBy.uid}`}${s.registeredBy.admin ? " (admin)" : ""}`,
    ],
    ["created", when(s.createdAt)],
    ["last heartbeat", when(s.lastHeartbeatAt)],
    ["deadline", when(s.deadline)],
    ...(s.extendedUntil ? [["extended until", when(s.extendedUntil)]] : []),
    ...(s.warning
      ? [["warning", `${s.warning.reason}: reaped ${when(s.warning.deadline)} unless active or extended first`]]
      : []),
    ["ports", s.ports.join(", ") || "-"],
    ["paths", s.paths.join(", ") || "-"],
    [
      "labels",
      Object.entries(s.labels)
        .map(([k, v]) => `${k}=${v}`)
        .join(", ") || "-",
    ],
  ];
  const u = s.usage;
  if (u && "cpu" in u) rows.push(["usage", `cpu ${u.cpu.toFixed(1)}%, memory ${(u.memory / 1048576).toFixed(1)} MiB`]);
  else if (u)
    rows.push([
      "used",
      `${u.cpuSec.toFixed(1)} CPU s, peak ${(u.peakMemoryBytes / 1048576).toFixed(1)} MiB (${u.peakMemorySource}), ${plural(u.peakProcesses, "process", "processes")} at most, lived ${u.lifetimeSec.toFixed(0)} s`,
    ]);
  if (s.containment)
    rows.push([
      "containment",
      s.containment.kind === "cgroup" ? `cgroup ${s.containment.path}` : `none (${s.containment.why})`,
    ]);
  rows.push(["tracking", s.tracking ?? "unknown (registered before tracking was recorded)"]);
  let text = table(rows);
  if (s.steps && s.steps.length > 0) {
    text +=
      "\n" + table([["STEP", "OUTCOME", "MS"], ...s.steps.map((x) => [x.name, x.outcome, String(x.durationMs)])], true);
  }
  if (s.leftovers.length > 0) {
    text += "\n" + table([["LEFTOVER", "ITEM", "DETAIL"], ...s.leftovers.map((l) => [l.kind, l.item, l.detail])], true);
  }
  if (s.damage.length > 0) {
    text +=
      "\nStored values that cannot be read (a damaged row: treated as nothing, never reaped clean):\n" +
      table(
        [
          ["TABLE", "ROW", "COLUMN", "WHAT IS WRONG"],
          ...s.damage.map((d) => [
            d.table,
            Object.entries(d.row)
              .map(([k, v]) => `${k}=${v}`)
              .join(" "),
            d.column,
            d.error,
          ]),
        ],
        true,
      );
  }
  return text;
}

export async function update(ctx: Context): Promise<number> {
  const id = sessionIdArg(ctx, "update");
  const body = { ...parseAdditions(ctx.values) };
  if (Object.keys(body).length === 0) throw new UsageError("update needs at least one --port, --path or --label");
  const res = await ctx.api<Session>("PATCH", `/v1/sessions/${id}`, body);
  if (res.status !== 200) return apiFailure(ctx, res);
  print(ctx, res.body, () => showSession(res.body, Date.now()));
  return EXIT.ok;
}

/**
 * `events ID`: one session's stored events, one document (GET /v1/sessions/{id}/events);
 * `events [--session ID] [--since SEQ] [-f]`: the event stream (GET /v1/events), one line each.
 */
export async function events(ctx: Context): Promise<number> {
  const follow = ctx.values.follow === true;
  const session = stringOption(ctx.values, "session");
  const sinceText = stringOption(ctx.values, "since");
  if (ctx.args.length > 1) throw new UsageError("events takes at most one session id");
  const id = ctx.args[0];
  if (id !== undefined && session !== undefined)
    throw new UsageError("events: name the session once (ID or --session)");
  if (id !== undefined && !follow && sinceText === undefined) return storedEvents(ctx);
  if (sinceText !== undefined && !/^(0|[1-9][0-9]{0,14})$/.test(sinceText)) {
    throw new UsageError(`--since: "${sinceText}" is not a seq (a whole number, as the events print it)`);
  }
  return streamedEvents(ctx, {
    follow,
    ...((id ?? session) === undefined ? {} : { session: id ?? session }),
    ...(sinceText === undefined ? {} : { since: Number(sinceText) }),
  });
}

/** Reconnections `events -f` tries before it says the daemon is gone (about 10 s of waits). */
const EVENTS_RETRIES = 8;

/**
 * Prints the stream as it arrives: one line per event (NDJSON with --json). Following, a
 * dropped connection is resumed from the last seq printed, each attempt noted on stderr; when
 * none succeeds, exit 4 naming the seq to resume from.
 */
async function streamedEvents(
  ctx: Context,
  opts: { follow: boolean; session?: string; since?: number },
): Promise<number> {
  let last: number | null = opts.since ?? null;
  try {
    for await (const e of streamEvents(ctx.socket, {
      ...opts,
      retries: EVENTS_RETRIES,
      backoff: { maxMs: 2000 },
      onRetry: ({ attempt, error, since }) =>
        ctx.note(
          `the event stream was cut (${errorMessage(error)}); reconnecting${since === null ? "" : ` after seq ${since}`} (${attempt} of ${EVENTS_RETRIES})`,
        ),
    })) {
      if (e.seq !== null) last = e.seq;
      ctx.out(ctx.json ? JSON.stringify(e) + "\n" : eventLine(e));
    }
  } catch (err) {
    if (err instanceof ReaperApiError) {
      ctx.note(`${err.message} (${err.code})`);
      return err.status === 404 ? EXIT.notFound : EXIT.error;
    }
    const unreachable = err instanceof ReaperError && err.code === "SR_DAEMON_UNREACHABLE";
    const resume = last === null ? "" : `; resume with --since ${last}`;
    if (!opts.follow || !(unreachable || isTransport(err))) throw err;
    ctx.note(`the daemon is gone: ${errorMessage(err)}; gave up after ${EVENTS_RETRIES} reconnections${resume}`);
    return EXIT.unreachable;
  }
  return EXIT.ok;
}

/** A connection that failed or broke (not a refusal, not a bug). */
function isTransport(err: unknown): boolean {
  const code = (err as { code?: unknown }).code;
  return typeof code === "string" && /^(E[A-Z]+|ERR_STREAM_PREMATURE_CLOSE)$/.test(code);
}

/** One event in one line: time, seq, event, session, then what it carries. */
function eventLine(e: AuditEventLine): string {
  const more = [
    e.step === null ? null : `step=${e.step}`,
    e.reason === null ? null : `reason=${e.reason}`,
    e.outcome === null ? null : `outcome=${e.outcome}`,
    e.durationMs === null ? null : `${e.durationMs}ms`,
  ].filter((x) => x !== null);
  const seq = e.seq === null ? "-" : String(e.seq);
  return `${e.time}  ${seq.padStart(7)}  ${e.event.padEnd(20)}  ${e.sessionId ?? "-"}${more.length > 0 ? `  ${more.join(" ")}` : ""}\n`;
}

async function storedEvents(ctx: Context): Promise<number> {
  const res = await ctx.api<{
    events: { time: string; event: string; step: string | null; outcome: string | null; durationMs: number | null }[];
  }>("GET", `/v1/sessions/${sessionIdArg(ctx, "events")}/events`);
  if (res.status !== 200) return apiFailure(ctx, res);
  print(ctx, res.body, () =>
    table(
      [
        ["TIME", "EVENT", "STEP", "OUTCOME", "MS"],
        ...res.body.events.map((e) => [
          e.time,
          e.event,
          e.step ?? "",
          e.outcome ?? "",
          e.durationMs === null ? "" : String(e.durationMs),
        ]),
      ],
      true,
    ),
  );
  return EXIT.ok;
}

export async function end(ctx: Context, command: "close" | "reap"): Promise<number> {
  const id = sessionIdArg(ctx, command);
  const res =
    command === "close"
      ? await ctx.api("DELETE", `/v1/sessions/${id}`)
      : await ctx.api("POST", `/v1/sessions/${id}/reap`);
  if (res.status !== 202) return apiFailure(ctx, res);
  print(ctx, res.body, () => `${decodeURIComponent(id)}: reaping (${command === "close" ? "closed" : "forced"})\n`);
  return EXIT.ok;
}

/** `extend ID DURATION`: keep a live session at least that long from now, however idle. */
export async function extend(ctx: Context): Promise<number> {
  if (ctx.args.length !== 2) throw new UsageError("extend takes a session id and a duration (e.g. 2h)");
  const [rawId, text] = ctx.args as [string, string];
  const ms = parseDuration(text);
  if (ms === null || ms < 1000)
    throw new UsageError(`"${text}" is not a duration of a second or more (e.g. 90m, 2h, 1d)`);
  const res = await ctx.api<ExtendAnswer>("POST", `/v1/sessions/${encodeURIComponent(rawId)}/extend`, {
    sec: Math.ceil(ms / 1000),
  });
  if (res.status === 404 && (res.body as { error?: { code?: string } } | null)?.error?.code === "SR_ROUTE_NOT_FOUND") {
    ctx.note("this daemon does not serve POST /v1/sessions/{id}/extend yet: upgrade reaperd");
    return EXIT.error;
  }
  if (res.status !== 200) return apiFailure(ctx, res);
  const a = res.body;
  const now = Date.now();
  print(
    ctx,
    a,
    () =>
      `${rawId}: kept until ${a.keptUntil} (${relativeTime(a.keptUntil, now)})${a.cappedBy === "max_lifetime" ? ", when its max lifetime ends (before the extension would)" : ""}; heartbeats must go on (a missed one still reaps it: ${a.expiresBy} ${relativeTime(a.deadline, now)})
`,
  );
  return EXIT.ok;
}

type Expiring = ExpiringJson;

export async function expiring(ctx: Context): Promise<number> {
  noArgs(ctx, "expiring");
  const within = stringOption(ctx.values, "within") ?? "10m";
  const ms = parseDuration(within);
  if (ms === null || ms <= 0) throw new UsageError(`--within: "${within}" is not a duration (e.g. 30s, 10m, 2h, 1d)`);
  const res = await ctx.api<{ sessions: Expiring[] }>("GET", `/v1/expiring?withinSec=${Math.ceil(ms / 1000)}`);
  if (res.status === 404 && (res.body as { error?: { code?: string } } | null)?.error?.code === "SR_ROUTE_NOT_FOUND") {
    ctx.note("this daemon does not serve GET /v1/expiring yet: upgrade reaperd");
    return EXIT.error;
  }
  if (res.status !== 200) return apiFailure(ctx, res);
  const now = Date.now();
  print(ctx, res.body, () =>
    table(
      [
        ["ID", "PROFILE", "OWNER", "EXPIRES", "REASON"],
        ...res.body.sessions.map((s) => [s.id, s.profile, s.owner ?? "-", relativeTime(s.deadline, now), s.expiresBy]),
      ],
      true,
    ),
  );
  return EXIT.ok;
}

/** What the sweep does with a finding, in the table's words. */
function orphanAction(f: OrphanJson): string {
  if (f.action === "report") return "report";
  return f.adopted ? "reap" : "reap refused";
}

function orphanWhat(f: OrphanJson): string {
  if (f.kind === "path") return f.path ?? "";
  const full = f.cmdline ?? f.exe ?? "";
  // Cut at 80 characters, with a marker: a cut line must not pass for the whole command.
  const cmd = full.length > 80 ? `${full.slice(0, 79)}…` : full;
  if (f.kind === "identity_mismatch") return `pid ${f.pid}: ${f.detail ?? ""}`;
  const tree = f.processes.length > 1 ? `, ${f.processes.length} processes` : "";
  const ports = f.ports.length > 0 ? `, ports ${f.ports.join(",")}` : "";
  return `pid ${f.pid}${tree}${ports}: ${cmd}`;
}

export async function orphans(ctx: Context): Promise<number> {
  noArgs(ctx, "orphans");
  const res = await ctx.api<{ enabled: boolean; sweptAt: string | null; findings: OrphanJson[] }>("GET", "/v1/orphans");
  if (res.status === 404 && (res.body as { error?: { code?: string } } | null)?.error?.code === "SR_ROUTE_NOT_FOUND") {
    ctx.note("this daemon does not serve GET /v1/orphans yet: upgrade reaperd");
    return EXIT.error;
  }
  if (res.status !== 200) return apiFailure(ctx, res);
  const { enabled, sweptAt, findings } = res.body;
  const now = Date.now();
  print(ctx, res.body, () => {
    if (!enabled) return "the orphan sweep is off: no profile declares [profiles.NAME.orphans]\n";
    const swept = sweptAt ? `last sweep ${sweptAt} (${relativeTime(sweptAt, now)})` : "no sweep yet";
    const rows = findings.map((f) => [
      f.kind,
      f.profile,
      orphanAction(f),
      relativeTime(new Date(now - f.ageSec * 1000).toISOString(), now).replace(/ ago$/, ""),
      String(f.uid),
      f.sessionId,
      orphanWhat(f),
    ]);
    const refused = findings.filter((f) => f.action === "reap" && !f.adopted && f.detail);
    return (
      `${swept}\n` +
      table([["KIND", "PROFILE", "ACTION", "AGE", "UID", "SESSION", "WHAT"], ...rows], true) +
      refused.map((f) => `${f.sessionId}: ${f.detail}\n`).join("")
    );
  });
  return EXIT.ok;
}
