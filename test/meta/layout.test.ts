import assert from "node:assert/strict";
import { readdirSync } from "node:fs";
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
