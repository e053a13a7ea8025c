#!/usr/bin/env node
/**
 * reaperctl: talks to reaperd over its unix socket. Human tables by default, --json for
 * scripts. Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 daemon unreachable.
 */
import { existsSync } from "node:fs";
import { resolve } from "node:path";
import { parseArgs } from "node:util";
import { ReaperError, errorMessage } from "../errors.js";
import { callApi, type ApiResponse } from "./client.js";
import { relativeTime, table } from "./format.js";

export const EXIT = { ok: 0, error: 1, usage: 2, notFound: 3, unreachable: 4 } as const;

const USAGE = `Usage: reaperctl [--socket PATH] [--json] COMMAND [ARGS]

Commands:
  status                 the daemon's state, version and session counts
  list [--state S] [--profile P] [--owner O] [--limit N]
                         sessions, oldest first (all pages)
  show ID                one session with its cleanup steps
  events ID              one session's audit events
  close ID               close a session (full cleanup, reason "closed")
  reap ID                force-reap a session (reason "forced")

Options:
  --socket PATH   the daemon's socket; default $REAPER_SOCKET, then
                  /run/session-reaper/reaper.sock if present, else ./reaper.sock
  --json          print the API's JSON instead of a table
  -h, --help      show this help

Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 daemon unreachable.
`;

type Session = {
  id: string;
  profile: string;
  owner: string | null;
  state: string;
  reason: string | null;
  outcome: string | null;
  engine: { pid: number };
  createdAt: string;
  lastHeartbeatAt: string;
  deadline: string | null;
  ports: number[];
  paths: string[];
  leftovers: { kind: string; item: string; detail: string }[];
  steps?: { name: string; outcome: string; durationMs: number; detail: Record<string, unknown> }[];
  usage?: { cpu: number; memory: number } | null;
};

function defaultSocket(env: NodeJS.ProcessEnv): string {
  if (env.REAPER_SOCKET) return env.REAPER_SOCKET;
  const system = "/run/session-reaper/reaper.sock";
  return existsSync(system) ? system : resolve("reaper.sock");
}

class UsageError extends Error {}

async function run(argv: string[], out: (s: string) => void): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      socket: { type: "string" },
      json: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
      state: { type: "string" },
      profile: { type: "string" },
      owner: { type: "string" },
      limit: { type: "string" },
    },
  });
  const [command, ...rest] = positionals;
  if (values.help || command === undefined) {
    out(USAGE);
    return values.help ? EXIT.ok : EXIT.usage;
  }
  const socket = values.socket ?? defaultSocket(process.env);
  const api = <T>(method: string, path: string): Promise<ApiResponse<T>> => callApi<T>(socket, method, path);
  const needId = (): string => {
    if (rest.length !== 1) throw new UsageError(`${command} takes exactly one session id`);
    return encodeURIComponent(rest[0] as string);
  };
  const print = (value: unknown, human: () => string): void =>
    out(values.json ? JSON.stringify(value, null, 2) + "\n" : human());
  const now = Date.now();

  let res: ApiResponse<unknown>;
  switch (command) {
    case "status": {
      res = await api("GET", "/v1/daemon");
      if (res.status !== 200) break;
      const d = res.body as { state: string; version: string; startedAt: string; counts: Record<string, number> };
      print(d, () =>
        table([
          ["state", d.state],
          ["version", d.version],
          ["started", `${d.startedAt} (${relativeTime(d.startedAt, now)})`],
          ["live", String(d.counts.live ?? 0)],
          ["reaping", String(d.counts.reaping ?? 0)],
          ["reaped", String(d.counts.reaped ?? 0)],
        ]),
      );
      return EXIT.ok;
    }
    case "list": {
      if (rest.length > 0) throw new UsageError("list takes no arguments");
      const sessions: Session[] = [];
      const params = new URLSearchParams();
      for (const key of ["state", "profile", "owner", "limit"] as const) if (values[key]) params.set(key, values[key]);
      let cursor: string | null = null;
      do {
        if (cursor) params.set("cursor", cursor);
        res = await api("GET", `/v1/sessions?${params.toString()}`);
        if (res.status !== 200) return fail(res, out);
        const page = res.body as { sessions: Session[]; next: string | null };
        sessions.push(...page.sessions);
        cursor = values.limit ? null : page.next;
      } while (cursor);
      print({ sessions }, () =>
        table(
          [
            ["ID", "STATE", "PROFILE", "OWNER", "PID", "CREATED", "EXPIRES / REASON"],
            ...sessions.map((s) => [
              s.id,
              s.state,
              s.profile,
              s.owner ?? "-",
              String(s.engine.pid),
              relativeTime(s.createdAt, now),
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
    case "show": {
      res = await api("GET", `/v1/sessions/${needId()}`);
      if (res.status !== 200) break;
      const s = res.body as Session;
      print(s, () => showSession(s, now));
      return EXIT.ok;
    }
    case "events": {
      res = await api("GET", `/v1/sessions/${needId()}/events`);
      if (res.status !== 200) break;
      const { events } = res.body as {
        events: {
          time: string;
          event: string;
          step: string | null;
          outcome: string | null;
          durationMs: number | null;
        }[];
      };
      print(res.body, () =>
        table(
          [
            ["TIME", "EVENT", "STEP", "OUTCOME", "MS"],
            ...events.map((e) => [
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
    case "close":
    case "reap": {
      const id = needId();
      res =
        command === "close" ? await api("DELETE", `/v1/sessions/${id}`) : await api("POST", `/v1/sessions/${id}/reap`);
      if (res.status !== 202) break;
      print(res.body, () => `${decodeURIComponent(id)}: reaping (${command === "close" ? "closed" : "forced"})\n`);
      return EXIT.ok;
    }
    default:
      throw new UsageError(`unknown command "${command}"`);
  }
  return fail(res, out);
}

function fail(res: ApiResponse<unknown>, _out: (s: string) => void): number {
  const err = (res.body as { error?: { code: string; message: string } } | null)?.error;
  process.stderr.write(`reaperctl: ${err ? `${err.message} (${err.code})` : `HTTP ${res.status}`}\n`);
  return res.status === 404 ? EXIT.notFound : EXIT.error;
}

function showSession(s: Session, now: number): string {
  const rows: string[][] = [
    ["id", s.id],
    ["state", s.state + (s.reason ? ` (${s.reason})` : "")],
    ["outcome", s.outcome ?? "-"],
    ["profile", s.profile],
    ["owner", s.owner ?? "-"],
    ["engine pid", String(s.engine.pid)],
    ["created", `${s.createdAt} (${relativeTime(s.createdAt, now)})`],
    ["last heartbeat", `${s.lastHeartbeatAt} (${relativeTime(s.lastHeartbeatAt, now)})`],
    ["deadline", s.deadline ? `${s.deadline} (${relativeTime(s.deadline, now)})` : "-"],
    ["ports", s.ports.join(", ") || "-"],
    ["paths", s.paths.join(", ") || "-"],
  ];
  if (s.usage)
    rows.push(["usage", `cpu ${s.usage.cpu.toFixed(1)}%, memory ${(s.usage.memory / 1048576).toFixed(1)} MiB`]);
  let text = table(rows);
  if (s.steps && s.steps.length > 0) {
    text +=
      "\n" + table([["STEP", "OUTCOME", "MS"], ...s.steps.map((x) => [x.name, x.outcome, String(x.durationMs)])], true);
  }
  if (s.leftovers.length > 0) {
    text += "\n" + table([["LEFTOVER", "ITEM", "DETAIL"], ...s.leftovers.map((l) => [l.kind, l.item, l.detail])], true);
  }
  return text;
}

run(process.argv.slice(2), (s) => process.stdout.write(s)).then(
  (code) => (process.exitCode = code),
  (err: unknown) => {
    process.stderr.write(`reaperctl: ${errorMessage(err)}\n`);
    if (err instanceof UsageError || (err as { code?: string }).code?.startsWith("ERR_PARSE_ARGS")) {
      process.stderr.write(`Run "reaperctl --help" for usage.\n`);
      process.exitCode = EXIT.usage;
    } else if (err instanceof ReaperError && err.code === "SR_DAEMON_UNREACHABLE") {
      process.exitCode = EXIT.unreachable;
    } else {
      process.exitCode = EXIT.error;
    }
  },
);
