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
import { resolve } from "node:path";
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
import { EXIT, UsageError, listOption, stringOption, type Context } from "./command.js";
import { parseDuration } from "./format.js";

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
  const ports = listOption(ctx.values, "port").map((p) => {
    const n = Number(p);
    if (!Number.isInteger(n) || n < 1 || n > 65535) throw new UsageError(`--port: "${p}" is not a port number`);
    return n;
  });
  const labels: Record<string, string> = {};
  for (const l of listOption(ctx.values, "label")) {
    const eq = l.indexOf("=");
    if (eq < 1) throw new UsageError(`--label: "${l}" is not KEY=VALUE`);
    labels[l.slice(0, eq)] = l.slice(eq + 1);
  }
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
    ports,
    paths: listOption(ctx.values, "path").map((p) => resolve(p)),
    labels,
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
  // With ports to verify, the command must run before registration (the daemon checks that
  // it listens), so it cannot wait at the gate: registration is retried until it listens.
  const gated = o.ports.length === 0;
  const child = spawn(gated ? "/bin/sh" : cmd, gated ? ["-c", GATE, cmd, ...args] : args, {
    detached: true, // its own session and process group: pgid = its pid
    stdio: gated ? ["inherit", "inherit", "inherit", "pipe"] : "inherit",
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
  const gate = gated ? (child.stdio[3] as Writable) : null;
  gate?.on("error", () => undefined); // the shell died at the gate: its exit tells the rest

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
      ...(o.ports.length > 0 ? { ports: o.ports } : {}),
      ...(o.paths.length > 0 ? { paths: o.paths } : {}),
      ...(Object.keys(o.labels).length > 0 ? { labels: o.labels } : {}),
    };

    // Register; with ports, retry every 100 ms while the command does not listen yet.
    const end = Date.now() + o.waitPortsMs;
    for (;;) {
      let failure: unknown;
      try {
        await client.register(body);
        break;
      } catch (err) {
        failure = err;
      }
      const portNotYet = failure instanceof ReaperApiError && failure.code === "SR_PORT_NOT_OWNED";
      const status = portNotYet && Date.now() < end ? await Promise.race([exit, sleep(100)]) : undefined;
      if (status === null) continue; // still running, not listening yet: try again
      killGroup("SIGKILL"); // never leave the command running unregistered
      const final = await exit;
      if (signalled) return final;
      const gone = failure instanceof ReaperApiError && failure.code === "SR_PROCESS_NOT_FOUND" && !gated;
      if (status !== undefined || gone) {
        ctx.note(`${cmd} exited with status ${final} before it listened on its ports; no session was registered`);
        return final;
      }
      ctx.note(`cannot register the session: ${describe(failure)}`);
      const unreachable =
        (failure instanceof ReaperError && failure.code === "SR_DAEMON_UNREACHABLE") ||
        (failure as { code?: unknown }).code === "ETIMEDOUT";
      return unreachable ? EXIT.unreachable : EXIT.error;
    }
    gate?.end("go\n");

    let outage = false;
    client.on("fenced", (e) =>
      ctx.note(`session ${o.id} was ended by the daemon (${e.code}): heartbeats stopped; waiting for ${cmd} to exit`),
    );
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

    // Close, so that the full cleanup runs (leftover children, ports, paths). The daemon may
    // have seen the exit first (engine_gone, through its pidfd): then close answers 409.
    for (let delay = 100; ; delay *= 2) {
      try {
        await client.close();
        break;
      } catch (err) {
        if (transportFailure(err) && delay <= 5000) {
          await sleep(delay);
          continue;
        }
        ctx.note(`cannot close session ${o.id}: ${describe(err)}; the daemon reaps it once it sees reaperctl gone`);
        killGroup("SIGKILL"); // at least no process of the command stays behind
        return status;
      }
    }
    let reaped: Session;
    try {
      reaped = await client.waitForReap({ timeoutMs: o.waitReapMs, signal: waiting.signal });
    } catch (err) {
      if (!waiting.signal.aborted)
        ctx.note(`session ${o.id}: ${describe(err)}; not waiting for its cleanup any longer`);
      return status;
    }
    if (reaped.outcome !== "clean") {
      const left = reaped.leftovers.map((l) => `${l.kind} ${l.item}`).join(", ");
      ctx.note(`session ${o.id} ended (${reaped.reason}) with outcome ${reaped.outcome}${left ? `: ${left}` : ""}`);
    }
    return status;
  } finally {
    untrap();
  }
}
