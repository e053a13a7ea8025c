/** A binary min-heap of (at, id): the next deadline in O(1), insert and pop in O(log n). */
export class DeadlineHeap {
  private ats: number[] = [];
  private ids: string[] = [];

  get size(): number {
    return this.ats.length;
  }

  peekAt(): number | undefined {
    return this.ats[0];
  }

  push(at: number, id: string): void {
    this.ats.push(at);
    this.ids.push(id);
    let i = this.ats.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if ((this.ats[parent] as number) <= at) break;
      this.swap(i, parent);
      i = parent;
    }
  }

  pop(): { at: number; id: string } | undefined {
    const n = this.ats.length;
    if (n === 0) return undefined;
    const top = { at: this.ats[0] as number, id: this.ids[0] as string };
    this.swap(0, n - 1);
    this.ats.pop();
    this.ids.pop();
    let i = 0;
    const len = n - 1;
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < len && (this.ats[l] as number) < (this.ats[m] as number)) m = l;
      if (r < len && (this.ats[r] as number) < (this.ats[m] as number)) m = r;
      if (m === i) break;
      this.swap(i, m);
      i = m;
    }
    return top;
  }

  clear(): void {
    this.ats = [];
    this.ids = [];
  }

  private swap(a: number, b: number): void {
    const at = this.ats[a] as number;
    this.ats[a] = this.ats[b] as number;
    this.ats[b] = at;
    const id = this.ids[a] as string;
    this.ids[a] = this.ids[b] as string;
    this.ids[b] = id;
  }
}
