/** Aligned columns; with a header, the first row is the header. */
export function table(rows: readonly (readonly string[])[], header = false): string {
  const widths: number[] = [];
  for (const row of rows) row.forEach((cell, i) => (widths[i] = Math.max(widths[i] ?? 0, cell.length)));
  const lines = rows.map((row) =>
    row
      .map((cell, i) => (i === row.length - 1 ? cell : cell.padEnd(widths[i] ?? 0)))
      .join("  ")
      .trimEnd(),
  );
  if (header && lines.length === 1) lines.push("(none)");
  return lines.join("\n") + "\n";
}

/** "1 process", "2 processes". */
export function plural(n: number, one: string, many: string): string {
  return `${n} ${n === 1 ? one : many}`;
}

/** "in 12s", "3m ago", "2h ago", "in 1d". */
export function relativeTime(iso: string, now: number): string {
  const ms = Date.parse(iso) - now;
  const abs = Math.abs(ms);
  const units: [number, string][] = [
    [86_400_000, "d"],
    [3_600_000, "h"],
    [60_000, "m"],
    [1_000, "s"],
  ];
  const [size, unit] = units.find(([size]) => abs >= size) ?? [1_000, "s"];
  const n = Math.floor(abs / size);
  return ms >= 0 ? `in ${n}${unit}` : `${n}${unit} ago`;
}

const UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/**
 * A duration as operators write it: "30s", "10m", "2h", "1d", "500ms", combined ("1h30m"),
 * or a bare number of seconds. Milliseconds, or null when the text is not a duration.
 */
export function parseDuration(text: string): number | null {
  if (/^\d+(\.\d+)?$/.test(text)) return Number(text) * 1000;
  if (!/^(\d+(\.\d+)?(ms|s|m|h|d))+$/.test(text)) return null;
  let ms = 0;
  for (const [, n, unit] of text.matchAll(/(\d+(?:\.\d+)?)(ms|s|m|h|d)/g))
    ms += Number(n) * (UNIT_MS[unit as string] ?? 0);
  return ms;
}

/** Milliseconds as a duration parseDuration reads back: "500ms", "10s", "1.5s". */
export function formatMs(ms: number): string {
  return ms < 1000 || ms % 100 !== 0 ? `${ms}ms` : `${ms / 1000}s`;
}
