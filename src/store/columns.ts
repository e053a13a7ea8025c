/**
 * The one place where a stored value becomes a value of the domain (issue 22). SQLite's
 * integrity check (quick_check, at every start) sees damaged pages, not a damaged value: a JSON
 * column cut short or edited by hand, JSON of the wrong shape, text in an INTEGER column
 * (SQLite's column types are only affinities). Such a value is a finding, never a crash: the
 * rest of its row is read, the damaged value reads as its fallback (nothing: no ports, no
 * paths, no tree), and the finding names the table, the row and the column. What depends on a
 * damaged value is then decided conservatively by its readers (see docs/operations.md, "A damaged row").
 */
import { errorMessage } from "../errors.js";
import type { Containment, Damage, Leftover, ProcessIdentity } from "../model/session.js";

/** What is wrong with a parsed value, or null when it has the expected shape. */
export type Shape = (value: unknown) => string | null;

/** The kernel's PID_MAX_LIMIT (2^22): no pid is larger. pid 0 is "no process" (a path's session). */
const PID_MAX = 4194304;
/** (uid_t)-1 is "no uid" for the kernel: the largest real uid is one less. */
const UID_MAX = 4294967294;

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);
const integerIn = (v: unknown, min: number, max: number): boolean =>
  Number.isSafeInteger(v) && (v as number) >= min && (v as number) <= max;

function arrayOf(what: string, item: (v: unknown) => boolean): Shape {
  return (v) => {
    if (!Array.isArray(v)) return `not a list of ${what}`;
    const i = v.findIndex((x) => !item(x));
    return i < 0 ? null : `item ${i} is not ${what}: ${shown(v[i])}`;
  };
}

const isIdentity = (v: unknown): v is ProcessIdentity =>
  isObject(v) &&
  integerIn(v.pid, 0, PID_MAX) &&
  integerIn(v.startTime, 0, Number.MAX_SAFE_INTEGER) &&
  typeof v.bootId === "string" &&
  integerIn(v.uid, -1, UID_MAX);

/** The JSON columns' shapes: what src/store/store.ts writes into them. */
export const SHAPES = {
  ports: arrayOf("a port (an integer from 1 to 65535)", (p) => integerIn(p, 1, 65535)),
  paths: arrayOf("an absolute path", (p) => typeof p === "string" && p.startsWith("/")),
  labels: (v) =>
    !isObject(v)
      ? "not an object of labels"
      : Object.entries(v).some(([, x]) => typeof x !== "string")
        ? "a label's value is not a string"
        : null,
  leftovers: arrayOf(
    "a leftover ({ step, kind, item, detail })",
    (l) =>
      isObject(l) &&
      typeof l.step === "string" &&
      typeof l.kind === "string" &&
      typeof l.item === "string" &&
      typeof l.detail === "string",
  ),
  containment: (v) =>
    isObject(v) &&
    ((v.kind === "cgroup" && typeof v.path === "string" && v.path.startsWith("/") && typeof v.made === "boolean") ||
      (v.kind === "none" && typeof v.why === "string"))
      ? null
      : 'not a containment ({ kind: "cgroup", path, made } or { kind: "none", why })',
  tree: arrayOf("a process identity ({ pid, startTime, bootId, uid })", isIdentity),
  detail: (v) => (isObject(v) ? null : "not a JSON object"),
} satisfies Record<string, Shape>;

export type ShapedValue = {
  ports: number[];
  paths: string[];
  labels: Record<string, string>;
  leftovers: Leftover[];
  containment: Containment;
  tree: ProcessIdentity[];
  detail: Record<string, unknown>;
};

/**
 * The engine's identity, column by column: what a session's engine must be stored as for the
 * daemon to act on it. Read in TypeScript by `RowReading.engine` and in SQL by ENGINE_READABLE
 * (lists and counts by state), from this one table.
 */
const ENGINE_COLUMNS = [
  { column: "engine_pid", integer: [0, PID_MAX] },
  { column: "engine_start_time", integer: [0, Number.MAX_SAFE_INTEGER] },
  { column: "engine_boot_id", integer: null },
  { column: "engine_uid", integer: [0, UID_MAX] },
] as const;

/**
 * An SQL condition, true for a sessions row whose engine identity can be read: a live row
 * where it is false is a `damaged` session (src/model/session.ts).
 */
export const ENGINE_READABLE = `(${ENGINE_COLUMNS.map(({ column, integer }) =>
  integer === null
    ? `typeof(${column}) = 'text'`
    : `(typeof(${column}) = 'integer' AND ${column} BETWEEN ${integer[0]} AND ${integer[1]})`,
).join(" AND ")})`;

/** The columns that hold the engine's identity: damage in any of them leaves the engine unidentified. */
export const ENGINE_IDENTITY_COLUMNS: readonly string[] = ENGINE_COLUMNS.map((c) => c.column);

/** The damaged stored values of the session's engine identity (none: the engine can be identified). */
export function engineDamage(s: { readonly damage: readonly Damage[] }): Damage[] {
  return s.damage.filter((d) => d.table === "sessions" && ENGINE_IDENTITY_COLUMNS.includes(d.column));
}

/** Whether the session's engine can be identified (none of its identity's stored values is damaged). */
export function engineReadable(s: { readonly damage: readonly Damage[] }): boolean {
  return engineDamage(s).length === 0;
}

/** The damage in one line: "sessions.tree of the row seq 3, id "s1": not valid JSON (…)". */
export function describeDamage(damage: readonly Damage[]): string {
  return damage.map((d) => `${whereIs(d)}: ${d.error}`).join("; ");
}

/** The damage of `column` in the sessions row, if any. */
export function damageOf(s: { readonly damage: readonly Damage[] }, column: string): Damage | undefined {
  return s.damage.find((d) => d.table === "sessions" && d.column === column);
}

/** "sessions.paths of the row seq 12, id "s1"": where a damaged value is, for a message. */
export function whereIs(d: Damage): string {
  const row = Object.entries(d.row)
    .map(([k, v]) => `${k} ${typeof v === "string" ? JSON.stringify(v) : v}`)
    .join(", ");
  return `${d.table}.${d.column} of the row ${row}`;
}

/** A short, safe rendering of a stored value for a message (never the whole of a long text). */
function shown(v: unknown): string {
  if (v === null) return "null";
  if (Buffer.isBuffer(v)) return `a blob of ${v.length} bytes`;
  const text =
    typeof v === "string" || typeof v === "object"
      ? JSON.stringify(v)
      : typeof v === "number" || typeof v === "bigint" || typeof v === "boolean"
        ? String(v)
        : typeof v;
  return text.length > 40 ? `${text.slice(0, 40)}…` : text;
}

/**
 * One row being read: every value taken through it is checked, and each one that cannot be
 * read is recorded (`damage`) and replaced by the fallback the caller gives.
 */
export class RowReading {
  readonly damage: Damage[] = [];

  constructor(
    private readonly table: Damage["table"],
    private readonly row: Damage["row"],
  ) {}

  /** A JSON column of one of the known shapes; NULL is damage too (use `nullableJson` where NULL is allowed). */
  json<K extends keyof typeof SHAPES, F>(column: string, shape: K, text: unknown, fallback: F): ShapedValue[K] | F {
    if (typeof text !== "string") return this.damaged(column, `not JSON text but ${shown(text)}`, fallback);
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch (err) {
      return this.damaged(column, `not valid JSON (${errorMessage(err)}): ${shown(text)}`, fallback);
    }
    const problem = SHAPES[shape](value);
    return problem === null ? (value as ShapedValue[K]) : this.damaged(column, problem, fallback);
  }

  /** As `json`, for a column where NULL means "none" (read as null). */
  nullableJson<K extends keyof typeof SHAPES, F>(
    column: string,
    shape: K,
    text: unknown,
    fallback: F,
  ): ShapedValue[K] | F | null {
    return text === null ? null : this.json(column, shape, text, fallback);
  }

  /**
   * The engine's identity from its four columns. If one cannot be read (damage), the identity
   * keeps the stored pid when that is readable (for the operator to look at) with start time 0,
   * boot id "" and uid -1: it matches no process of this boot, so nothing is ever signalled
   * through it, and the session is `damaged`.
   */
  engine(row: object): ProcessIdentity {
    const r = row as Record<string, unknown>;
    const [pid, startTime, bootId, uid] = ENGINE_COLUMNS.map(({ column, integer }) => {
      const v = r[column];
      const ok = integer === null ? typeof v === "string" : integerIn(v, integer[0], integer[1]);
      if (ok) return v;
      this.damaged(
        column,
        integer === null
          ? `not a text but ${shown(v)}`
          : `not an integer from ${integer[0]} to ${integer[1]} but ${shown(v)}`,
        null,
      );
      return undefined;
    });
    const readable = this.damage.every((d) => !ENGINE_IDENTITY_COLUMNS.includes(d.column));
    return readable
      ? { pid: pid as number, startTime: startTime as number, bootId: bootId as string, uid: uid as number }
      : { pid: (pid as number | undefined) ?? 0, startTime: 0, bootId: "", uid: -1 };
  }

  /**
   * The owner process's identity, or null: no owner, or an owner whose stored identity cannot
   * be read (damage: then the session is never reaped as `owner_gone` on a guess). Columns
   * NULL in rows older than them read as before (start time 0, boot id "", uid -1).
   */
  owner(row: object): ProcessIdentity | null {
    const r = row as Record<string, unknown>;
    if (r.owner_pid === null) return null;
    const checks: [string, boolean, string][] = [
      ["owner_pid", integerIn(r.owner_pid, 2, PID_MAX), `an integer from 2 to ${PID_MAX}`],
      [
        "owner_start_time",
        r.owner_start_time === null || integerIn(r.owner_start_time, 0, Number.MAX_SAFE_INTEGER),
        "an integer",
      ],
      ["owner_boot_id", r.owner_boot_id === null || typeof r.owner_boot_id === "string", "a text"],
      ["owner_uid", r.owner_uid === null || integerIn(r.owner_uid, 0, UID_MAX), `an integer from 0 to ${UID_MAX}`],
    ];
    let readable = true;
    for (const [column, ok, what] of checks) {
      if (ok) continue;
      readable = false;
      this.damaged(column, `not ${what} but ${shown(r[column])}`, null);
    }
    if (!readable) return null;
    return {
      pid: r.owner_pid as number,
      startTime: (r.owner_start_time as number | null) ?? 0,
      bootId: (r.owner_boot_id as string | null) ?? "",
      uid: (r.owner_uid as number | null) ?? -1,
    };
  }

  private damaged<F>(column: string, error: string, fallback: F): F {
    this.damage.push({ table: this.table, row: this.row, column, error });
    return fallback;
  }
}
