#!/usr/bin/env node
/**
 * reaperctl: talks to reaperd over its unix socket. Human tables by default, --json for
 * scripts. This file is the CLI's entry point: it parses the command line, owns the
 * process's signals and exit code, and hands each command a Context.
 */
import { existsSync, readFileSync } from "node:fs";
import { resolve } from "node:path";
import { parseArgs, type ParseArgsConfig } from "node:util";
import { ReaperError, errorMessage } from "../errors.js";
import { auditVerify } from "./audit-verify.js";
import { backup } from "./backup.js";
import { callApi } from "../client/transport.js";
import { EXIT, UsageError, type Context } from "./command.js";
import { end, events, expiring, extend, list, orphans, show, status, update } from "./commands.js";
import { runCommand } from "./run.js";

type Options = NonNullable<ParseArgsConfig["options"]>;

const GLOBAL_OPTIONS = {
  socket: { type: "string" },
  json: { type: "boolean", default: false },
  help: { type: "boolean", short: "h", default: false },
  version: { type: "boolean", short: "V", default: false },
} satisfies Options;

const VERSION = (
  JSON.parse(readFileSync(new URL("../../../package.json", import.meta.url), "utf8")) as { version: string }
).version;

const EXIT_CODES = `Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 daemon unreachable,
5 audit verify found problems; run exits with its command's status.`;

const GLOBAL_HELP = `Options:
  --socket PATH   the daemon's socket; default $REAPER_SOCKET, then
                  /run/session-reaper/reaper.sock if present, else ./reaper.sock
  --json          print JSON instead of a table
  -h, --help      show help
  -V, --version   print reaperctl's version`;

interface CommandSpec {
  /** One or two words: "status", "audit verify". */
  name: string;
  synopsis: string;
  summary: string;
  /** The rest of `reaperctl CMD --help`: what it does, its options, examples. */
  help: string;
  options: Options;
  run(ctx: Context): Promise<number>;
}

const COMMANDS: CommandSpec[] = [
  {
    name: "status",
    synopsis: "status",
    summary: "the daemon's state, version and session counts",
    help: `Shows whether the daemon is running or shutting down, its version, when it started,
and how many sessions are live, reaping and reaped (and damaged, when any is).

Example:
  reaperctl status`,
    options: {},
    run: status,
  },
  {
    name: "list",
    synopsis: "list [--state S] [--profile P] [--owner O] [--limit N]",
    summary: "sessions, oldest first (all pages)",
    help: `Lists sessions, oldest first: id, state, profile, owner, engine pid, age, and when a
live session expires or why a reaped one ended (with its outcome).

Options:
  --state S       live, reaping, reaped or damaged (live, but its engine cannot be
                  identified: its stored row is damaged)
  --profile P     only sessions of profile P
  --owner O       only sessions whose owner is O
  --limit N       at most N sessions (1..1000; default: every page)

Examples:
  reaperctl list --state live
  reaperctl list --owner alice --json`,
    options: {
      state: { type: "string" },
      profile: { type: "string" },
      owner: { type: "string" },
      limit: { type: "string" },
    },
    run: list,
  },
  {
    name: "show",
    synopsis: "show ID",
    summary: "one session with its cleanup steps and leftovers",
    help: `Shows one session: state and reason, outcome, engine pid, times, deadline, ports,
paths, engine cpu and memory while live, its tracking (how its processes were known:
lineage, cgroup-from-birth, cgroup or snapshots), each cleanup step with its outcome and
duration, anything the cleanup left behind, and the stored values of its row that cannot
be read (a damaged row: table, row, column). Exit 3 if no session has this id.

Example:
  reaperctl show spark-42`,
    options: {},
    run: show,
  },
  {
    name: "events",
    synopsis: "events [ID] [-f] [--session ID] [--since SEQ]",
    summary: "audit events: one session's, or the daemon's stream (-f: follow it)",
    help: `With only a session ID: lists that session's audit events as the daemon stored them
(time, event, step, outcome and duration; --json: one document). Exit 3 if no session has
this id.

Otherwise streams the daemon's audit events (GET /v1/events), oldest first, one line each:
time, seq, event, session, then step, reason, outcome and duration (--json: one JSON object
a line, NDJSON). An admin (root, the daemon's user, api.admin_group) sees every event; any
other user only the events of the sessions it registered. Without -f, prints what is kept
(after --since) and exits 0.

With -f, prints each new event as the daemon commits it (from now, or after --since) until
interrupted. If the connection drops (the daemon restarts, or cut a reader that fell
behind), reconnects after the last seq printed: no event is lost or printed twice; each
attempt is noted on stderr. If the daemon cannot be reached for about 10 s (8 attempts),
exits 4 naming the seq to resume from with --since.

A --since below what retention purged (store.retain_reaped_sec) is refused (exit 1,
SR_EVENTS_PURGED, naming the seq to resume from).

Options:
  -f, --follow      go on printing new events as they are committed
  --session ID      only this session's events (ID alone with -f or --since does the same)
  --since SEQ       only events after seq SEQ (the seq column; resume where a run stopped)

Examples:
  reaperctl events spark-42 --json
  reaperctl events -f
  reaperctl events -f --session spark-42
  reaperctl events --since 1200 --json | jq -c 'select(.event == "reap.finished")'`,
    options: {
      follow: { type: "boolean", short: "f", default: false },
      session: { type: "string" },
      since: { type: "string" },
    },
    run: events,
  },
  {
    name: "expiring",
    synopsis: "expiring [--within DURATION]",
    summary: "live sessions that expire soon, and why",
    help: `Lists the live sessions whose deadline falls within DURATION, soonest first, with the
timeout that will end them: heartbeat_timeout, idle_timeout or max_lifetime. A session that
heartbeats (or works) in time moves its deadline and leaves the list.

Options:
  --within DURATION   30s, 10m, 2h, 1d, 1h30m or a number of seconds (default 10m)

Examples:
  reaperctl expiring
  reaperctl expiring --within 30s --json`,
    options: { within: { type: "string" } },
    run: expiring,
  },
  {
    name: "orphans",
    synopsis: "orphans",
    summary: "what the orphan sweep found: processes and paths no session claims",
    help: `Lists the findings of the daemon's last orphan sweep: processes that match a profile's
[orphans] matcher and belong to no live or reaping session, temp paths matching its globs
that no session claims, both older than the profile's min_age_sec, and live sessions whose
engine now runs as another uid than the one registered (identity_mismatch).

ACTION is what the sweep does with each: "report" (an orphan.found event only), "reap"
(it became a session with reason "orphaned", cleaned up by the full pipeline), or "reap
refused" (a policy check refused it; the reason follows the table). SESSION is that
session's id; in report mode, the id reap mode would give it. WHAT lists the process tree
and the ports reap mode would terminate and verify free, or the path it would delete: in
report mode, the listing is the dry run of reap mode. The sweep runs on [orphans] schedule
and once at start; "reaperctl show SESSION" follows a reap.

Example:
  reaperctl orphans
  reaperctl orphans --json`,
    options: {},
    run: orphans,
  },
  {
    name: "close",
    synopsis: "close ID",
    summary: 'close a session (full cleanup, reason "closed")',
    help: `Closes a session as its client would (DELETE): the daemon fences it and runs the full
cleanup with reason "closed". Returns once the cleanup has started; follow it with
"reaperctl show ID". Exit 3 if no session has this id, 1 if it is no longer live.

Example:
  reaperctl close spark-42`,
    options: {},
    run: (ctx) => end(ctx, "close"),
  },
  {
    name: "reap",
    synopsis: "reap ID",
    summary: 'force-reap a session (full cleanup, reason "forced")',
    help: `Force-reaps a session as an operator: the daemon fences it (its heartbeats now answer
409) and runs the full cleanup with reason "forced". Exit 3 if no session has this id, 1
if it is no longer live.

Example:
  reaperctl reap spark-42`,
    options: {},
    run: (ctx) => end(ctx, "reap"),
  },
  {
    name: "extend",
    synopsis: "extend ID DURATION",
    summary: "keep a live session at least DURATION from now, however idle",
    help: `Extends a live session (POST /v1/sessions/{id}/extend): its idle deadline becomes at
least DURATION from now (an extension never shortens one in force). The profile's
max_extend_sec caps DURATION (a longer one is refused, exit 1, naming the cap), and the
session's max lifetime still ends it (the answer says so). Heartbeats must go on: a session
whose client stops heartbeating is still reaped. A warning given for the old deadline no
longer stands. DURATION: 90 (seconds), 90s, 30m, 2h, 1d, 1h30m. Exit 3 if no session has
this id, 1 if it is refused or no longer live.

Examples:
  reaperctl extend kernel-7 2h
  reaperctl extend spark-42 45m --json`,
    options: {},
    run: extend,
  },
  {
    name: "update",
    synopsis: "update ID [--port N]... [--path P]... [--label K=V]...",
    summary: "add ports, paths or labels to a live session",
    help: `Adds to a live session (PATCH): ports its engine opened after registration (each must
be held by the session's processes now: a LISTEN socket or a bound UDP socket), temp paths
it made later (the profile's path policy applies), and labels (a new value replaces the
old). All or nothing: a refusal changes nothing. Ports and paths the session already has
are accepted as they are. Exit 3 if no session has this id, 1 if it is refused.

Options:
  --port N        a port to verify free at cleanup (repeatable)
  --path P        a file or dir to delete at cleanup (repeatable)
  --label K=V     (repeatable)

Examples:
  reaperctl update kernel-7 --port 41235 --port 41236
  reaperctl update spark-42 --path /tmp/spark-42/ui --label stage=2`,
    options: {
      port: { type: "string", multiple: true },
      path: { type: "string", multiple: true },
      label: { type: "string", multiple: true },
    },
    run: update,
  },
  {
    name: "backup",
    synopsis: "backup FILE [--db PATH]",
    summary: "a consistent copy of the daemon's database, while it runs",
    help: `Copies the daemon's SQLite database to FILE while the daemon runs, with SQLite's online
backup API: one consistent snapshot (the daemon goes on writing meanwhile), written under a
temporary name, checked (integrity_check) and renamed to FILE. The daemon says where its
database is; --db names it instead (a stopped daemon). reaperctl reads the database itself:
run it as root or as the daemon's user. FILE must not exist. Prints the copy's size and what
it holds. To restore: stop the daemon, move reaper.db and its -wal and -shm files aside, copy
FILE to reaper.db, start the daemon (docs/operations.md, "Backup and restore").

Options:
  --db PATH   the database to copy (default: the one the daemon names)

Examples:
  reaperctl backup /var/backups/session-reaper/reaper-$(date +%F).db
  reaperctl backup --db /var/lib/session-reaper/reaper.db /root/reaper.db`,
    options: { db: { type: "string" } },
    run: backup,
  },
  {
    name: "audit verify",
    synopsis: "audit verify [LOG] [--offline]",
    summary: "prove every session that left live reached reap.finished",
    help: `Reads the daemon's JSON audit lines from LOG, or from stdin when LOG is absent or "-",
and proves that every session that left live (session.closed, session.expired or
reap.started) reached reap.finished. Lists the sessions that did not, unknown events, and
malformed lines (line number, first 80 characters). Operational lines without an "event"
("signal sent", …) are counted and skipped; a prefix before the JSON (journalctl's default
output) is skipped too. When the daemon answers, each session the log names is
cross-checked with the daemon's own events (a reap.finished the log lost, or a session the
daemon does not know, is listed); when it does not, the log is verified alone.
Lines the daemon could not write (a full disk) are named by its daemon.lines_dropped
events and count as written; audit lines dropped without a name make the log incomplete.
A rotated log is verified as one: cat the files oldest first into stdin.
Also listed, without changing the exit code: clean reaps tracked by snapshots only
(reap.finished's tracking "snapshots": their clean is only as good as walks of /proc; the
first 20 ids, then a count), and a count of clean reaps whose reap.finished has no
tracking (older builds).
Exit 0 when complete, 5 when anything is missing, mismatched, malformed, unknown or
dropped unnamed.

Options:
  --offline   do not ask the daemon

Examples:
  journalctl -o cat -u session-reaper | reaperctl audit verify
  reaperctl audit verify /var/log/session-reaper/audit.log --json`,
    options: { offline: { type: "boolean", default: false } },
    run: (ctx) => auditVerify(ctx, process.stdin),
  },
  {
    name: "run",
    synopsis: "run [OPTIONS] -- CMD [ARGS...]",
    summary: "run CMD as an engine session until it exits",
    help: `Starts CMD as an engine session in its own process group (stdio inherited), registers
it (engine: CMD's pid; owner: this reaperctl, so the daemon reaps CMD as owner_gone if
reaperctl dies, even by SIGKILL), heartbeats while CMD lives, and forwards SIGINT, SIGTERM,
SIGHUP and SIGQUIT to CMD's process group. When CMD exits, closes the session, waits for
the cleanup (leftover children, ports, paths), and exits with CMD's status (128+N if a
signal N killed it). CMD sees REAPER_SESSION_ID and REAPER_SOCKET in its environment.
CMD starts only once its session is registered, so it never runs unregistered (or, in a
contained profile, outside its session's cgroup). Each --port is added to the session
once CMD listens on it (the daemon checks that CMD's processes hold it); a port CMD does
not listen on within --wait-ports ends CMD, and reaperctl exits 1. If the session cannot
be registered, CMD never starts and reaperctl exits 1 (4 if the daemon is unreachable). A
--heartbeat not shorter than the session's heartbeat timeout is refused (exit 2) before
CMD starts. If the daemon ends the session (force-reap, a timeout, a close by an
operator), reaperctl says so, with the reason and the cleanup's outcome, and exits with
CMD's status (the daemon terminates CMD: 143 for SIGTERM).

Options:
  --id ID               the session id (default: a random UUID)
  --profile P           the daemon's profile (default: "default")
  --owner O             a label for operators (default: your user name)
  --port N              a port CMD listens on, freed at cleanup (repeatable)
  --path DIR            a temp file or dir of CMD's, deleted at cleanup (repeatable)
  --label KEY=VALUE     (repeatable)
  --heartbeat DURATION  heartbeat interval (default: a third of the heartbeat timeout)
  --wait-ports DURATION how long CMD may take to listen on each port (default 10s)
  --wait-reap DURATION  how long to wait for the cleanup after CMD exits (default 60s)

Examples:
  reaperctl run --profile spark --path /tmp/job-7 -- ./spark-submit job.py
  reaperctl run --port 8998 --heartbeat 5s --label team=data -- ./livy-server`,
    options: {
      id: { type: "string" },
      profile: { type: "string" },
      owner: { type: "string" },
      port: { type: "string", multiple: true },
      path: { type: "string", multiple: true },
      label: { type: "string", multiple: true },
      heartbeat: { type: "string" },
      "wait-ports": { type: "string" },
      "wait-reap": { type: "string" },
    },
    run: (ctx) => runCommand(ctx, process.env),
  },
];

function usage(): string {
  const lines = COMMANDS.map((c) =>
    c.synopsis.length > 32
      ? `  ${c.synopsis}\n${" ".repeat(36)}${c.summary}`
      : `  ${c.synopsis.padEnd(34)}${c.summary}`,
  );
  return `Usage: reaperctl [--socket PATH] [--json] COMMAND [ARGS]

Commands:
${lines.join("\n")}

${GLOBAL_HELP}; "reaperctl COMMAND --help" for one command

${EXIT_CODES}
`;
}

function commandHelp(c: CommandSpec): string {
  return `Usage: reaperctl [--socket PATH] [--json] ${c.synopsis}

${c.help}

${GLOBAL_HELP}

${EXIT_CODES}
`;
}

function defaultSocket(env: NodeJS.ProcessEnv): string {
  if (env.REAPER_SOCKET) return env.REAPER_SOCKET;
  const system = "/run/session-reaper/reaper.sock";
  return existsSync(system) ? system : resolve("reaper.sock");
}

/** Edit distance (insertions, deletions, substitutions, adjacent swaps) for "did you mean". */
function distance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) (d[0] as number[])[j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const row = d[i] as number[];
      const up = d[i - 1] as number[];
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      row[j] = Math.min((up[j] as number) + 1, (row[j - 1] as number) + 1, (up[j - 1] as number) + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) {
        row[j] = Math.min(row[j] as number, ((d[i - 2] as number[])[j - 2] as number) + 1);
      }
    }
  }
  return (d[a.length] as number[])[b.length] as number;
}

/** The closest of `known` to `word`, if it is close enough to be a typo (at most 2 edits). */
function closest(word: string, known: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestD = Number.POSITIVE_INFINITY;
  for (const k of known) {
    const dist = distance(word, k);
    if (dist < bestD) [best, bestD] = [k, dist];
  }
  return bestD <= Math.min(2, Math.floor(word.length / 2)) ? best : undefined;
}

function unknownCommand(name: string): UsageError {
  const words = [...new Set(COMMANDS.map((c) => c.name.split(" ")[0] as string)), "help"];
  const near = closest(name, words);
  return new UsageError(`unknown command "${name}"${near ? `; did you mean "${near}"?` : ""}`);
}

/** The command's words among the positionals: "audit verify" is two. */
function findCommand(positionals: string[]): { spec: CommandSpec | undefined; words: number; name: string } {
  const [first, second] = positionals;
  if (first === undefined) return { spec: undefined, words: 0, name: "" };
  const two = `${first} ${second ?? ""}`;
  const spec = COMMANDS.find((c) => c.name === two) ?? COMMANDS.find((c) => c.name === first);
  if (spec === undefined && first === "audit") {
    if (second === undefined) throw new UsageError("audit needs a subcommand: verify");
    throw new UsageError(
      `unknown command "${two}"${closest(second, ["verify"]) ? '; did you mean "audit verify"?' : ""}`,
    );
  }
  return { spec, words: spec?.name.includes(" ") ? 2 : 1, name: first };
}

/** For the usage hint after an error. */
let usedCommand = "";

/** "unknown option --stat for list; did you mean --state?" */
function unknownOption(option: string): string {
  const spec = COMMANDS.find((c) => c.name === usedCommand);
  const names = Object.keys({ ...GLOBAL_OPTIONS, ...spec?.options });
  const near = option.startsWith("--") ? closest(option.slice(2), names) : undefined;
  return `unknown option ${option}${usedCommand ? ` for ${usedCommand}` : ""}${near ? `; did you mean --${near}?` : ""}`;
}

async function main(argv: string[], out: (s: string) => void): Promise<number> {
  // Everything after the first "--" belongs to run's command, never to reaperctl.
  const dashes = argv.indexOf("--");
  const own = dashes < 0 ? argv : argv.slice(0, dashes);
  const rest = dashes < 0 ? null : argv.slice(dashes + 1);

  // A first, lenient pass finds the command (every command's options declared, so that an
  // option's value is not taken for the command); the second checks the command's options.
  const allOptions: Options = { ...GLOBAL_OPTIONS };
  for (const c of COMMANDS) Object.assign(allOptions, c.options);
  const loose = parseArgs({ args: own, options: allOptions, allowPositionals: true, strict: false });
  if (loose.positionals[0] === "help") {
    const { spec } = findCommand(loose.positionals.slice(1));
    out(spec ? commandHelp(spec) : usage());
    return EXIT.ok;
  }
  const { spec, words, name } = findCommand(loose.positionals);
  usedCommand = spec?.name ?? "";
  if (spec === undefined) {
    if (loose.values.help === true) {
      out(usage());
      return EXIT.ok;
    }
    if (loose.values.version === true) {
      out(`reaperctl ${VERSION}\n`);
      return EXIT.ok;
    }
    if (name !== "") throw unknownCommand(name);
    // No command: an option none of the commands knows is named (the strict pass says how).
    parseArgs({ args: own, options: GLOBAL_OPTIONS, allowPositionals: true, strict: true });
    process.stderr.write(usage());
    return EXIT.usage;
  }
  const { values, positionals } = parseArgs({
    args: own,
    options: { ...GLOBAL_OPTIONS, ...spec.options },
    allowPositionals: true,
    strict: true,
  });
  if (values.help === true) {
    out(commandHelp(spec));
    return EXIT.ok;
  }
  if (values.version === true) {
    out(`reaperctl ${VERSION}\n`);
    return EXIT.ok;
  }
  const args = positionals.slice(words);
  if (spec.name !== "run" && rest !== null) args.push(...rest);
  const socket = typeof values.socket === "string" ? values.socket : defaultSocket(process.env);
  const ctx: Context = {
    socket,
    json: values.json === true,
    values,
    args,
    rest: spec.name === "run" ? rest : null,
    api: (method, path, body) => callApi(socket, method, path, body),
    out,
    note: (line) => void process.stderr.write(`reaperctl: ${line}\n`),
    trapSignals(signals, handler) {
      for (const s of signals) process.on(s, handler);
      return () => {
        for (const s of signals) process.off(s, handler);
      };
    },
  };
  return spec.run(ctx);
}

main(process.argv.slice(2), (s) => process.stdout.write(s)).then(
  (code) => (process.exitCode = code),
  (err: unknown) => {
    const code = (err as { code?: string }).code;
    // node:util's message for an unknown option explains "--" at length: one line is enough.
    const unknown = code === "ERR_PARSE_ARGS_UNKNOWN_OPTION" ? /'([^']+)'/.exec(errorMessage(err))?.[1] : undefined;
    const message = unknown ? unknownOption(unknown) : errorMessage(err);
    process.stderr.write(`reaperctl: ${message}\n`);
    if (err instanceof UsageError || code?.startsWith("ERR_PARSE_ARGS")) {
      process.stderr.write(`Run "reaperctl ${usedCommand ? `${usedCommand} ` : ""}--help" for usage.\n`);
      process.exitCode = EXIT.usage;
    } else if ((err instanceof ReaperError && err.code === "SR_DAEMON_UNREACHABLE") || code === "ETIMEDOUT") {
      process.exitCode = EXIT.unreachable;
    } else {
      process.exitCode = EXIT.error;
    }
  },
);
