import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync, readdirSync } from "node:fs";
import { join, relative } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

// `npm test` runs dist/test/*/*.test.js (Node 20 has no glob of its own, and its directory
// mode would also run the fixtures): a test file at any other depth would silently not run.
test("every test file sits exactly one folder below test/", () => {
  const root = fileURLToPath(new URL("../../../test/", import.meta.url));
  const misplaced: string[] = [];
  const walk = (dir: string): void => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith(".test.ts") && relative(root, p).split("/").length !== 2) misplaced.push(p);
    }
  };
  walk(root);
  assert.deepEqual(misplaced, []);
});

// A clone holds only this repository: a link or a reference to a file outside it (a design
// document beside the checkout) leads a reader nowhere.
test("no tracked file points outside the repository", () => {
  const root = fileURLToPath(new URL("../../../", import.meta.url));
  const files = execFileSync("git", ["ls-files"], { cwd: root, encoding: "utf8" }).split("\n").filter(Boolean);
  const outside: string[] = [];
  for (const f of files) {
    if (!/\.(md|ts|js|py|toml|ya?ml|json|service|socket|conf)$/.test(f) || f === "package-lock.json") continue;
    const text = readFileSync(join(root, f), "utf8");
    for (const [i, line] of text.split("\n").entries()) {
      if (/\]\(\.\.\/|\.\.\/shared\/|DESIGN\.md/.test(line)) outside.push(`${f}:${i + 1}: ${line.trim()}`);
    }
  }
  assert.deepEqual(outside, []);
});
