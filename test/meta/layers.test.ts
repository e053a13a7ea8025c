import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import ts from "typescript";

// The house's floors, ground first (docs/architecture.md draws them): a file may import from
// its own room, from a room of its floor, or from a lower floor; never from a higher one.
// Type-only imports count as much as any: the sources are read, not the compiled output
// (where `import type` leaves no trace).
const FLOORS: readonly (readonly string[])[] = [
  ["errors.ts", "clock.ts", "model", "pace", "native"],
  ["proc", "paths", "systemd"],
  ["config"],
  ["auth", "store"],
  ["audit", "metrics"],
  ["cleanup"],
  ["sessions"],
  ["detect"],
  ["reaper"],
  ["orphans"],
  ["http"],
  ["client"],
  ["cli"],
  ["daemon"],
  ["main.ts"],
];

const SRC = resolve(dirname(fileURLToPath(import.meta.url)), "../../../src");

function sources(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? sources(join(dir, e.name)) : e.name.endsWith(".ts") ? [join(dir, e.name)] : [],
  );
}

/** The room of a source file: its folder under src/, or the file itself at the top. */
const roomOf = (file: string): string => relative(SRC, file).split("/")[0] as string;

function floorOf(room: string): number {
  const i = FLOORS.findIndex((f) => f.includes(room));
  assert.ok(i >= 0, `src/${room} is on no floor: add it to FLOORS here and to docs/architecture.md`);
  return i;
}

/** Every file's imports of files of this project (static, dynamic, type-only, re-exports). */
function importGraph(): Map<string, string[]> {
  const graph = new Map<string, string[]>();
  for (const file of sources(SRC)) {
    const info = ts.preProcessFile(readFileSync(file, "utf8"), true, true);
    const targets = info.importedFiles
      .map((f) => f.fileName)
      .filter((spec) => spec.startsWith("."))
      .map((spec) => resolve(dirname(file), spec.replace(/\.js$/, ".ts")));
    graph.set(file, targets);
  }
  return graph;
}

test("no import runs from a lower floor to a higher one", () => {
  const graph = importGraph();
  const up: string[] = [];
  for (const [file, targets] of graph) {
    const from = floorOf(roomOf(file));
    for (const target of targets) {
      assert.ok(graph.has(target), `${relative(SRC, file)} imports ${relative(SRC, target)}, which is no source file`);
      if (floorOf(roomOf(target)) > from) up.push(`src/${relative(SRC, file)} -> src/${relative(SRC, target)}`);
    }
  }
  assert.deepEqual(up, [], `imports running back up:\n${up.join("\n")}`);
});

test("no circle of imports between files", () => {
  const graph = importGraph();
  const state = new Map<string, "open" | "done">();
  const circles: string[] = [];
  const visit = (file: string, path: string[]): void => {
    state.set(file, "open");
    for (const next of graph.get(file) ?? []) {
      if (state.get(next) === "open") {
        circles.push([...path.slice(path.indexOf(next)), next].map((f) => relative(SRC, f)).join(" -> "));
      } else if (!state.has(next)) visit(next, [...path, next]);
    }
    state.set(file, "done");
  };
  for (const file of graph.keys()) if (!state.has(file)) visit(file, [file]);
  assert.deepEqual(circles, []);
});

test("the floors name every room of src/, and only those", () => {
  const rooms = new Set(sources(SRC).map(roomOf));
  assert.deepEqual([...rooms].sort(), FLOORS.flat().slice().sort());
});

test("one door to a transaction: only the audit trail opens one on the store (audit/audit.ts), so every decision commits with its audit line", () => {
  const found: string[] = [];
  for (const file of sources(SRC)) {
    const room = roomOf(file);
    if (room === "store" || room === "audit") continue;
    const text = readFileSync(file, "utf8");
    // `store.transaction(`, `this.store.transaction(`, `deps.store.transaction(`, `db.transaction(`.
    for (const m of text.matchAll(/\b(?:store|db)\s*\.\s*transaction\s*\(/g)) {
      const line = text.slice(0, m.index).split("\n").length;
      found.push(`${relative(SRC, file)}:${line}`);
    }
  }
  assert.deepEqual(found, [], "open transactions through AuditTrail.transaction or commitSoon");
});
