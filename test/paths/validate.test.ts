import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import {
  chmodSync,
  chownSync,
  existsSync,
  lchownSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  renameSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { pino } from "pino";
import { ReaperError } from "../../src/errors.js";
import { removePath } from "../../src/paths/remove.js";
import { checkPath } from "../../src/paths/validate.js";
import { tempDir } from "../helpers.js";

const OTHER_UID = 12345;
const OTHER_GID = 12345;
const log = pino({ level: "silent" });

function assertCode(code: string): (err: unknown) => boolean {
  return (err: unknown) => {
    assert.ok(err instanceof ReaperError, `expected a ReaperError, got ${String(err)}`);
    assert.equal(err.code, code);
    return true;
  };
}

/** An allowed root (a fresh temp dir) and a path "outside" it (a sibling temp dir). */
function rootAndOutside(t: { after: (fn: () => void) => void }): { root: string; outside: string } {
  return { root: tempDir(t, "sr-root-"), outside: tempDir(t, "sr-outside-") };
}

function signal(): AbortSignal {
  return new AbortController().signal;
}

// --- checkPath -------------------------------------------------------------------------------

test("a relative path is SR_INVALID_PATH", (t) => {
  const root = tempDir(t);
  for (const p of ["relative/x", "./x", "x", ""]) {
    assert.throws(() => checkPath(p, [root], 0), assertCode("SR_INVALID_PATH"), p);
  }
});

test("a non-normalized path is SR_INVALID_PATH", (t) => {
  const root = tempDir(t);
  for (const p of [`${root}/a/../b`, `${root}/a//b`, `${root}/a/`, `${root}/./a`, `${root}/a/..`, `${root}/a\0b`]) {
    assert.throws(() => checkPath(p, [root], 0), assertCode("SR_INVALID_PATH"), JSON.stringify(p));
  }
  assert.throws(() => checkPath("/a/../b", ["/a"], 0), assertCode("SR_INVALID_PATH"));
  assert.throws(() => checkPath("/a//b", ["/a"], 0), assertCode("SR_INVALID_PATH"));
});

test("an allowed root itself, or /, is SR_INVALID_PATH", (t) => {
  const root = tempDir(t);
  assert.throws(() => checkPath(root, [root], 0), assertCode("SR_INVALID_PATH"));
  assert.throws(() => checkPath("/", [root], 0), assertCode("SR_INVALID_PATH"));
  assert.throws(() => checkPath(`${root}/`, [root], 0), assertCode("SR_INVALID_PATH"));
});

test("a path outside every allowed root is SR_PATH_OUTSIDE_ROOT", (t) => {
  const { root, outside } = rootAndOutside(t);
  assert.throws(() => checkPath(join(outside, "x"), [root], 0), assertCode("SR_PATH_OUTSIDE_ROOT"));
  assert.throws(() => checkPath("/etc", [root], 0), assertCode("SR_PATH_OUTSIDE_ROOT"));
  assert.throws(() => checkPath("/etc/passwd", [root], 0), assertCode("SR_PATH_OUTSIDE_ROOT"));
  assert.throws(() => checkPath(join(root, "x"), [], 0), assertCode("SR_PATH_OUTSIDE_ROOT"));
});

test('"/tmp-evil/x" is not below root "/tmp" (no string-prefix trick)', (t) => {
  const root = tempDir(t);
  assert.throws(() => checkPath("/tmp-evil/x", ["/tmp"], 0), assertCode("SR_PATH_OUTSIDE_ROOT"));
  assert.throws(() => checkPath(`${root}-evil/x`, [root], 0), assertCode("SR_PATH_OUTSIDE_ROOT"));
  assert.throws(() => checkPath(`${root}x`, [root], 0), assertCode("SR_PATH_OUTSIDE_ROOT"));
});

test("an allowed root that is not an existing directory admits nothing", (t) => {
  const dir = tempDir(t);
  writeFileSync(join(dir, "file"), "");
  assert.throws(() => checkPath(join(dir, "file", "x"), [join(dir, "file")], 0), assertCode("SR_PATH_OUTSIDE_ROOT"));
  assert.throws(() => checkPath(join(dir, "gone", "x"), [join(dir, "gone")], 0), assertCode("SR_PATH_OUTSIDE_ROOT"));
});

test("a symlinked component is SR_PATH_SYMLINK", (t) => {
  const { root, outside } = rootAndOutside(t);
  mkdirSync(join(outside, "inner"));
  symlinkSync(outside, join(root, "link"));
  assert.throws(() => checkPath(join(root, "link"), [root], 0), assertCode("SR_PATH_SYMLINK"));
  assert.throws(() => checkPath(join(root, "link", "inner"), [root], 0), assertCode("SR_PATH_SYMLINK"));
  assert.throws(() => checkPath(join(root, "link", "not-there"), [root], 0), assertCode("SR_PATH_SYMLINK"));
  // Deeper down, too.
  mkdirSync(join(root, "real", "deep"), { recursive: true });
  symlinkSync("/etc", join(root, "real", "deep", "etc"));
  assert.throws(() => checkPath(join(root, "real", "deep", "etc", "passwd"), [root], 0), assertCode("SR_PATH_SYMLINK"));
  // A dangling symlink is still a symlink.
  symlinkSync(join(outside, "nothing"), join(root, "dangling"));
  assert.throws(() => checkPath(join(root, "dangling"), [root], 0), assertCode("SR_PATH_SYMLINK"));
});

test("a path owned by another uid is SR_PATH_NOT_OWNED", (t) => {
  const root = tempDir(t);
  const file = join(root, "theirs");
  writeFileSync(file, "x");
  chownSync(file, OTHER_UID, OTHER_GID);
  assert.throws(() => checkPath(file, [root], 0), assertCode("SR_PATH_NOT_OWNED"));
  const ok = checkPath(file, [root], OTHER_UID);
  assert.equal(ok.path, file);
  assert.equal(ok.root, root);
  assert.equal(ok.stat?.uid, OTHER_UID);
});

/**
 * A temp dir holding `mountPoint` with a real tmpfs mounted on it; unmounted before the dir is
 * removed (one hook, so the order is certain).
 */
function dirWithMount(t: { after: (fn: () => void) => void }, mountPoint: string): string {
  const dir = mkdtempSync(join(tmpdir(), "sr-mnt-"));
  const mnt = join(dir, mountPoint);
  mkdirSync(mnt, { recursive: true });
  execFileSync("mount", ["-t", "tmpfs", "-o", "size=1m", "sr-test", mnt]);
  t.after(() => {
    execFileSync("umount", [mnt]);
    rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}

test("a path on another file system than its root is SR_PATH_OTHER_FS", (t) => {
  const root = dirWithMount(t, "mnt");
  writeFileSync(join(root, "mnt", "f"), "x");
  assert.notEqual(lstatSync(join(root, "mnt")).dev, lstatSync(root).dev);
  assert.throws(() => checkPath(join(root, "mnt"), [root], 0), assertCode("SR_PATH_OTHER_FS"));
  assert.throws(() => checkPath(join(root, "mnt", "f"), [root], 0), assertCode("SR_PATH_OTHER_FS"));
  assert.throws(() => checkPath(join(root, "mnt", "later"), [root], 0), assertCode("SR_PATH_OTHER_FS"));
});

test("an existing path owned by the uid is accepted with its lstat", (t) => {
  const root = tempDir(t);
  mkdirSync(join(root, "a", "b"), { recursive: true });
  const r = checkPath(join(root, "a", "b"), [root], 0);
  assert.equal(r.path, join(root, "a", "b"));
  assert.equal(r.root, root);
  assert.ok(r.stat?.isDirectory());
});

test("a path that does not exist yet below the root is accepted, with a null stat", (t) => {
  const root = tempDir(t);
  const r = checkPath(join(root, "later", "deeper"), [root], OTHER_UID);
  assert.deepEqual(r, { path: join(root, "later", "deeper"), root, stat: null });
  mkdirSync(join(root, "half"));
  assert.equal(checkPath(join(root, "half", "missing"), [root], 0).stat, null);
});

test("the first allowed root containing the path is the one reported", (t) => {
  const a = tempDir(t);
  const b = tempDir(t);
  assert.equal(checkPath(join(b, "x"), [a, b], 0).root, b);
  assert.equal(checkPath(join(a, "x"), [a, b], 0).root, a);
});

// --- removePath ------------------------------------------------------------------------------

test("removePath deletes a real nested tree", async (t) => {
  const root = tempDir(t);
  const dir = join(root, "engine-tmp");
  mkdirSync(join(dir, "nested", "deeper"), { recursive: true });
  writeFileSync(join(dir, "engine.log"), "log");
  writeFileSync(join(dir, "nested", "deeper", "spill.bin"), Buffer.alloc(4096, 7));
  const r = await removePath(dir, [root], 0, log, signal());
  assert.deepEqual(r, { status: "removed", attempts: 1 });
  assert.equal(existsSync(dir), false);
  assert.equal(existsSync(root), true, "the root itself was deleted");
});

test("removePath deletes a single file", async (t) => {
  const root = tempDir(t);
  writeFileSync(join(root, "f"), "x");
  assert.deepEqual(await removePath(join(root, "f"), [root], 0, log, signal()), { status: "removed", attempts: 1 });
  assert.equal(existsSync(join(root, "f")), false);
});

test("removePath on an absent path reports absent", async (t) => {
  const root = tempDir(t);
  assert.deepEqual(await removePath(join(root, "never"), [root], 0, log, signal()), { status: "absent", attempts: 1 });
});

test("removePath refuses what checkPath refuses, and deletes nothing", async (t) => {
  const { root, outside } = rootAndOutside(t);
  writeFileSync(join(outside, "canary"), "alive");
  for (const p of [outside, join(outside, "canary"), root, `${root}/../${outside.split("/").pop() ?? ""}`]) {
    const r = await removePath(p, [root], 0, log, signal());
    assert.equal(r.status, "refused", p);
  }
  assert.equal(readFileSync(join(outside, "canary"), "utf8"), "alive");
  assert.ok(existsSync(root));
});

test("a parent swapped for a symlink after registration is refused at delete time; the target survives", async (t) => {
  const { root, outside } = rootAndOutside(t);
  const registered = join(root, "work", "job");
  mkdirSync(registered, { recursive: true });
  writeFileSync(join(registered, "data"), "engine data");
  checkPath(registered, [root], 0); // passes at registration

  // The attack: "work" becomes a symlink to a directory outside the root with a "job" in it.
  mkdirSync(join(outside, "job"));
  writeFileSync(join(outside, "job", "canary"), "must survive");
  renameSync(join(root, "work"), join(root, "work.orig"));
  symlinkSync(outside, join(root, "work"));

  const r = await removePath(registered, [root], 0, log, signal());
  assert.equal(r.status, "refused");
  assert.equal(readFileSync(join(outside, "job", "canary"), "utf8"), "must survive");
  assert.ok(lstatSync(join(root, "work")).isSymbolicLink());
  assert.ok(existsSync(join(root, "work.orig", "job", "data")));
});

test("a symlink planted inside the tree is deleted as a link; its target outside the root survives", async (t) => {
  const { root, outside } = rootAndOutside(t);
  writeFileSync(join(outside, "canary"), "must survive");
  mkdirSync(join(outside, "sub"));
  writeFileSync(join(outside, "sub", "canary2"), "must survive too");
  const dir = join(root, "engine");
  mkdirSync(join(dir, "a"), { recursive: true });
  symlinkSync(outside, join(dir, "a", "escape-dir"));
  symlinkSync(join(outside, "canary"), join(dir, "escape-file"));

  const r = await removePath(dir, [root], 0, log, signal());
  assert.deepEqual(r, { status: "removed", attempts: 1 });
  assert.equal(existsSync(dir), false);
  assert.equal(readFileSync(join(outside, "canary"), "utf8"), "must survive");
  assert.equal(readFileSync(join(outside, "sub", "canary2"), "utf8"), "must survive too");
});

/** A world-traversable root, like /tmp, so that a non-root uid can work below it. */
function sharedRoot(t: { after: (fn: () => void) => void }): string {
  const root = tempDir(t, "sr-shared-");
  chmodSync(root, 0o1777);
  return root;
}

test("as root, removePath deletes another uid's tree (running rm as that uid)", async (t) => {
  const root = sharedRoot(t);
  const dir = join(root, "theirs");
  mkdirSync(join(dir, "nested", "deeper"), { recursive: true });
  writeFileSync(join(dir, "nested", "deeper", "f"), "x");
  writeFileSync(join(dir, "g"), "y");
  symlinkSync("/etc/passwd", join(dir, "link"));
  for (const p of [dir, join(dir, "nested"), join(dir, "nested", "deeper"), join(dir, "nested", "deeper", "f")]) {
    chownSync(p, OTHER_UID, OTHER_GID);
  }
  chownSync(join(dir, "g"), OTHER_UID, OTHER_GID);
  lchownSync(join(dir, "link"), OTHER_UID, OTHER_GID);

  const r = await removePath(dir, [root], OTHER_UID, log, signal());
  assert.deepEqual(r, { status: "removed", attempts: 1 });
  assert.equal(existsSync(dir), false);
  assert.ok(existsSync("/etc/passwd"));
});

test("as root, removePath cannot delete a root-owned file inside another uid's tree (rm runs as that uid)", async (t) => {
  assert.equal(process.geteuid?.(), 0, "this test proves the uid drop and must run as root");
  const root = sharedRoot(t);
  const dir = join(root, "theirs");
  mkdirSync(dir);
  writeFileSync(join(dir, "mine"), "user file");
  chownSync(dir, OTHER_UID, OTHER_GID);
  chownSync(join(dir, "mine"), OTHER_UID, OTHER_GID);
  // A root-owned 0755 subdir with a root-owned file: root could delete it, uid 12345 cannot.
  const sub = join(dir, "rootsub");
  mkdirSync(sub, { mode: 0o755 });
  chmodSync(sub, 0o755);
  writeFileSync(join(sub, "root-file"), "root's");

  const r = await removePath(dir, [root], OTHER_UID, log, signal());
  assert.equal(r.status, "failed");
  assert.equal(readFileSync(join(sub, "root-file"), "utf8"), "root's");
  assert.equal(lstatSync(join(sub, "root-file")).uid, 0);
  // What the uid could delete, it did.
  assert.equal(existsSync(join(dir, "mine")), false);
});

test("removePath refuses another uid's path when asked for the wrong uid", async (t) => {
  const root = sharedRoot(t);
  const dir = join(root, "theirs");
  mkdirSync(dir);
  chownSync(dir, OTHER_UID, OTHER_GID);
  const r = await removePath(dir, [root], OTHER_UID + 1, log, signal());
  assert.equal(r.status, "refused");
  assert.ok(existsSync(dir));
});

test("removePath refuses a tree with a file system mounted inside it, and deletes nothing", async (t) => {
  const root = dirWithMount(t, join("engine", "mnt"));
  writeFileSync(join(root, "engine", "local"), "same fs");
  writeFileSync(join(root, "engine", "mnt", "canary"), "on another fs");
  const r = await removePath(join(root, "engine"), [root], 0, log, signal());
  // The mount table is checked before rm runs (a bind mount of the same file system would
  // pass rm's --one-file-system): the delete is refused and reported, nothing is removed.
  assert.equal(r.status, "refused");
  assert.match(r.status === "refused" ? r.detail : "", /mount point/);
  assert.equal(readFileSync(join(root, "engine", "mnt", "canary"), "utf8"), "on another fs");
  assert.equal(existsSync(join(root, "engine", "local")), true);
});
