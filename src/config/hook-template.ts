/**
 * Hook argv templates: an item of a close or release hook's argv may name the session's
 * facts, `["redis-cli", "-p", "{port}", "shutdown", "nosave"]`. Each item is expanded on its
 * own, with no shell, so a value never splits into more items or runs as code. Checked at
 * config load (an unknown placeholder is a configuration error naming the key) and expanded
 * per reap (a value the session does not have fails the hook, with a detail that says which).
 */
import { basename } from "node:path";
import type { Session } from "../model/session.js";

/** The placeholders, in the order of docs/configuration.md; `{label:NAME}` is one more form. */
export const PLACEHOLDERS = ["id", "pid", "uid", "port", "ports", "path", "paths"] as const;

/**
 * `{name}` (lowercase letters and underscores) or `{label:…}`. Anything else in braces is left as written, so
 * a shell's `${SESSION_PORTS%%,*}` or a JSON argument keeps its braces.
 */
const TOKEN = /\{([a-z][a-z_]*|label:[^{}]*)\}/g;
const SHELLS = new Set(["sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "fish"]);
const LABEL = /^label:([A-Za-z0-9][A-Za-z0-9_./-]{0,62})$/;

/** A hook's argv that cannot be expanded for this session: the hook fails with this text. */
export class TemplateError extends Error {}

/**
 * The first problem with an argv's placeholders, or null: an unknown name, a lone brace. For
 * the config loader, which names the key.
 */
export function templateProblem(argv: readonly string[], extra: readonly string[] = []): string | null {
  // A value spliced into a shell script would run as code (a label is the registrant's
  // text; release hooks run as the daemon's user): pass it as a positional parameter.
  const shell = SHELLS.has(basename(argv[0] ?? "")) && argv[1] === "-c";
  if (shell && argv[2] !== undefined && [...argv[2].matchAll(TOKEN)].length > 0) {
    return `item 2: a placeholder inside a "${argv[0]} -c" script would be run as shell code; pass it as a positional parameter instead: ["${argv[0]}", "-c", '… "$1" …', "sh", "{port}"]`;
  }
  for (const [i, item] of argv.entries()) {
    for (const [, name] of item.matchAll(TOKEN)) {
      if (!isPlaceholder(name as string) && !extra.includes(name as string)) {
        return `item ${i}: unknown placeholder "{${name}}" (known: ${[...PLACEHOLDERS, ...extra].map((p) => `{${p}}`).join(", ")}, {label:NAME})`;
      }
    }
  }
  return null;
}

function isPlaceholder(name: string): boolean {
  return (PLACEHOLDERS as readonly string[]).includes(name) || LABEL.test(name);
}

/**
 * The argv with every placeholder replaced by the session's value, or by `extra`'s (the
 * placeholders a kind of hook adds: a warning's `{reason}` and `{in_sec}`); throws TemplateError.
 */
export function expandArgv(
  argv: readonly string[],
  session: Session,
  extra: Readonly<Record<string, string>> = {},
): string[] {
  return argv.map((item) =>
    item.replace(TOKEN, (_whole, name: string) =>
      Object.hasOwn(extra, name) ? (extra[name] as string) : valueOf(name, session),
    ),
  );
}

function valueOf(name: string, s: Session): string {
  switch (name) {
    case "id":
      return s.id;
    case "pid":
      return String(s.engine.pid);
    case "uid":
      return String(s.engine.uid);
    case "port":
    case "ports":
      if (s.ports.length === 0) throw new TemplateError(`{${name}}: the session registered no port`);
      return name === "port" ? String(s.ports[0]) : s.ports.join(",");
    case "path":
    case "paths":
      if (s.paths.length === 0) throw new TemplateError(`{${name}}: the session registered no path`);
      return name === "path" ? (s.paths[0] as string) : s.paths.join(":");
  }
  const label = LABEL.exec(name)?.[1];
  if (label !== undefined) {
    if (!Object.hasOwn(s.labels, label))
      throw new TemplateError(`{label:${label}}: the session has no label "${label}"`);
    const value = s.labels[label] as string;
    // The registrant's text: it may not pass for an option of the hook's program.
    if (value.startsWith("-")) {
      throw new TemplateError(
        `{label:${label}}: the value "${value}" begins with "-" and could be taken for an option`,
      );
    }
    return value;
  }
  throw new TemplateError(`unknown placeholder "{${name}}"`); // load.ts refused it already
}
