import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { LogSink } from "../../src/audit/sink.js";
import { createLogger } from "../../src/audit/logger.js";
import { FakeClock } from "../../src/clock.js";
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
