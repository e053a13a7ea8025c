import { resolve } from "node:path";
import type { ApiResponse } from "../client/transport.js";

/** reaperctl's exit codes; `run` exits with its command's status instead, once it ran. */
export const EXIT = { ok: 0, error: 1, usage: 2, notFound: 3, unreachable: 4, auditIncomplete: 5 } as const;

/** A bad command line: exit 2, with a pointer to the command's --help. */
export class UsageError extends Error {}

export type OptionValues = Record<string, string | boolean | string[] | undefined>;

/** What every command gets from reaperctl's entry point. */
export interface Context {
  socket: string;
  json: boolean;
  /** Command options, already checked against the command's option table. */
  values: OptionValues;
  /** Positional arguments after the command words. */
  args: string[];
  /** Everything after "--" (run's command), or null when there was no "--". */
  rest: string[] | null;
  api<T = unknown>(method: string, path: string, body?: unknown): Promise<ApiResponse<T>>;
  /** Standard output (tables, JSON; nothing else). */
  out(text: string): void;
  /** One line to standard error, prefixed "reaperctl: ". */
  note(line: string): void;
  /** Calls `handler` for each forwarded signal until the returned function is called. */
  trapSignals(signals: readonly NodeJS.Signals[], handler: (signal: NodeJS.Signals) => void): () => void;
}

export function stringOption(values: OptionValues, name: string): string | undefined {
  const v = values[name];
  return typeof v === "string" ? v : undefined;
}

export function listOption(values: OptionValues, name: string): string[] {
  const v = values[name];
  return Array.isArray(v) ? v : [];
}

/** Prints the daemon's error in one line; 3 for "not found", else 1. */
export function apiFailure(ctx: Context, res: ApiResponse<unknown>): number {
  const err = (res.body as { error?: { code: string; message: string } } | null)?.error;
  ctx.note(err ? `${err.message} (${err.code})` : `HTTP ${res.status}`);
  return res.status === 404 ? EXIT.notFound : EXIT.error;
}

/**
 * --port, --path and --label as a register or PATCH body's fields (only those given): ports
 * checked as numbers, paths made absolute, labels split at the first "=".
 */
export function parseAdditions(values: OptionValues): {
  ports?: number[];
  paths?: string[];
  labels?: Record<string, string>;
} {
  const ports = listOption(values, "port").map((p) => {
    const n = Number(p);
    if (!/^\d+$/.test(p) || n < 1 || n > 65535) throw new UsageError(`--port: "${p}" is not a port number`);
    return n;
  });
  const paths = listOption(values, "path").map((p) => resolve(p));
  const labels: Record<string, string> = {};
  for (const l of listOption(values, "label")) {
    const eq = l.indexOf("=");
    if (eq < 1) throw new UsageError(`--label: "${l}" is not KEY=VALUE`);
    labels[l.slice(0, eq)] = l.slice(eq + 1);
  }
  return {
    ...(ports.length > 0 ? { ports } : {}),
    ...(paths.length > 0 ? { paths } : {}),
    ...(Object.keys(labels).length > 0 ? { labels } : {}),
  };
}
