/**
 * The crowding rule's accounting (src/detect/crowd.ts) on a fake clock: what refusals move,
 * when an episode ends, and the budget that bounds what crowding can defer.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { FakeClock } from "../../src/clock.js";
import {
  CROWD_BUDGET_MS,
  CROWD_QUIET_MS,
  CROWD_REFILL_MS,
  CrowdWatch,
  type CrowdEpisode,
} from "../../src/detect/crowd.js";

const HEARTBEAT_TIMEOUT_MS = 30_000;

function watch() {
  const clock = new FakeClock();
  const resumed: number[] = [];
  const exhausted: unknown[] = [];
  const ended: CrowdEpisode[] = [];
  const crowd = new CrowdWatch({
    clock,
    log: { error: (obj: unknown) => void exhausted.push(obj) },
    maxHeartbeatTimeoutMs: HEARTBEAT_TIMEOUT_MS,
    resume: () => resumed.push(clock.mono()),
    ended: (e) => ended.push(e),
  });
  return { clock, crowd, resumed, exhausted, ended };
}

test("each refusal restarts heartbeat deadlines; an episode ends after a quiet second and says what it forgave", () => {
  const { clock, crowd, resumed, ended } = watch();
  const t0 = clock.mono();
  for (let i = 0; i < 50; i++) {
    crowd.refused();
    clock.advance(100);
  }
  assert.equal(resumed.length, 50);
  assert.equal(resumed.at(-1), t0 + 4900);
  assert.equal(crowd.crowded, true);
  clock.advance(CROWD_QUIET_MS);
  assert.equal(crowd.crowded, false);
  assert.equal(ended.length, 1);
  const e = ended[0] as CrowdEpisode;
  assert.equal(e.refused, 50);
  assert.equal(e.last - e.since, 4900);
  // The first refusal forgives up to the longest heartbeat timeout; each later one the time since.
  assert.equal(e.forgivenMs, HEARTBEAT_TIMEOUT_MS + 4900);
  assert.equal(e.exhausted, false);
});

test("continuous crowding is forgiven for 5 minutes at most, then heartbeat deadlines run again until the budget refills", () => {
  const { clock, crowd, resumed, exhausted, ended } = watch();
  const t0 = clock.mono();
  for (let ms = 0; ms < 10 * 60_000; ms += 100) {
    crowd.refused();
    clock.advance(100);
  }
  // The first refusal took a heartbeat timeout's worth; the rest, about the time that passed
  // (plus what refilled meanwhile).
  const lastMove = (resumed.at(-1) as number) - t0;
  assert.equal(exhausted.length, 1, "told once");
  assert.ok(lastMove > CROWD_BUDGET_MS - HEARTBEAT_TIMEOUT_MS, `last move at ${lastMove} ms`);
  assert.ok(lastMove < CROWD_BUDGET_MS, `last move at ${lastMove} ms`);
  clock.advance(CROWD_QUIET_MS);
  assert.equal(ended[0]?.exhausted, true);
  assert.ok((ended[0]?.forgivenMs ?? Infinity) <= CROWD_BUDGET_MS + (10 * 60_000 * CROWD_BUDGET_MS) / CROWD_REFILL_MS);
});

test("sparse refusals are charged the time each one forgives: no more than the budget an hour", () => {
  const { clock, crowd, resumed } = watch();
  // One refusal every 20 s, inside a 30 s heartbeat timeout, for an hour.
  for (let ms = 0; ms < 60 * 60_000; ms += 20_000) {
    crowd.refused();
    clock.advance(20_000);
  }
  // 300 s at the start plus 300 s refilled over the hour, 20 s each (the first, 30 s).
  assert.ok(resumed.length <= Math.ceil((2 * CROWD_BUDGET_MS) / 20_000), `${resumed.length} moves`);
  assert.ok(resumed.length >= Math.floor(CROWD_BUDGET_MS / 20_000), `${resumed.length} moves`);
});
