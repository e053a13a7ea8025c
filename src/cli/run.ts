/**
 * `reaperctl run [OPTIONS] -- CMD ARGS…`: CMD runs as an engine session. It gets its own
 * process group (and session, so a terminal's Ctrl-C reaches reaperctl alone, which forwards
 * it); it is registered with reaperctl as the owner process, so that if reaperctl dies, even
 * by SIGKILL, the daemon reaps CMD as `owner_gone`; reaperctl heartbeats while CMD lives,
 * and when CMD exits, closes the session, waits for the cleanup, and exits with CMD's status.
 */
import { spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { constants, userInfo } from "node:os";
import type { Writable } from "node:stream";
import {
  GATE,
  ReaperApiError,
  ReaperClient,
  SESSION_COOKIE,
  type RegisterBody,
  type Session,
} from "../client/index.js";
import { ReaperError, errorMessage } from "../errors.js";
import { EXIT, UsageError, parseAdditions, stringOption, type Context } from "./command.js";
import { formatMs, parseDuration, relativeTime } from "./format.js";

export const FORWARDED_SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"] as const;

interface RunOptions {
  command: [string, ...string[]];
  id: string;
  profile: string | undefined;
  owner: string | undefined;
  ports: number[];
  paths: string[];
  labels: Record<string, string>;
  heartbeatMs: number | undefined;
  waitPortsMs: number;
  waitReapMs: number;
}

function duration(ctx: Context, name: string, fallbackMs: number): number {
  const text = stringOption(ctx.values, name);
  if (text === undefined) return fallbackMs;
  const ms = parseDuration(text);
  if (ms === null || ms <= 0) throw new UsageError(`--${name}: "${text}" is not a duration (e.g. 500ms, 5s, 1m)`);
  return ms;
}

function runOptions(ctx: Context): RunOptions {
  if (ctx.rest === null) throw new UsageError(`put the command after "--", e.g. reaperctl run -- sleep 60`);
  if (ctx.args.length > 0) throw new UsageError(`unexpected "${ctx.args[0]}" before "--"`);
  const [cmd, ...args] = ctx.rest;
  if (cmd === undefined || cmd === "") throw new UsageError(`no command after "--"`);
  const added = parseAdditions(ctx.values);
  let owner = stringOption(ctx.values, "owner");
  if (owner === undefined) {
    try {
      owner = userInfo().username;
    } catch {
      // no passwd entry for this uid: leave the owner unset
    }
  }
  return {
    command: [cmd, ...args],
    id: stringOption(ctx.values, "id") ?? randomUUID(),
    profile: stringOption(ctx.values, "profile"),
    owner,
    ports: added.ports ?? [],
    paths: added.paths ?? [],
    labels: added.labels ?? {},
    heartbeatMs: ctx.values.heartbeat === undefined ? undefined : duration(ctx, "heartbeat", 0),
    waitPortsMs: duration(ctx, "wait-ports", 10_000),
    waitReapMs: duration(ctx, "wait-reap", 60_000),
  };
}

const sleep = (ms: number): Promise<null> => new Promise((r) => setTimeout(() => r(null), ms));

function describe(err: unknown): string {
  return err instanceof ReaperApiError || err instanceof ReaperError
    ? `${err.message} (${err.code})`
    : errorMessage(err);
}

/** A failure to reach the daemon, as opposed to an answer from it. */
function transportFailure(err: unknown): boolean {
  return !(err instanceof ReaperApiError) || err.status >= 500;
}

export async function runCommand(ctx: Context, env: NodeJS.ProcessEnv): Promise<number> {
  const o = runOptions(ctx);
  const [cmd, ...args] = o.command;
  // The command waits at a gate until its session is registered: no moment in which it runs
  // unregistered (or, contained, outside its cgroup). Its ports are added once it listens.
  const child = spawn("/bin/sh", ["-c", GATE, cmd, ...args], {
    detached: true, // its own session and process group: pgid = its pid
    stdio: ["inherit", "inherit", "inherit", "pipe"],
    env: { ...env, [SESSION_COOKIE]: o.id, REAPER_SOCKET: ctx.socket },
  });
  const exit = new Promise<number>((done) => {
    child.once("error", (err: NodeJS.ErrnoException) => {
      if (child.pid !== undefined) return;
      ctx.note(`cannot start ${cmd}: ${err.message}`);
      done(err.code === "ENOENT" ? 127 : 126); // as a shell would
    });
    child.once("exit", (code, signal) => done(code ?? 128 + (signal === null ? 0 : constants.signals[signal])));
  });
  const group = child.pid;
  if (group === undefined) return exit;
  const gate = child.stdio[3] as Writable;
  gate.on("error", () => undefined); // the shell died at the gate: its exit tells the rest

  let exited = false;
  let signalled = false;
  const waiting = new AbortController();
  void exit.then(() => (exited = true));
  const killGroup = (signal: NodeJS.Signals): void => {
    try {
      process.kill(-group, signal);
    } catch {
      // the group is empty already
    }
  };
  const untrap = ctx.trapSignals(FORWARDED_SIGNALS, (signal) => {
    signalled = true;
    killGroup(signal);
    if (exited) waiting.abort(); // a signal after the command ended: stop waiting for cleanup
  });

  try {
    const client = new ReaperClient({ socketPath: ctx.socket, intervalMs: o.heartbeatMs });
    const body: RegisterBody = {
      id: o.id,
      engine: { pid: group },
      ownerPid: process.pid,
      ...(o.profile === undefined ? {} : { profile: o.profile }),
      ...(o.owner === undefined ? {} : { owner: o.owner }),
      ...(o.paths.length > 0 ? { paths: o.paths } : {}),
      ...(Object.keys(o.labels).length > 0 ? { labels: o.labels } : {}),
    };
    let session: Session;
    try {
      session = await client.register(body);
    } catch (failure) {
      killGroup("SIGKILL"); // the command never ran: it waited at the gate
      const final = await exit;
      if (signalled) return final;
      ctx.note(`cannot register the session: ${describe(failure)}`);
      const unreachable =
        (failure instanceof ReaperError && failure.code === "SR_DAEMON_UNREACHABLE") ||
        (failure as { code?: unknown }).code === "ETIMEDOUT";
      return unreachable ? EXIT.unreachable : EXIT.error;
    }
    // A heartbeat interval the session's timeout does not allow would expire it between two
    // heartbeats: refused before the command runs.
    const timeoutMs = session.heartbeatTimeoutSec * 1000;
    if (o.heartbeatMs !== undefined && o.heartbeatMs >= timeoutMs) {
      // Closed first (reason closed: the daemon ends the waiting shell), killed in any case.
      await client.close().catch(() => null);
      killGroup("SIGKILL");
      await exit;
      throw new UsageError(
        `--heartbeat ${formatMs(o.heartbeatMs)} is not shorter than the session's heartbeat timeout (${session.heartbeatTimeoutSec} s, profile "${session.profile}"): it would expire between heartbeats; use at most ${formatMs(Math.floor(timeoutMs / 3))} (a third)`,
      );
    }
    gate.end("go\n");
    const ports = addPorts(ctx, client, o, cmd, exit, killGroup);

    let outage = false;
    let fencedSeen = false;
    client.on("fenced", (e) => {
      fencedSeen = true;
      // The refusal names the session's state and reason (a 410 for a purged one: its reason too).
      const reason = typeof e.detail?.reason === "string" ? `reason ${e.detail.reason}` : e.code;
      ctx.note(`session ${o.id} was ended by the daemon (${reason}): heartbeats stopped; waiting for ${cmd} to exit`);
    });
    client.on("warning", (w) => {
      // Told once per warning, with what can still keep the session.
      const unless = {
        idle_timeout: `unless it is busy first or extended (reaperctl extend ${o.id} 2h)`,
        max_lifetime: "when its max lifetime ends (no extension goes past it)",
        memory_pressure: "to relieve memory pressure, unless it is busy first",
      }[w.reason];
      ctx.note(
        `session ${o.id} will be reclaimed at ${w.deadline} (${relativeTime(w.deadline, Date.now())}, reason ${w.reason}) ${unless}`,
      );
    });
    client.on("retrying", (r) => {
      if (!outage) ctx.note(`heartbeat failed (${r.error.message}); retrying`);
      outage = true;
    });
    client.on("heartbeat", () => {
      if (outage) ctx.note("heartbeats resumed");
      outage = false;
    });
    client.start();
    const status = await exit;
    client.stop();
    const portsAdded = await ports;

    const waited = await closeAndReport(ctx, client, o.id, cmd, status, {
      waitReapMs: o.waitReapMs,
      waiting: waiting.signal,
      fenced: () => fencedSeen,
      signalled: () => signalled,
      killGroup,
    });
    // Not closed or not waited for: the command's own status. Else a port never added is an error.
    return !waited || portsAdded ? status : EXIT.error;
  } finally {
    untrap();
  }
}

/**
 * Closes the session once the command exited, so that the full cleanup runs (leftover
 * children, ports, paths), waits for its reap and says how it ended when that is news
 * (false: it could not be closed, or its reap was not waited for). The
 * daemon may have ended the session first: its pidfd saw the exit (engine_gone), or it
 * reaped the session (force-reap, a timeout, a close by someone else); close then answers 409.
 */
async function closeAndReport(
  ctx: Context,
  client: ReaperClient,
  id: string,
  cmd: string | undefined,
  status: number,
  o: {
    waitReapMs: number;
    waiting: AbortSignal;
    /** A heartbeat met the fence: the user was told then, and hears here how it ended. */
    fenced: () => boolean;
    /** reaperctl forwarded a signal to the command: the end was the user's. */
    signalled: () => boolean;
    killGroup: (signal: NodeJS.Signals) => void;
  },
): Promise<boolean> {
  let closedHere = false;
  for (let delay = 100; ; delay *= 2) {
    try {
      closedHere = (await client.close()) !== null;
      break;
    } catch (err) {
      if (transportFailure(err) && delay <= 5000) {
        await sleep(delay);
        continue;
      }
      ctx.note(`cannot close session ${id}: ${describe(err)}; the daemon reaps it once it sees reaperctl gone`);
      o.killGroup("SIGKILL"); // at least no process of the command stays behind
      return false;
    }
  }
  let reaped: Session;
  try {
    reaped = await client.waitForReap({ timeoutMs: o.waitReapMs, signal: o.waiting });
  } catch (err) {
    if (!o.waiting.aborted) ctx.note(`session ${id}: ${describe(err)}; not waiting for its cleanup any longer`);
    return false;
  }
  const left = reaped.leftovers.map((l) => `${l.kind} ${l.item}`).join(", ");
  const outcome = `outcome ${reaped.outcome}${left ? `: ${left}` : ""}`;
  if (!closedHere && o.fenced() && reaped.reason !== "engine_gone") {
    // Said at the fence; the reason again (the refusal may not have named it), the command's
    // status and the cleanup now.
    ctx.note(`session ${id} (reason ${reaped.reason}): ${cmd} exited with status ${status}, ${outcome}`);
  } else if (!closedHere && !o.signalled() && reaped.reason !== "engine_gone") {
    // The daemon ended it (its SIGTERM usually ends the command before a heartbeat meets
    // the fence): say so and why, or the exit status alone would leave the user guessing.
    ctx.note(
      `session ${id} was ended by the daemon (reason ${reaped.reason}); ${cmd} exited with status ${status}, ${outcome}`,
    );
  } else if (reaped.outcome !== "clean") {
    ctx.note(`session ${id} ended (${reaped.reason}) with ${outcome}`);
  }
  return true;
}

/**
 * Adds each --port to the session once the command listens on it (PATCH; the daemon checks
 * that the port is held by the session's processes), retrying every 100 ms. A port not held
 * within --wait-ports ends the command (its group is killed, as it declared a port it never
 * opened) and resolves false; true once every port is added or the command has exited.
 */
async function addPorts(
  ctx: Context,
  client: ReaperClient,
  o: RunOptions,
  cmd: string,
  exit: Promise<number>,
  killGroup: (signal: NodeJS.Signals) => void,
): Promise<boolean> {
  for (const port of o.ports) {
    const end = Date.now() + o.waitPortsMs; // each port gets --wait-ports
    for (;;) {
      let failure: unknown;
      try {
        await client.update({ ports: [port] });
        break;
      } catch (err) {
        failure = err;
      }
      const notYet = failure instanceof ReaperApiError && failure.code === "SR_PORT_NOT_OWNED";
      const retry = (notYet || transportFailure(failure)) && Date.now() < end;
      const exited = retry ? await Promise.race([exit, sleep(100)]) : null;
      if (exited !== null) return true; // the command ended: nothing more to add
      if (retry) continue;
      ctx.note(
        notYet
          ? `${cmd} did not listen on port ${port} within ${formatMs(o.waitPortsMs)} (${describe(failure)}); ending it`
          : `cannot add port ${port} to session ${o.id}: ${describe(failure)}; ending ${cmd}`,
      );
      killGroup("SIGKILL");
      return false;
    }
  }
  return true;
}
