import assert from "node:assert/strict";
import { test } from "node:test";
import { buildConfig, type Config } from "../../src/config/load.js";
import { ORPHAN_DEFAULTS } from "../../src/config/schema.js";
import { ReaperError } from "../../src/errors.js";

function build(doc: Record<string, unknown>): Config {
  return buildConfig(doc, null, { env: {}, cwd: "/srv/reaper" });
}

/** SR_CONFIG_INVALID whose message names `key` (and `also`, when given). */
function assertInvalid(doc: Record<string, unknown>, key: string, also?: RegExp): void {
  let caught: unknown;
  try {
    build(doc);
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof ReaperError, `expected a ReaperError, got ${String(caught)}`);
  assert.equal(caught.code, "SR_CONFIG_INVALID");
  assert.ok(caught.message.includes(key), `message does not name ${key}: ${caught.message}`);
  if (also) assert.match(caught.message, also);
}

const spark = (orphans: Record<string, unknown>) => ({
  profiles: { spark: { allowed_roots: ["/var/tmp/spark", "/tmp"], orphans } },
});

test("orphans: off by default; a declared table defaults to report mode and min_age_sec", () => {
  const c = build({});
  assert.equal(c.profiles.default?.orphans, null);
  assert.deepEqual(c.orphans, { schedule: "0 * * * * *" });
  const s = build(spark({ cmdline: "SparkSubmit", uids: [1001] })).profiles.spark;
  assert.deepEqual(s?.orphans, {
    mode: ORPHAN_DEFAULTS.mode,
    exe: null,
    cmdline: "SparkSubmit",
    uids: [1001],
    minAgeSec: ORPHAN_DEFAULTS.min_age_sec,
    paths: [],
  });
  assert.equal(build(spark({ mode: "off", cmdline: "x", uids: [1] })).profiles.spark?.orphans, null);
  const full = build({
    orphans: { schedule: "*/30 * * * * *" },
    ...spark({
      mode: "reap",
      exe: "/usr/bin/java",
      cmdline: "^java .*Driver",
      uids: [1001, 1002],
      min_age_sec: 120,
      paths: ["/var/tmp/spark/driver-*", "/tmp/spark-[0-9]*/blockmgr-?"],
    }),
  });
  assert.equal(full.orphans.schedule, "*/30 * * * * *");
  assert.deepEqual(full.profiles.spark?.orphans, {
    mode: "reap",
    exe: "/usr/bin/java",
    cmdline: "^java .*Driver",
    uids: [1001, 1002],
    minAgeSec: 120,
    paths: ["/var/tmp/spark/driver-*", "/tmp/spark-[0-9]*/blockmgr-?"],
  });
});

test("orphans: a profile's matcher is its own, never inherited from [profiles.default]", () => {
  const c = build({
    profiles: { default: { orphans: { cmdline: "engine", uids: [0] } }, web: { heartbeat_timeout_sec: 5 } },
  });
  assert.equal(c.profiles.default?.orphans?.cmdline, "engine");
  assert.equal(c.profiles.web?.orphans, null);
});

test("orphans: an invalid regex, schedule, glob or uid list stops the start with an error naming the key", () => {
  assertInvalid(spark({ cmdline: "spark(", uids: [1] }), "profiles.spark.orphans.cmdline", /regular expression/);
  assertInvalid({ orphans: { schedule: "every minute" } }, "orphans.schedule");
  assertInvalid({ orphans: { schedule: "* * * * *", every: 5 } }, "orphans.every: unknown key");
  assertInvalid(spark({ cmdline: "x", uids: [1], min_age: 5 }), "profiles.spark.orphans.min_age: unknown key");
  assertInvalid(spark({ mode: "kill", cmdline: "x", uids: [1] }), "profiles.spark.orphans.mode");
  assertInvalid(spark({ cmdline: "x" }), "profiles.spark.orphans.uids", /required/);
  assertInvalid(spark({ cmdline: "x", uids: [] }), "profiles.spark.orphans.uids");
  assertInvalid(spark({ cmdline: "x", uids: [-1] }), "profiles.spark.orphans.uids.0");
  assertInvalid(spark({ uids: [1] }), "profiles.spark.orphans", /exe, cmdline or paths/);
  assertInvalid(spark({ exe: "java", uids: [1] }), "profiles.spark.orphans.exe");
  assertInvalid(spark({ exe: "/usr/bin/../bin/java", uids: [1] }), "profiles.spark.orphans.exe", /normalized/);
});

test("orphans: every path glob must lie strictly below one of the profile's allowed roots", () => {
  const bad = [
    "/etc/*", // outside
    "/var/tmp/*", // /var/tmp is not this profile's root (/var/tmp/spark is)
    "/var/*/spark/x", // a wildcard above the roots
    "/*", // the whole host
    "/var/tmp/spark", // a root itself
    "/tmp", // a root itself
    "/var/tmp/spark/../x/*", // not normalized
    "/tmp/x/", // trailing slash
  ];
  for (const glob of bad) {
    assertInvalid(spark({ paths: ["/tmp/ok-*", glob], uids: [1] }), "profiles.spark.orphans.paths.1", /./);
  }
  assertInvalid(spark({ paths: ["/etc/*"], uids: [1] }), "profiles.spark.orphans.paths.0", /allowed_roots/);
  // Literal paths and wildcards below a root are fine.
  for (const glob of ["/tmp/*", "/var/tmp/spark/driver-*", "/tmp/leftover", "/tmp/a/[!.]*/b?"]) {
    assert.deepEqual(build(spark({ paths: [glob], uids: [1] })).profiles.spark?.orphans?.paths, [glob]);
  }
});

test("orphans: the matcher's uids must lie within the profile's allowed_uids", () => {
  const doc = (uids: number[]) => ({
    profiles: { spark: { allowed_roots: ["/tmp"], allowed_uids: [1001, 1002], orphans: { cmdline: "x", uids } } },
  });
  assertInvalid(doc([1001, 0]), "profiles.spark.orphans.uids", /0 not in the profile's allowed_uids/);
  assert.deepEqual(build(doc([1002])).profiles.spark?.orphans?.uids, [1002]);
});
