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
