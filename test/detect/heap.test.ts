import assert from "node:assert/strict";
import { test } from "node:test";
import { DeadlineHeap } from "../../src/detect/heap.js";

/** mulberry32: a small seeded PRNG, so every run checks the same sequences. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

function drain(h: DeadlineHeap): { at: number; id: string }[] {
  const out: { at: number; id: string }[] = [];
  for (let e = h.pop(); e !== undefined; e = h.pop()) out.push(e);
  return out;
}

const byAtThenId = (a: { at: number; id: string }, b: { at: number; id: string }): number =>
  a.at - b.at || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);

test("an empty heap", () => {
  const h = new DeadlineHeap();
  assert.equal(h.size, 0);
  assert.equal(h.peekAt(), undefined);
  assert.equal(h.pop(), undefined);
});

test("random pushes pop in sorted order, with every (at, id) pair kept (200 seeded runs)", () => {
  for (let seed = 1; seed <= 200; seed++) {
    const rand = prng(seed);
    const h = new DeadlineHeap();
    const n = 1 + Math.floor(rand() * 300);
    // A small range forces many equal deadlines.
    const range = rand() < 0.5 ? 20 : 1e9;
    const pushed: { at: number; id: string }[] = [];
    for (let i = 0; i < n; i++) {
      const e = { at: Math.floor(rand() * range), id: `s${i}` };
      pushed.push(e);
      h.push(e.at, e.id);
      assert.equal(h.size, i + 1);
      assert.equal(h.peekAt(), Math.min(...pushed.map((p) => p.at)), `seed ${seed}: peek after push ${i}`);
    }
    const popped = drain(h);
    assert.equal(h.size, 0);
    for (let i = 1; i < popped.length; i++) {
      assert.ok((popped[i - 1]?.at as number) <= (popped[i]?.at as number), `seed ${seed}: out of order at ${i}`);
    }
    assert.deepEqual([...popped].sort(byAtThenId), [...pushed].sort(byAtThenId), `seed ${seed}: entries lost`);
  }
});

test("interleaved pushes and pops always pop the current minimum (seeded)", () => {
  for (let seed = 1000; seed < 1100; seed++) {
    const rand = prng(seed);
    const h = new DeadlineHeap();
    const model: { at: number; id: string }[] = [];
    for (let step = 0; step < 500; step++) {
      if (model.length === 0 || rand() < 0.6) {
        const e = { at: Math.floor(rand() * 1000), id: `s${step}` };
        h.push(e.at, e.id);
        model.push(e);
      } else {
        const min = Math.min(...model.map((m) => m.at));
        const got = h.pop();
        assert.ok(got, `seed ${seed}: pop returned nothing`);
        assert.equal(got.at, min, `seed ${seed} step ${step}`);
        const idx = model.findIndex((m) => m.at === got.at && m.id === got.id);
        assert.ok(idx >= 0, `seed ${seed}: popped an entry never pushed`);
        model.splice(idx, 1);
      }
      assert.equal(h.size, model.length);
      assert.equal(h.peekAt(), model.length ? Math.min(...model.map((m) => m.at)) : undefined);
    }
  }
});

test("the same id may be pushed several times; clear empties the heap", () => {
  const h = new DeadlineHeap();
  h.push(30, "a");
  h.push(10, "a");
  h.push(20, "b");
  assert.deepEqual(drain(h), [
    { at: 10, id: "a" },
    { at: 20, id: "b" },
    { at: 30, id: "a" },
  ]);
  h.push(5, "x");
  h.push(6, "y");
  h.clear();
  assert.equal(h.size, 0);
  assert.equal(h.pop(), undefined);
  h.push(7, "z");
  assert.deepEqual(drain(h), [{ at: 7, id: "z" }]);
});
