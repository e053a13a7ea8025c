#!/usr/bin/env node
/**
 * reaperd: the daemon's entry point, and the only file that touches process signals and
 * exit codes (graphile-worker's src/main.ts). First SIGTERM/SIGINT: graceful stop. A second
 * signal, or the stop taking longer than the grace budget plus a margin: forced exit; every
 * state change is already committed, so the journal stays consistent and the next start
 * resumes what was in flight. SIGHUP (logrotate's postrotate, `systemctl reload`) reopens the
 * log file and never stops the daemon (its default action would).
 */
import { parseArgs } from "node:util";
import { loadConfig } from "./config/load.js";
import { Daemon, VERSION } from "./daemon/daemon.js";
import { START_REFUSALS, ReaperError, errorMessage } from "./errors.js";
import { socketHolder } from "./http/listen.js";
import { activationFd, watchdogIntervalMs } from "./systemd/notify.js";
import { FAILPOINTS } from "./reaper/reaper.js";

/** sysexits.h EX_CONFIG: systemd units may list it in RestartPreventExitStatus=. */
export const EXIT_CONFIG = 78;
export const EXIT_FORCED = 1;
export const EXIT_CRASH = 70;
const FORCED_EXIT_MARGIN_SEC = 5;

const USAGE = `Usage: reaperd [--config FILE]

Runs the session-reaper daemon.

Options:
  -c, --config FILE   configuration file (TOML); default: $REAPER_CONFIG,
                      then $CONFIGURATION_DIRECTORY/config.toml, then
                      /etc/session-reaper/config.toml if present, else built-in defaults
  -h, --help          show this help
  -V, --version       print the version

Environment: REAPER_CONFIG, REAPER_SOCKET, REAPER_DB, REAPER_LOG_LEVEL override the file.
Exit codes: 0 stopped cleanly, 1 forced stop, 2 usage error, 70 crash,
  78 refused to start: invalid configuration, another daemon holds the database
  or answers on the socket, or the database is corrupt or cannot be written.
`;

async function main(): Promise<number | null> {
  let args;
  try {
    args = parseArgs({
      options: {
        config: { type: "string", short: "c" },
        help: { type: "boolean", short: "h" },
        version: { type: "boolean", short: "V" },
      },
    }).values;
  } catch (err) {
    process.stderr.write(`reaperd: ${errorMessage(err)}\n\n${USAGE}`);
    return 2;
  }
  if (args.help) return (process.stdout.write(USAGE), 0);
  if (args.version) return (process.stdout.write(`${VERSION}\n`), 0);

  let daemon: Daemon | undefined;
  // From the first moment, whoever sends it: a SIGHUP during the start is acted on once running.
  let hangupWhileStarting = false;
  let onHangup = (): void => void (hangupWhileStarting = true);
  process.on("SIGHUP", () => onHangup());
  try {
    const config = loadConfig({ configPath: args.config, env: process.env, cwd: process.cwd() });
    const inherited = activationFd(process.env, process.pid);
    // Before anything is opened or written: a socket another daemon answers on means that
    // daemon owns this host's sessions (the database lock is checked next, in Daemon).
    const holder = inherited === null ? await socketHolder(config.api.socket) : false;
    if (holder !== false) {
      throw new ReaperError(
        "SR_ALREADY_RUNNING",
        `another daemon${holder === null ? "" : ` (pid ${holder})`} is already listening on ${config.api.socket}: stop it first, or give this one another api.socket`,
        { holder },
      );
    }
    daemon = new Daemon({
      config,
      notifySocket: process.env.NOTIFY_SOCKET || undefined,
      watchdogMs: watchdogIntervalMs(process.env, process.pid),
      failpoints: parseFailpoints(process.env.REAPER_FAILPOINTS),
      // A failpoint is a crash: no flush, no cleanup, exactly like the OOM killer's SIGKILL.
      crash: () => process.kill(process.pid, "SIGKILL"),
    });
    await daemon.start(inherited);
    await daemon.listen(inherited);
    daemon.announceReady();
  } catch (err) {
    process.stderr.write(`reaperd: ${errorMessage(err)}\n`);
    // A daemon that started but cannot serve is stopped as any other (reaps paused at a step
    // boundary, the store closed, its empty cgroup base and the lock removed), within a bound:
    // nothing half-started is left behind for the next start to trip on.
    if (daemon !== undefined) {
      const started = daemon;
      await Promise.race([
        started.stop().catch(() => undefined),
        new Promise((r) =>
          setTimeout(r, (started.config.reaper.shutdownGraceSec + FORCED_EXIT_MARGIN_SEC) * 1000).unref(),
        ),
      ]);
      started.loggers.flush();
    }
    // Exit now: timers and handles a half-started daemon opened would keep it alive with no
    // socket (a daemon that cannot serve must not look alive to systemd).
    process.exit(err instanceof ReaperError && START_REFUSALS.has(err.code) ? EXIT_CONFIG : EXIT_CRASH);
  }
  const running = daemon;
  onHangup = () => running.reopenLog();
  if (hangupWhileStarting) running.reopenLog();

  let stopping = false;
  const onSignal = (signal: NodeJS.Signals): void => {
    if (stopping) {
      running.log.warn({ signal }, "second signal: forced exit");
      running.loggers.flush();
      process.exit(EXIT_FORCED);
    }
    stopping = true;
    running.log.info({ signal }, "stopping");
    // In-flight reaps get shutdown_grace_sec, then pause at their next step boundary; a step
    // that does not reach one within FORCED_EXIT_MARGIN_SEC more forces the exit (the unit's
    // TimeoutStopSec must exceed both).
    const budgetMs = (running.config.reaper.shutdownGraceSec + FORCED_EXIT_MARGIN_SEC) * 1000;
    setTimeout(() => {
      running.log.error({ budgetMs }, "graceful stop took too long: forced exit");
      running.loggers.flush();
      process.exit(EXIT_FORCED);
    }, budgetMs).unref();
    running.stop().then(
      () => process.exit(0),
      (err: unknown) => {
        running.log.error({ err }, "stop failed");
        running.loggers.flush();
        process.exit(EXIT_CRASH);
      },
    );
  };
  process.on("SIGTERM", onSignal);
  process.on("SIGINT", onSignal);
  process.on("uncaughtException", (err) => {
    // The log sink never throws (src/audit/sink.ts); stderr is the fallback of last resort.
    try {
      running.log.fatal({ err }, "uncaught exception");
      running.loggers.flush();
    } catch {
      try {
        process.stderr.write(`reaperd: uncaught exception: ${errorMessage(err)}\n`);
      } catch {
        // nowhere left to say it
      }
    }
    process.exit(EXIT_CRASH);
  });
  return null; // keep running
}

/** REAPER_FAILPOINTS=after-terminate,after-fence: crash-safety testing only. */
function parseFailpoints(value: string | undefined): ReadonlySet<string> {
  const names = (value ?? "").split(",").filter(Boolean);
  const unknown = names.filter((n) => !FAILPOINTS.includes(n));
  if (unknown.length > 0) {
    throw new ReaperError(
      "SR_CONFIG_INVALID",
      `REAPER_FAILPOINTS: unknown failpoint ${unknown.join(", ")} (known: ${FAILPOINTS.join(", ")})`,
    );
  }
  return new Set(names);
}

main().then(
  (code) => {
    if (code !== null) process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`reaperd: ${errorMessage(err)}\n`);
    process.exitCode = EXIT_CRASH;
  },
);
