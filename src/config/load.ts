import { existsSync, readFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { isAbsolute, join, normalize, resolve } from "node:path";
import { Ajv, type ErrorObject } from "ajv";
import { Cron } from "croner";
import { parse as parseToml } from "smol-toml";
import { templateProblem } from "./hook-template.js";
import { ReaperError, errorMessage } from "../errors.js";
import { globProblem } from "../paths/glob.js";
import { reachablePath, SOCKET_PATH_MAX } from "../paths/socket-path.js";
import { DEFAULTS, ORPHAN_DEFAULTS, PROFILE_DEFAULTS, configSchema } from "./schema.js";

export type CloseHook = { kind: "http"; path: string } | { kind: "command"; argv: readonly string[] };

/**
 * Run by release-connections-and-ports once the engine is gone: a POST to a loopback URL (a
 * registry or lock service outside the session), or an argv run as the daemon's user.
 */
export type ReleaseHook = { kind: "http"; url: string } | { kind: "command"; argv: readonly string[] };

export interface Profile {
  readonly name: string;
  readonly heartbeatTimeoutSec: number;
  readonly idleTimeoutSec: number;
  /** 0 means no maximum lifetime. */
  readonly maxLifetimeSec: number;
  readonly gracePeriodSec: number;
  readonly stepTimeoutSec: number;
  readonly allowedRoots: readonly string[];
  /** Engine uids this profile may manage, whoever registers; null = any uid. */
  readonly allowedUids: readonly number[] | null;
  readonly closeHook: CloseHook | null;
  readonly releaseHooks: readonly ReleaseHook[];
  /** How long a SIGKILLed process may take to die before it is an `unkillable` leftover. */
  readonly unkillableTimeoutSec: number;
  /** Run (as the daemon's user) once per reap that leaves unkillable processes; `{pids}` names them. Null: none. */
  readonly unkillableHook: readonly string[] | null;
  /**
   * Engine CPU (percent of one core, averaged since the previous liveness pass) above which
   * the liveness pass counts the engine as active, moving its activity time; null = off.
   */
  readonly busyCpuPercent: number | null;
  /** auto: a cgroup per session where the host allows one; cgroup: required; none: never. */
  readonly containment: "auto" | "cgroup" | "none";
  /** Remove the IPC objects the session left (they are reported either way). */
  readonly removeIpc: boolean;
  /** PATH for the profile's command hooks. */
  readonly hookPath: string;
  /** How the orphan sweep recognises this profile's engines and leftovers; null = off. */
  readonly orphans: OrphanPolicy | null;
  /** A warning this long before an idle or lifetime deadline (and before a reclaim under pressure); 0 = none. */
  readonly warnBeforeSec: number;
  /** Run at each warning, like release hooks, with `{reason}` and `{in_sec}` besides the hook templates. */
  readonly warnHooks: readonly ReleaseHook[];
  /** The longest extension a client may ask; 0 = none. */
  readonly maxExtendSec: number;
}

/** [pressure]: reclaiming idle sessions while the host's memory pressure holds (src/detect/pressure.ts). */
export interface PressureConfig {
  /** The PSI file read: /proc/pressure/memory, or a cgroup v2 memory.pressure. */
  readonly file: string;
  /** `some avg10` (percent) at or above which pressure holds; 0 = off. */
  readonly someAvg10: number;
  /** How long pressure must hold before the first reclaim. */
  readonly durationSec: number;
  /** Between two reclaims. */
  readonly cooldownSec: number;
  /** Activity (heartbeat or busy CPU) within this spares a session. */
  readonly spareActiveSec: number;
  /** CPU above this (percent of one core) over the sample spares a session. */
  readonly spareCpuPercent: number;
}

/** A profile's [profiles.NAME.orphans], validated (src/orphans/ reads it). */
export interface OrphanPolicy {
  /** report: an orphan.found event per finding; reap: each finding also becomes a session reaped as `orphaned`. */
  readonly mode: "report" | "reap";
  /** /proc/<pid>/exe must be exactly this (when set). */
  readonly exe: string | null;
  /** A regular expression (source) the command line, arguments joined by spaces, must match (when set). */
  readonly cmdline: string | null;
  /** Only processes (real uid) and paths (owner) of these uids are considered. */
  readonly uids: readonly number[];
  /** Younger processes (start time) and paths (mtime) are left alone. */
  readonly minAgeSec: number;
  /** Globs (`*`, `?`, `[...]` within a component) below the profile's allowed roots. */
  readonly paths: readonly string[];
}

export type LogLevel = "fatal" | "error" | "warn" | "info" | "debug" | "trace" | "silent";

export interface Config {
  /** The file this came from, or null when running on embedded defaults. */
  readonly source: string | null;
  readonly api: ApiConfig;
  readonly store: {
    readonly path: string;
    readonly flushIntervalMs: number;
    /** Reaped sessions older than this (by the reap's end) are purged, leaving a tombstone; 0: never. */
    readonly retainReapedSec: number;
    /** Tombstones older than this (by the session's end) are purged; 0: never. */
    readonly retainTombstonesSec: number;
  };
  readonly log: { readonly level: LogLevel; readonly file: string };
  readonly detect: { readonly livenessSchedule: string; readonly livenessCpuPercent: number };
  readonly reaper: { readonly concurrency: number; readonly shutdownGraceSec: number };
  readonly orphans: { readonly schedule: string };
  /** Where session cgroups are made: an absolute path in the cgroup v2 tree, or "" (found at start). */
  readonly containment: { readonly cgroupBase: string };
  readonly pressure: PressureConfig;
  readonly profiles: Readonly<Record<string, Profile>>;
}

export interface ApiConfig {
  readonly socket: string;
  readonly socketMode: number;
  /** api.socket_group: the socket file's group (a gid), or null for the daemon's own. */
  readonly socketGid: number | null;
  readonly bodyLimitBytes: number;
  /** Members of this gid are administrators (besides root and the daemon's own uid); null = none. */
  readonly adminGid: number | null;
  readonly maxSessionsPerUid: number;
  readonly headerTimeoutMs: number;
  readonly requestTimeoutMs: number;
  readonly keepAliveTimeoutMs: number;
  /**
   * Unix socket: connections of non-admin peers open at once (admins' are not counted);
   * loopback TCP: connections open at once.
   */
  readonly maxConnections: number;
  /** Unix socket: connections one non-admin uid may hold open at once (src/http/connection-limits.ts). */
  readonly maxConnectionsPerUid: number;
  /** Loopback TCP, off unless configured. */
  readonly tcp: { readonly host: string; readonly port: number; readonly tokenFile: string } | null;
}

export const DEFAULT_CONFIG_PATH = "/etc/session-reaper/config.toml";

export interface LoadOptions {
  /** `--config FILE`; wins over REAPER_CONFIG. */
  configPath?: string | undefined;
  env: Readonly<Record<string, string | undefined>>;
  cwd: string;
  /** Where group names are looked up (api.admin_group); /etc/group unless a test says otherwise. */
  groupFile?: string;
}

const validate = new Ajv({ allErrors: true, strict: true }).compile(configSchema);

/** "/profiles/gpu/grace_period_sec" -> "profiles.gpu.grace_period_sec" */
function keyOf(err: ErrorObject): string {
  const base = err.instancePath.split("/").filter(Boolean).join(".");
  const extra =
    err.keyword === "additionalProperties"
      ? (err.params as { additionalProperty: string }).additionalProperty
      : err.keyword === "propertyNames"
        ? (err.params as { propertyName: string }).propertyName
        : "";
  return [base, extra].filter(Boolean).join(".") || "(top level)";
}

function describe(err: ErrorObject): string {
  if (err.keyword === "additionalProperties") return `${keyOf(err)}: unknown key`;
  if (err.keyword === "propertyNames") return `${keyOf(err)}: invalid profile name`;
  return `${keyOf(err)}: ${err.message ?? "invalid"}`;
}

/** An environment variable, with an empty value treated as unset (`Environment=REAPER_DB=` clears it). */
const envValue = (env: LoadOptions["env"], name: string): string | undefined => env[name] || undefined;

/** systemd's RuntimeDirectory=, StateDirectory=, ConfigurationDirectory= may list several dirs joined by ':'. */
const firstDir = (env: LoadOptions["env"], name: string): string | undefined =>
  envValue(env, name)?.split(":")[0] || undefined;

function configFile(opts: LoadOptions): string | null {
  const explicit = opts.configPath ?? envValue(opts.env, "REAPER_CONFIG");
  if (explicit) return resolve(opts.cwd, explicit);
  const candidates = [DEFAULT_CONFIG_PATH];
  const confDir = firstDir(opts.env, "CONFIGURATION_DIRECTORY");
  if (confDir) candidates.unshift(join(confDir, "config.toml"));
  return candidates.find((p) => existsSync(p)) ?? null;
}

/** Reads, validates and freezes the configuration. Throws SR_CONFIG_INVALID naming the key. */
export function loadConfig(opts: LoadOptions): Config {
  const file = configFile(opts);
  let raw: Record<string, unknown> = {};
  if (file !== null) {
    let text: string;
    try {
      text = readFileSync(file, "utf8");
    } catch (err) {
      throw new ReaperError("SR_CONFIG_INVALID", `cannot read config file ${file}: ${errorMessage(err)}`);
    }
    try {
      raw = parseToml(text);
    } catch (err) {
      throw new ReaperError("SR_CONFIG_INVALID", `${file}: not valid TOML: ${errorMessage(err)}`);
    }
  }
  return buildConfig(raw, file, opts);
}

type Raw = {
  api?: {
    socket?: string;
    socket_mode?: string;
    socket_group?: string;
    body_limit_bytes?: number;
    admin_group?: string;
    max_sessions_per_uid?: number;
    header_timeout_ms?: number;
    request_timeout_ms?: number;
    keep_alive_timeout_ms?: number;
    max_connections?: number;
    max_connections_per_uid?: number;
    tcp?: { listen: string; token_file: string };
  };
  store?: { path?: string; flush_interval_ms?: number; retain_reaped_sec?: number; retain_tombstones_sec?: number };
  log?: { level?: LogLevel; file?: string };
  detect?: { liveness_schedule?: string; liveness_cpu_percent?: number };
  reaper?: { concurrency?: number; shutdown_grace_sec?: number };
  orphans?: { schedule?: string };
  containment?: { cgroup_base?: string };
  pressure?: {
    file?: string;
    some_avg10?: number;
    duration_sec?: number;
    cooldown_sec?: number;
    spare_active_sec?: number;
    spare_cpu_percent?: number;
  };
  profiles?: Record<string, RawProfile>;
};
type RawOrphans = {
  mode?: "off" | "report" | "reap";
  exe?: string;
  cmdline?: string;
  uids?: number[];
  min_age_sec?: number;
  paths?: string[];
};
type RawProfile = {
  heartbeat_timeout_sec?: number;
  idle_timeout_sec?: number;
  max_lifetime_sec?: number;
  grace_period_sec?: number;
  step_timeout_sec?: number;
  unkillable_timeout_sec?: number;
  unkillable_hook?: string[];
  allowed_roots?: string[];
  allowed_uids?: number[];
  close_hook?: string | string[];
  release_hooks?: (string | string[])[];
  busy_cpu_percent?: number;
  containment?: "auto" | "cgroup" | "none";
  remove_ipc?: boolean;
  hook_path?: string;
  orphans?: RawOrphans;
  warn_before_sec?: number;
  warn_hooks?: (string | string[])[];
  max_extend_sec?: number;
};

/** Validates an already-parsed document (exported for tests and for embedding). */
export function buildConfig(doc: Record<string, unknown>, source: string | null, opts: LoadOptions): Config {
  const where = source ?? "configuration";
  if (!validate(doc)) {
    const lines = (validate.errors ?? []).map(describe);
    throw new ReaperError("SR_CONFIG_INVALID", `${where}: ${[...new Set(lines)].join("; ")}`);
  }
  const raw = doc as Raw;
  const env = opts.env;

  const level = envValue(env, "REAPER_LOG_LEVEL") ?? raw.log?.level ?? DEFAULTS.log.level;
  const levels = configSchema.properties.log.properties.level.enum as readonly string[];
  if (!levels.includes(level)) {
    throw new ReaperError("SR_CONFIG_INVALID", `REAPER_LOG_LEVEL: must be one of ${levels.join(", ")}`);
  }

  const schedule = checkSchedule(
    raw.detect?.liveness_schedule ?? DEFAULTS.detect.liveness_schedule,
    where,
    "detect.liveness_schedule",
  );
  const orphanSchedule = checkSchedule(raw.orphans?.schedule ?? DEFAULTS.orphans.schedule, where, "orphans.schedule");

  const [socketFrom, socketPath] = envValue(env, "REAPER_SOCKET")
    ? ["REAPER_SOCKET", envValue(env, "REAPER_SOCKET") as string]
    : raw.api?.socket
      ? ["api.socket", raw.api.socket]
      : firstDir(env, "RUNTIME_DIRECTORY")
        ? ["RUNTIME_DIRECTORY", join(firstDir(env, "RUNTIME_DIRECTORY") as string, "reaper.sock")]
        : ["the working directory", join(opts.cwd, "reaper.sock")];
  if (!isAbsolute(socketPath)) {
    throw new ReaperError("SR_CONFIG_INVALID", `${socketFrom}: the socket path ${socketPath} must be absolute`);
  }
  if (reachablePath(socketPath, opts.cwd) === null) {
    throw new ReaperError(
      "SR_CONFIG_INVALID",
      `${socketFrom}: the socket path ${socketPath} is ${Buffer.byteLength(socketPath)} bytes, longer than a unix socket path may be (${SOCKET_PATH_MAX}), and not reachable from the working directory by a shorter relative name: set ${socketFrom === "REAPER_SOCKET" ? "REAPER_SOCKET" : "api.socket (or REAPER_SOCKET)"} to a shorter path, e.g. /run/session-reaper/reaper.sock`,
    );
  }
  const socket = socketPath;
  const dbPath =
    envValue(env, "REAPER_DB") ?? raw.store?.path ?? join(firstDir(env, "STATE_DIRECTORY") ?? opts.cwd, "reaper.db");

  const retainReapedSec = raw.store?.retain_reaped_sec ?? DEFAULTS.store.retain_reaped_sec;
  const retainTombstonesSec = raw.store?.retain_tombstones_sec ?? DEFAULTS.store.retain_tombstones_sec;
  if (retainTombstonesSec !== 0 && (retainReapedSec === 0 || retainTombstonesSec < retainReapedSec)) {
    throw new ReaperError(
      "SR_CONFIG_INVALID",
      `${where}: store.retain_tombstones_sec: ${retainTombstonesSec} is shorter than store.retain_reaped_sec (${retainReapedSec === 0 ? "0: reaped sessions are kept for ever" : retainReapedSec}): a tombstone must outlive the session it stands for (0 keeps tombstones for ever)`,
    );
  }
  const headerTimeout = raw.api?.header_timeout_ms ?? DEFAULTS.api.header_timeout_ms;
  const requestTimeout = raw.api?.request_timeout_ms ?? DEFAULTS.api.request_timeout_ms;
  if (headerTimeout > requestTimeout) {
    throw new ReaperError(
      "SR_CONFIG_INVALID",
      `${where}: api.header_timeout_ms: ${headerTimeout} exceeds api.request_timeout_ms (${requestTimeout})`,
    );
  }
  const maxConnections = raw.api?.max_connections ?? DEFAULTS.api.max_connections;
  const maxConnectionsPerUid = raw.api?.max_connections_per_uid ?? DEFAULTS.api.max_connections_per_uid;
  if (maxConnectionsPerUid > maxConnections) {
    throw new ReaperError(
      "SR_CONFIG_INVALID",
      `${where}: api.max_connections_per_uid: ${maxConnectionsPerUid} exceeds api.max_connections (${maxConnections})`,
    );
  }
  const rawProfiles = raw.profiles ?? {};
  const baseRaw = rawProfiles.default ?? {};
  const profiles: Record<string, Profile> = {};
  for (const name of new Set(["default", ...Object.keys(rawProfiles)])) {
    const own = rawProfiles[name] ?? {};
    // [orphans] is the profile's own: an inherited matcher would find the same process for every profile.
    profiles[name] = buildProfile(name, { ...PROFILE_DEFAULTS, ...baseRaw, ...own, orphans: own.orphans }, where);
  }

  return deepFreeze({
    source,
    api: {
      socket,
      socketMode: parseInt(raw.api?.socket_mode ?? DEFAULTS.api.socket_mode, 8),
      bodyLimitBytes: raw.api?.body_limit_bytes ?? DEFAULTS.api.body_limit_bytes,
      adminGid: groupId(raw.api?.admin_group ?? DEFAULTS.api.admin_group, opts.groupFile ?? "/etc/group", where),
      socketGid: groupId(
        raw.api?.socket_group ?? DEFAULTS.api.socket_group,
        opts.groupFile ?? "/etc/group",
        where,
        "api.socket_group",
      ),
      maxSessionsPerUid: raw.api?.max_sessions_per_uid ?? DEFAULTS.api.max_sessions_per_uid,
      headerTimeoutMs: headerTimeout,
      requestTimeoutMs: requestTimeout,
      keepAliveTimeoutMs: raw.api?.keep_alive_timeout_ms ?? DEFAULTS.api.keep_alive_timeout_ms,
      maxConnections,
      maxConnectionsPerUid,
      tcp: raw.api?.tcp
        ? { ...loopbackListen(raw.api.tcp.listen, `${where}: api.tcp.listen`), tokenFile: raw.api.tcp.token_file }
        : null,
    },
    store: {
      path: dbPath === ":memory:" ? dbPath : resolve(opts.cwd, dbPath),
      flushIntervalMs: raw.store?.flush_interval_ms ?? DEFAULTS.store.flush_interval_ms,
      retainReapedSec,
      retainTombstonesSec,
    },
    log: { level: level as LogLevel, file: raw.log?.file ?? DEFAULTS.log.file },
    detect: {
      livenessSchedule: schedule,
      livenessCpuPercent: raw.detect?.liveness_cpu_percent ?? DEFAULTS.detect.liveness_cpu_percent,
    },
    reaper: {
      concurrency: raw.reaper?.concurrency ?? DEFAULTS.reaper.concurrency,
      shutdownGraceSec: raw.reaper?.shutdown_grace_sec ?? DEFAULTS.reaper.shutdown_grace_sec,
    },
    orphans: { schedule: orphanSchedule },
    containment: { cgroupBase: raw.containment?.cgroup_base ?? DEFAULTS.containment.cgroup_base },
    pressure: pressureConfig(raw.pressure ?? {}),
    profiles,
  });
}

function buildProfile(
  name: string,
  p: Required<
    Omit<
      RawProfile,
      | "close_hook"
      | "allowed_roots"
      | "allowed_uids"
      | "release_hooks"
      | "busy_cpu_percent"
      | "orphans"
      | "warn_hooks"
      | "unkillable_hook"
    >
  > & {
    warn_hooks: readonly (string | string[])[];
    allowed_roots: readonly string[];
    allowed_uids?: readonly number[];
    close_hook?: string | string[];
    unkillable_hook?: readonly string[];
    release_hooks: readonly (string | string[])[];
    busy_cpu_percent?: number;
    orphans?: RawOrphans | undefined;
  },
  where: string,
): Profile {
  const roots = p.allowed_roots.map((r) => {
    const n = normalize(r).replace(/\/+$/, "");
    if (n !== r.replace(/\/+$/, "") || n === "" || n === "/") {
      throw new ReaperError(
        "SR_CONFIG_INVALID",
        `${where}: profiles.${name}.allowed_roots: "${r}" must be a normalized absolute path other than /`,
      );
    }
    return n;
  });
  const hook = p.close_hook;
  const busy = p.busy_cpu_percent ?? 0;
  const cores = availableParallelism();
  if (busy > 100 * cores) {
    throw new ReaperError(
      "SR_CONFIG_INVALID",
      `${where}: profiles.${name}.busy_cpu_percent: ${busy} exceeds 100 × the host's ${cores} cores (${100 * cores})`,
    );
  }
  for (const [key, limit] of [
    ["idle_timeout_sec", p.idle_timeout_sec],
    ["max_lifetime_sec", p.max_lifetime_sec],
  ] as const) {
    if (p.warn_before_sec > 0 && limit > 0 && p.warn_before_sec >= limit) {
      throw new ReaperError(
        "SR_CONFIG_INVALID",
        `${where}: profiles.${name}.warn_before_sec: ${p.warn_before_sec} is not shorter than ${key} (${limit}): the warning would come before the session began`,
      );
    }
  }
  return {
    name,
    warnBeforeSec: p.warn_before_sec,
    warnHooks: p.warn_hooks.map((h, i) => hookOf(h, `${where}: profiles.${name}.warn_hooks.${i}`, WARN_PLACEHOLDERS)),
    maxExtendSec: p.max_extend_sec,
    heartbeatTimeoutSec: p.heartbeat_timeout_sec,
    idleTimeoutSec: p.idle_timeout_sec,
    maxLifetimeSec: p.max_lifetime_sec,
    gracePeriodSec: p.grace_period_sec,
    stepTimeoutSec: p.step_timeout_sec,
    allowedRoots: roots,
    allowedUids: p.allowed_uids ? [...p.allowed_uids] : null,
    closeHook:
      hook === undefined
        ? null
        : typeof hook === "string"
          ? { kind: "http", path: hook }
          : { kind: "command", argv: template(hook, `${where}: profiles.${name}.close_hook`) },
    releaseHooks: p.release_hooks.map((h, i) => hookOf(h, `${where}: profiles.${name}.release_hooks.${i}`)),
    unkillableTimeoutSec: p.unkillable_timeout_sec,
    unkillableHook:
      p.unkillable_hook === undefined
        ? null
        : template(p.unkillable_hook, `${where}: profiles.${name}.unkillable_hook`, UNKILLABLE_PLACEHOLDERS),
    hookPath: p.hook_path,
    busyCpuPercent: busy > 0 ? busy : null,
    containment: p.containment,
    removeIpc: p.remove_ipc,
    orphans: orphanPolicy(p.orphans, roots, p.allowed_uids ?? null, `${where}: profiles.${name}.orphans`),
  };
}

/** What the unkillable hook's argv may name besides the hook templates: the unkillable pids, comma-joined. */
export const UNKILLABLE_PLACEHOLDERS = ["pids"] as const;

/** What a warning hook's argv may name besides the hook templates. */
export const WARN_PLACEHOLDERS = ["reason", "in_sec"] as const;

/** A release or warning hook: a loopback URL, or an argv whose placeholders are checked. */
function hookOf(h: string | readonly string[], key: string, extra: readonly string[] = []): ReleaseHook {
  return typeof h === "string"
    ? { kind: "http", url: loopbackUrl(h, key) }
    : { kind: "command", argv: template(h, key, extra) };
}

/** [pressure], with its defaults. */
function pressureConfig(p: NonNullable<Raw["pressure"]>): PressureConfig {
  const d = DEFAULTS.pressure;
  return {
    file: p.file ?? d.file,
    someAvg10: p.some_avg10 ?? d.some_avg10,
    durationSec: p.duration_sec ?? d.duration_sec,
    cooldownSec: p.cooldown_sec ?? d.cooldown_sec,
    spareActiveSec: p.spare_active_sec ?? d.spare_active_sec,
    spareCpuPercent: p.spare_cpu_percent ?? d.spare_cpu_percent,
  };
}

/** A command hook's argv, its placeholders checked (src/config/hook-template.ts). */
function template(argv: readonly string[], key: string, extra: readonly string[] = []): readonly string[] {
  const problem = templateProblem(argv, extra);
  if (problem !== null) throw new ReaperError("SR_CONFIG_INVALID", `${key}: ${problem}`);
  return argv;
}

/** A croner pattern, checked by building a paused job. */
function checkSchedule(pattern: string, where: string, key: string): string {
  try {
    new Cron(pattern, { paused: true }).stop();
  } catch (err) {
    throw new ReaperError("SR_CONFIG_INVALID", `${where}: ${key}: ${errorMessage(err)}`);
  }
  return pattern;
}

/**
 * A profile's orphan matcher. The sweep may end up killing what it matches, so nothing is
 * guessed: uids are required, the regex must compile, and every glob must lie below one of
 * the profile's own allowed roots (the delete path re-checks at delete time anyway).
 */
function orphanPolicy(
  raw: RawOrphans | undefined,
  roots: readonly string[],
  allowedUids: readonly number[] | null,
  key: string,
): OrphanPolicy | null {
  if (raw === undefined) return null;
  const mode = raw.mode ?? ORPHAN_DEFAULTS.mode;
  if (mode === "off") return null;
  const fail = (what: string, message: string): never => {
    throw new ReaperError("SR_CONFIG_INVALID", `${key}${what}: ${message}`);
  };
  const paths = raw.paths ?? [];
  if (raw.exe === undefined && raw.cmdline === undefined && paths.length === 0) {
    fail("", `mode "${mode}" needs something to match: exe, cmdline or paths`);
  }
  if (raw.uids === undefined) {
    fail(".uids", "required: the sweep only considers processes and paths of the uids listed here");
  }
  const outside = allowedUids === null ? [] : (raw.uids ?? []).filter((u) => !allowedUids.includes(u));
  if (outside.length > 0) {
    fail(".uids", `${outside.join(", ")} not in the profile's allowed_uids: the sweep may not act beyond the profile`);
  }
  if (raw.exe !== undefined && normalize(raw.exe) !== raw.exe)
    fail(".exe", `"${raw.exe}" must be a normalized absolute path`);
  if (raw.cmdline !== undefined) {
    try {
      new RegExp(raw.cmdline);
    } catch (err) {
      fail(".cmdline", `not a valid regular expression: ${errorMessage(err)}`);
    }
  }
  paths.forEach((glob, i) => {
    const problem = globProblem(glob, roots);
    if (problem !== null) fail(`.paths.${i}`, `"${glob}" ${problem}`);
  });
  return {
    mode,
    exe: raw.exe ?? null,
    cmdline: raw.cmdline ?? null,
    uids: raw.uids ?? [],
    minAgeSec: raw.min_age_sec ?? ORPHAN_DEFAULTS.min_age_sec,
    paths,
  };
}

/**
 * A release hook runs after the engine is gone, against a service the daemon does not know:
 * only plain http to a literal loopback address (127.0.0.0/8 or [::1]) is accepted, so a
 * config mistake can never send session details off the host. No host name (`localhost`
 * resolves through /etc/hosts), no credentials in the URL (it is journaled and logged).
 */
function loopbackUrl(text: string, key: string): string {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new ReaperError("SR_CONFIG_INVALID", `${key}: "${text}" is not a valid URL`);
  }
  const loopback = /^127\.\d+\.\d+\.\d+$/.test(url.hostname) || url.hostname === "[::1]";
  if (url.protocol !== "http:" || !loopback || url.username !== "" || url.password !== "" || url.hash !== "") {
    throw new ReaperError(
      "SR_CONFIG_INVALID",
      `${key}: "${text}" must be an http:// URL to a literal loopback address (127.0.0.0/8 or [::1]), without credentials or fragment`,
    );
  }
  return url.href;
}

/** A group setting: "" = none, digits = a gid, otherwise a name looked up in /etc/group. */
function groupId(value: string, groupFile: string, where: string, key = "api.admin_group"): number | null {
  if (value === "") return null;
  if (/^[0-9]+$/.test(value)) {
    const gid = Number(value);
    if (gid > 4294967294) throw new ReaperError("SR_CONFIG_INVALID", `${where}: ${key}: ${value} is not a gid`);
    return gid;
  }
  let text: string;
  try {
    text = readFileSync(groupFile, "utf8");
  } catch (err) {
    throw new ReaperError("SR_CONFIG_INVALID", `${where}: ${key}: cannot read ${groupFile}: ${errorMessage(err)}`);
  }
  for (const line of text.split("\n")) {
    const [name, , gid] = line.split(":");
    if (name === value && gid !== undefined && /^[0-9]+$/.test(gid)) return Number(gid);
  }
  throw new ReaperError("SR_CONFIG_INVALID", `${where}: ${key}: no group is named "${value}" in ${groupFile}`);
}

/**
 * api.tcp.listen: "127.0.0.1:PORT" (any 127.0.0.0/8 address) or "[::1]:PORT". A literal
 * loopback address only, never a name or a wildcard: the API must not be reachable off the host.
 */
function loopbackListen(text: string, key: string): { host: string; port: number } {
  const m = /^(127\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[::1\]):([0-9]{1,5})$/.exec(text);
  const port = m ? Number(m[2]) : NaN;
  const host = m?.[1]?.replace(/^\[|\]$/g, "");
  if (
    m === null ||
    host === undefined ||
    port < 0 ||
    port > 65535 ||
    !/^(::1|127(\.(25[0-5]|2[0-4]\d|1?\d?\d)){3})$/.test(host)
  ) {
    throw new ReaperError(
      "SR_CONFIG_INVALID",
      `${key}: "${text}" must be a literal loopback address and port, e.g. 127.0.0.1:7787 or [::1]:7787`,
    );
  }
  return { host, port };
}

function deepFreeze<T>(value: T): T {
  if (value !== null && typeof value === "object") {
    for (const v of Object.values(value)) deepFreeze(v);
    Object.freeze(value);
  }
  return value;
}
