import pino, { type Logger } from "pino";
import type { Clock } from "../clock.js";
import type { LogLevel } from "../config/load.js";
import { LogSink } from "./sink.js";

export interface Loggers {
  /** Operational lines, at the configured level. */
  log: Logger;
  /** Audit lines: always written, whatever the operational level (unless "silent"). */
  audit: Logger;
  /** Flushes buffered lines; call before exit. */
  flush(): void;
  /** The file or stdout sink (null when a stream was given): counts lines it could not write. */
  sink: LogSink | null;
}

/**
 * One pino instance writes both kinds of line to stdout (journald) or a file. The clock is
 * injected so that log times and stored event times agree, also under a fake clock in tests.
 */
export function createLogger(opts: {
  level: LogLevel;
  file: string;
  clock: Clock;
  stream?: pino.DestinationStream;
}): Loggers {
  // Synchronous writes: a daemon killed with SIGKILL (OOM killer, failpoint) must not lose
  // audit lines sitting in a buffer. Lines are few (per decision, never per heartbeat).
  // A failing sink drops lines and counts them, never throws (src/audit/sink.ts).
  const sink = opts.stream === undefined ? new LogSink(opts.file) : null;
  const destination: pino.DestinationStream = opts.stream ?? (sink as LogSink);
  const root = pino(
    {
      level: opts.level === "silent" ? "silent" : "trace",
      base: { service: "session-reaper" },
      timestamp: () => `,"time":"${new Date(opts.clock.now()).toISOString()}"`,
      formatters: { level: (label) => ({ level: label }) },
      redact: { paths: ["authorization", "*.authorization", "token", "*.token"], censor: "[redacted]" },
    },
    destination,
  );
  const log = root.child({}, { level: opts.level });
  const audit = root.child({ audit: true }, { level: opts.level === "silent" ? "silent" : "info" });
  return {
    log,
    audit,
    sink,
    flush() {
      const d = destination as { flushSync?: () => void };
      try {
        d.flushSync?.();
      } catch {
        // a stream that is not ready yet has nothing to flush
      }
    },
  };
}
