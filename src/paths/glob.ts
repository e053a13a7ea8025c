/**
 * Path globs below a profile's allowed roots (the orphan sweep's `paths`): compiled, checked
 * at config load, expanded by a walk that never follows a symlink. Pure reading of
 * directories; nothing here acts.
 */
import { readdirSync } from "node:fs";
import { normalize } from "node:path";

const GLOB_CHAR = /[*?[]/;

/** One glob component as an anchored regex: `*`, `?`, `[abc]`, `[a-z]`, `[!x]`; the rest literal. */
function componentRegex(part: string): RegExp {
  let re = "";
  for (let i = 0; i < part.length; i++) {
    const ch = part[i] as string;
    if (ch === "*") re += ".*";
    else if (ch === "?") re += ".";
    else if (ch === "[" && part.indexOf("]", i + 2) > 0) {
      const end = part.indexOf("]", i + 2);
      let body = part.slice(i + 1, end).replace(/\\/g, "\\\\");
      if (body.startsWith("!")) body = "^" + body.slice(1);
      re += `[${body}]`;
      i = end;
    } else re += ch.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
  }
  return new RegExp(`^${re}$`);
}

/** A compiled glob: the literal directory it starts from, then one matcher per component. */
export interface PathGlob {
  readonly pattern: string;
  /** The literal leading directories (at least the parent of the last component). */
  readonly base: string;
  readonly parts: readonly { readonly re: RegExp; readonly dotOk: boolean }[];
}

export function compileGlob(pattern: string): PathGlob {
  const components = pattern.split("/").slice(1);
  let first = components.findIndex((c) => GLOB_CHAR.test(c));
  if (first < 0) first = components.length - 1; // a literal path: match its last component
  return {
    pattern,
    base: "/" + components.slice(0, first).join("/"),
    // As in the shell, a wildcard never matches a leading dot: only ".x*" finds ".x1".
    parts: components.slice(first).map((c) => ({ re: componentRegex(c), dotOk: c.startsWith(".") })),
  };
}

/**
 * Why a glob is not acceptable for a profile with these allowed roots, or null. Its literal
 * prefix must be an allowed root or lie below one, and it must name paths strictly below
 * that root: the sweep never looks anywhere the delete path would refuse anyway.
 */
export function globProblem(pattern: string, roots: readonly string[]): string | null {
  if (normalize(pattern) !== pattern || pattern.endsWith("/") || pattern.includes("\0")) {
    return "must be a normalized absolute path";
  }
  try {
    compileGlob(pattern);
  } catch (err) {
    return `is not a valid glob: ${(err as Error).message}`;
  }
  const components = pattern.split("/").slice(1);
  const first = components.findIndex((c) => GLOB_CHAR.test(c));
  const literal = first < 0 ? pattern : "/" + components.slice(0, first).join("/");
  const root = roots.find((r) => pattern !== r && (literal === r || literal.startsWith(r + "/")));
  if (root === undefined) {
    return `must lie strictly below one of the profile's allowed_roots (${roots.join(", ") || "none"})`;
  }
  return null;
}

/** Most paths one glob may yield per sweep (a runaway pattern must not stall the daemon). */
export const GLOB_LIMIT = 10_000;

/**
 * The paths a glob matches now. Directories are entered only when they are real directories
 * (never through a symlink met in the walk); the last component may be anything but a
 * symlink. Unreadable directories are skipped.
 */
export function expandGlob(glob: PathGlob): string[] {
  let current = [glob.base];
  glob.parts.forEach((part, i) => {
    const last = i === glob.parts.length - 1;
    const next: string[] = [];
    for (const dir of current) {
      let entries;
      try {
        entries = readdirSync(dir, { withFileTypes: true });
      } catch {
        continue;
      }
      for (const e of entries) {
        if (next.length >= GLOB_LIMIT) break;
        if (e.name.startsWith(".") && !part.dotOk) continue;
        if (!part.re.test(e.name) || e.isSymbolicLink() || (!last && !e.isDirectory())) continue;
        next.push(dir === "/" ? `/${e.name}` : `${dir}/${e.name}`);
      }
    }
    current = next;
  });
  return current;
}
