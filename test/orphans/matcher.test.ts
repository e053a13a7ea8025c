import assert from "node:assert/strict";
import { mkdirSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { compileGlob, expandGlob } from "../../src/paths/glob.js";
import { readCmdline, readExe, startedAtMs } from "../../src/proc/stat.js";
import { readStat } from "../../src/proc/stat.js";
import { sleeper, tempDir } from "../helpers.js";

test("globs: *, ? and [...] within one component; no leading dot; symlinks never entered nor matched", (t) => {
  const dir = tempDir(t);
  for (const d of ["e-1/x", "e-2/x", "e-10/y", ".e-3/x", "f-1/x", "real"]) mkdirSync(join(dir, d), { recursive: true });
  writeFileSync(join(dir, "e-file"), "");
  symlinkSync(join(dir, "real"), join(dir, "e-link")); // matches e-* by name: skipped
  symlinkSync(join(dir, "real"), join(dir, "e-9"));
  mkdirSync(join(dir, "real", "x"));

  const expand = (pattern: string): string[] => expandGlob(compileGlob(pattern)).sort();
  assert.deepEqual(
    expand(join(dir, "e-*")),
    ["e-1", "e-10", "e-2", "e-file"].map((n) => join(dir, n)),
  );
  assert.deepEqual(
    expand(join(dir, "e-?")),
    ["e-1", "e-2"].map((n) => join(dir, n)),
  );
  assert.deepEqual(expand(join(dir, "e-[!1]")), [join(dir, "e-2")]);
  assert.deepEqual(
    expand(join(dir, "[ef]-1")),
    ["e-1", "f-1"].map((n) => join(dir, n)),
  );
  // Through directories only (e-file and the symlinks are not entered).
  assert.deepEqual(
    expand(join(dir, "e-*", "x")),
    ["e-1/x", "e-2/x"].map((n) => join(dir, n)),
  );
  assert.deepEqual(expand(join(dir, ".e-*")), [join(dir, ".e-3")]);
  assert.deepEqual(expand(join(dir, "e-1")), [join(dir, "e-1")]); // a literal path
  assert.deepEqual(expand(join(dir, "missing", "*")), []);
  // Regex characters in names are literal.
  assert.ok(compileGlob("/tmp/a.b+*").parts[0]?.re.test("a.b+c"));
  assert.ok(!compileGlob("/tmp/a.b+*").parts[0]?.re.test("aXb+c"));
});

test("process facts: command line, executable and start time (ms since the epoch) from /proc", (t) => {
  const before = Date.now();
  const child = sleeper(t);
  const stat = readStat(child.pid);
  assert.ok(stat);
  assert.equal(readCmdline(child.pid), "sleep 30");
  assert.match(readExe(child.pid) ?? "", /\/sleep$/);
  // /proc/stat's btime has one-second resolution.
  const started = startedAtMs(stat.startTime);
  assert.ok(Math.abs(started - before) < 3000, `started ${started - before} ms from spawn`);
  assert.equal(readCmdline(2 ** 22 + 1), null);
  assert.equal(readExe(2 ** 22 + 1), null);
});
