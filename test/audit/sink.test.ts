import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { LogSink } from "../../src/audit/sink.js";
import { createLogger } from "../../src/audit/logger.js";
import { FakeClock } from "../../src/clock.js";
import { fillUp, mountTmpfs } from "../faults/lib.js";
import { tempDir } from "../helpers.js";

test("a log file on a full disk: lines are dropped and counted, nothing throws", () => {
  // /dev/full answers every write with ENOSPC, as a full file system does.
  const sink = new LogSink("/dev/full");
  const drops: string[] = [];
  sink.onDrop = (e) => drops.push(e);
  for (let i = 0; i < 5; i++) sink.write(`{"line":${i}}\n`);
  assert.equal(sink.dropped, 5);
  assert.deepEqual(drops, ["ENOSPC", "ENOSPC", "ENOSPC", "ENOSPC", "ENOSPC"]);
  sink.close();
  sink.write("after close\n"); // ignored, no throw
});

test("pino over the sink: even fatal on a full disk returns (pino's own destination throws here)", () => {
  const loggers = createLogger({ level: "info", file: "/dev/full", clock: new FakeClock() });
  loggers.log.info("one");
  loggers.audit.info({ event: "session.registered" }, "session.registered");
  loggers.log.fatal({ err: new Error("boom") }, "uncaught exception");
  loggers.flush();
  assert.equal(loggers.sink?.dropped, 3);
});

test("a working file gets every line whole", (t) => {
  const file = join(tempDir(t), "log", "reaper.log");
  const sink = new LogSink(file);
  sink.write("a\n");
  sink.write("b\n");
  sink.close();
  assert.equal(readFileSync(file, "utf8"), "a\nb\n");
  assert.equal(sink.dropped, 0);
});

/** A JSON audit line of about `size` bytes, as pino writes them. */
function auditLine(n: number, size = 700): string {
  const head = `{"level":"info","time":"2026-12-01T00:00:${String(n % 60).padStart(2, "0")}.000Z","audit":true,"event":"reap.step","sessionId":"s${n}","pad":"`;
  return `${head}${"x".repeat(size - head.length - 3)}"}\n`;
}

/** The lines of a file: parsed, or the text of those that are not JSON. */
function linesOf(file: string): { parsed: { sessionId?: string }[]; malformed: string[]; endsWithNewline: boolean } {
  const text = readFileSync(file, "utf8");
  const parsed: { sessionId?: string }[] = [];
  const malformed: string[] = [];
  for (const l of text.split("\n").filter((l) => l !== "")) {
    try {
      parsed.push(JSON.parse(l) as { sessionId?: string });
    } catch {
      malformed.push(l);
    }
  }
  return { parsed, malformed, endsWithNewline: text.endsWith("\n") };
}

/**
 * A log on a small tmpfs that another file fills: the log's last page has room for part of a
 * line (a 1000-byte line, then four of 700 bytes fill 3800 of its 4096 bytes), so the fifth
 * line is written short, 296 bytes, and the rest refused with ENOSPC.
 */
function fullLog(t: TestContext): { file: string; filler: string; sink: LogSink } {
  const mnt = mountTmpfs(tempDir(t), "log", "256k");
  const file = join(mnt, "reaper.log");
  const sink = new LogSink(file);
  t.after(() => sink.close());
  sink.write(auditLine(0, 1000));
  const filler = join(mnt, "filler");
  fillUp(filler);
  return { file, filler, sink };
}

test("a line the full disk cuts short is cut off again: the log holds whole lines only", (t) => {
  const { file, filler, sink } = fullLog(t);
  for (let n = 1; n <= 10; n++) sink.write(auditLine(n));
  assert.equal(sink.dropped, 6, "lines 5 to 10 did not fit");
  rmSync(filler); // space returns
  for (let n = 11; n <= 13; n++) sink.write(auditLine(n));
  const { parsed, malformed, endsWithNewline } = linesOf(file);
  assert.deepEqual(malformed, [], "no torn line");
  assert.ok(endsWithNewline);
  assert.deepEqual(
    parsed.map((l) => l.sessionId),
    ["s0", "s1", "s2", "s3", "s4", "s11", "s12", "s13"],
    "every line written is whole, the one after the tear too",
  );
});

test("an append-only log (chattr +a) cannot be cut: the partial line stays one line, the next starts on its own", (t) => {
  const { file, filler, sink } = fullLog(t);
  execFileSync("chattr", ["+a", file]);
  t.after(() => void spawnSync("chattr", ["-a", file]));
  for (let n = 1; n <= 10; n++) sink.write(auditLine(n));
  rmSync(filler);
  for (let n = 11; n <= 13; n++) sink.write(auditLine(n));
  const { parsed, malformed, endsWithNewline } = linesOf(file);
  assert.equal(malformed.length, 1, "one malformed line: the part of line 5 that fitted");
  assert.ok(auditLine(5).startsWith(malformed[0] ?? "-"), "the fragment is the start of line 5");
  assert.ok(endsWithNewline);
  assert.deepEqual(
    parsed.map((l) => l.sessionId),
    ["s0", "s1", "s2", "s3", "s4", "s11", "s12", "s13"],
  );
});

test("a log left without a final newline (a torn line from an older build): the first line starts on its own", (t) => {
  const file = join(tempDir(t), "reaper.log");
  writeFileSync(file, '{"level":"info","audit":true,"event":"reap.st');
  const sink = new LogSink(file);
  sink.write('{"a":1}\n');
  sink.close();
  assert.equal(readFileSync(file, "utf8"), '{"level":"info","audit":true,"event":"reap.st\n{"a":1}\n');
});

test("dropped lines are named, and handed over once a line is written again", async (t) => {
  const { filler, sink } = fullLog(t);
  let recovered = 0;
  sink.onRecovered = () => recovered++;
  for (let n = 1; n <= 6; n++) sink.write(auditLine(n));
  sink.write('{"level":"info","time":"2026-12-01T00:01:00.000Z","msg":"an operational line"}\n'.padEnd(800, " "));
  await new Promise((r) => setImmediate(r));
  assert.equal(recovered, 0, "nothing written since: no report yet");
  rmSync(filler);
  sink.write(auditLine(7));
  assert.equal(recovered, 0, "never from inside a write");
  await new Promise((r) => setImmediate(r));
  assert.equal(recovered, 1);
  assert.deepEqual(sink.takeDropped(), {
    lines: 3,
    auditLines: 2,
    events: [
      { event: "reap.step", sessionId: "s5" },
      { event: "reap.step", sessionId: "s6" },
    ],
    unnamed: 0,
    error: "ENOSPC",
    from: "2026-12-01T00:00:05.000Z",
    to: "2026-12-01T00:01:00.000Z",
  });
  assert.equal(sink.takeDropped(), null);
});

test("a report whose own line is dropped is folded into the next; more than 100 names make several reports", (t) => {
  const { sink } = fullLog(t);
  // Ten lines of 300 bytes fit in the page's 3096 free bytes; lines 11 to 150 do not.
  for (let n = 1; n <= 150; n++) sink.write(auditLine(n, 300));
  assert.equal(sink.dropped, 140);
  const first = sink.takeDropped();
  assert.deepEqual([first?.lines, first?.auditLines, first?.events.length], [100, 100, 100]);
  // The report's own line does not fit either: folded back, not named as one more lost line.
  const reportLine = JSON.stringify({ level: "info", audit: true, event: "daemon.lines_dropped", detail: first });
  sink.write(`${reportLine}\n`);
  assert.equal(sink.dropped, 141);
  const reports = [];
  for (let r = sink.takeDropped(); r !== null; r = sink.takeDropped()) reports.push(r);
  assert.deepEqual(
    reports.map((r) => [r.lines, r.auditLines, r.events.length, r.unnamed]),
    [
      [100, 100, 100, 0],
      [40, 40, 40, 0],
    ],
  );
  const named = reports.flatMap((r) => r.events.map((e) => e.sessionId)).sort();
  assert.deepEqual(named, Array.from({ length: 140 }, (_, i) => `s${i + 11}`).sort());
});

test("reopen: after the file is moved away, lines go to a new file at the path; the moved one keeps its own", (t) => {
  const dir = tempDir(t);
  const file = join(dir, "reaper.log");
  const sink = new LogSink(file);
  sink.write("a\n");
  renameSync(file, `${file}.1`);
  sink.write("b\n"); // still the open file, as logrotate expects until its postrotate
  sink.reopen();
  sink.write("c\n");
  sink.close();
  assert.equal(readFileSync(`${file}.1`, "utf8"), "a\nb\n");
  assert.equal(readFileSync(file, "utf8"), "c\n");
  assert.equal(sink.dropped, 0);
});
