#!/usr/bin/env node
/**
 * reaperd: the daemon's entry point, and the only file that touches process signals and
 * exit codes (graphile-worker's src/main.ts). First SIGTERM/SIGINT: graceful stop. A second
 * signal, or the stop taking longer than the grace budget plus a margin: forced exit; every
 * state change is already committed, so the journal stays consistent and the next start
 * resumes what was in flight.
 */
import { parseArgs } from "node:util";
import { loadConfig } from "./config/load.js";
import { Daemon, VERSION } from "./daemon/daemon.js";
import { ReaperError, errorMessage } from "./errors.js";
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
Exit codes: 0 stopped cleanly, 1 forced stop, 70 crash, 78 invalid configuration.
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

  let daemon: Daemon;
  try {
    const config = loadConfig({ configPath: args.config, env: process.env, cwd: process.cwd() });
    daemon = new Daemon({
      config,
      notifySocket: process.env.NOTIFY_SOCKET || undefined,
      watchdogMs: watchdogIntervalMs(process.env, process.pid),
      failpoints: parseFailpoints(process.env.REAPER_FAILPOINTS),
      // A failpoint is a crash: no flush, no cleanup, exactly like the OOM killer's SIGKILL.
      crash: () => process.kill(process.pid, "SIGKILL"),
    });
    const inherited = activationFd(process.env, process.pid);
    await daemon.start();
    await daemon.listen(inherited);
    daemon.announceReady();
  } catch (err) {
    process.stderr.write(`reaperd: ${errorMessage(err)}\n`);
    return err instanceof ReaperError && err.code === "SR_CONFIG_INVALID" ? EXIT_CONFIG : EXIT_CRASH;
  }

  let stopping = false;
  const onSignal = (signal: NodeJS.Signals): void => {
    if (stopping) {
      daemon.log.warn({ signal }, "second signal: forced exit");
      daemon.loggers.flush();
      process.exit(EXIT_FORCED);
    }
    stopping = true;
    daemon.log.info({ signal }, "stopping");
    // In-flight reaps get shutdown_grace_sec, then pause at their next step boundary; a step
    // that does not reach one within FORCED_EXIT_MARGIN_SEC more forces the exit (the unit's
    // TimeoutStopSec must exceed both).
    const budgetMs = (daemon.config.reaper.shutdownGraceSec + FORCED_EXIT_MARGIN_SEC) * 1000;
    setTimeout(() => {
      daemon.log.error({ budgetMs }, "graceful stop took too long: forced exit");
      daemon.loggers.flush();
      process.exit(EXIT_FORCED);
    }, budgetMs).unref();
    daemon.stop().then(
      () => process.exit(0),
      (err: unknown) => {
        daemon.log.error({ err }, "stop failed");
        daemon.loggers.flush();
        process.exit(EXIT_CRASH);
      },
    );
  };
  process.on("SIGTERM", onSignal);
  process.on("SIGINT", onSignal);
  process.on("uncaughtException", (err) => {
    daemon.log.fatal({ err }, "uncaught exception");
    daemon.loggers.flush();
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
