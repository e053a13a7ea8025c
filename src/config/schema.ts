/**
 * The configuration file's schema and every default, in one place. The file is TOML with
 * snake_case keys; the rest of the code sees the camelCase `Config` built by load.ts.
 */
export const PROFILE_DEFAULTS = {
  heartbeat_timeout_sec: 30,
  idle_timeout_sec: 3600,
  max_lifetime_sec: 0,
  grace_period_sec: 10,
  step_timeout_sec: 30,
  // SIGKILL to death: 5 s, not the 3 s terminate waited before it had a name. A process with
  // a large resident set (tens of GB to unmap) or thousands of threads, on a loaded host, may
  // need more than 3 s to finish dying; past this it is reported `unkillable`, and that (its
  // alert, its hook) must mean the kernel holds it, not that it was slow.
  unkillable_timeout_sec: 5,
  allowed_roots: ["/tmp", "/var/tmp"],
  release_hooks: [],
  containment: "auto",
  remove_ipc: false,
  hook_path: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
  // No warning before a reap; an extension of up to 8 hours (a working day) on request.
  warn_before_sec: 0,
  warn_hooks: [],
  max_extend_sec: 28800,
} as const;

export const DEFAULTS = {
  api: {
    socket_mode: "0660",
    socket_group: "",
    body_limit_bytes: 16384,
    admin_group: "",
    max_sessions_per_uid: 1000,
    header_timeout_ms: 10000,
    request_timeout_ms: 30000,
    keep_alive_timeout_ms: 5000,
    max_connections: 1024,
    max_connections_per_uid: 128,
  },
  // Retention: reaped sessions 30 days, their tombstones a year (0: kept for ever).
  store: { flush_interval_ms: 1000, retain_reaped_sec: 2_592_000, retain_tombstones_sec: 31_536_000 },
  log: { level: "info", file: "" },
  detect: { liveness_schedule: "*/2 * * * * *", liveness_cpu_percent: 0.25 },
  reaper: { concurrency: 1024, shutdown_grace_sec: 20 },
  // Every minute (croner, with seconds); the sweep also runs once at start, after recovery.
  orphans: { schedule: "0 * * * * *" },
  // Off (some_avg10 = 0): see src/detect/pressure.ts.
  pressure: {
    file: "/proc/pressure/memory",
    some_avg10: 0,
    duration_sec: 30,
    cooldown_sec: 60,
    spare_active_sec: 300,
    spare_cpu_percent: 5,
  },
  // "": found at start (the service's own delegated cgroup under systemd, else a
  // session-reaper tree at the cgroup v2 root); see src/proc/containment.ts.
  containment: { cgroup_base: "" },
} as const;

/** A profile's [profiles.NAME.orphans] table: mode when absent, and the age below which nothing is taken. */
export const ORPHAN_DEFAULTS = { mode: "report", min_age_sec: 600 } as const;

const seconds = (minimum: number) => ({ type: "integer", minimum, maximum: 10 * 365 * 86400 });

/**
 * A list of release or warning hooks: each a loopback URL POSTed to (load.ts checks that the
 * host is a loopback address), or an argv run by the daemon, as its own user.
 */
const hookList = {
  type: "array",
  maxItems: 32,
  items: {
    oneOf: [
      { type: "string", pattern: "^http://[^\\s]+$", maxLength: 2048 },
      { type: "array", minItems: 1, items: { type: "string", minLength: 1 } },
    ],
  },
} as const;

const profileSchema = {
  type: "object",
  additionalProperties: false,
  properties: {
    heartbeat_timeout_sec: seconds(1),
    idle_timeout_sec: seconds(1),
    max_lifetime_sec: seconds(0),
    grace_period_sec: { type: "number", minimum: 0, maximum: 3600 },
    step_timeout_sec: { type: "number", minimum: 0.1, maximum: 3600 },
    // Engine CPU above this (percent of one core) counts as activity; 0 turns it off (absent
    // is off too, unless [profiles.default] sets it). load.ts caps it at 100 × the host's cores.
    busy_cpu_percent: { type: "number", minimum: 0 },
    // auto: a cgroup of its own for every session where the host allows one; cgroup: required
    // (registration is refused without one); none: never.
    containment: { enum: ["auto", "cgroup", "none"] },
    // IPC the session left (POSIX shm in /dev/shm, SysV shm, semaphores, queues) is always
    // reported as `ipc` leftovers; with true it is also removed (as its owner).
    remove_ipc: { type: "boolean" },
    allowed_roots: {
      type: "array",
      items: { type: "string", pattern: "^/", minLength: 2 },
      uniqueItems: true,
    },
    // Engine uids this profile may manage, whoever registers (admins included); absent = any.
    allowed_uids: {
      type: "array",
      items: { type: "integer", minimum: 0, maximum: 4294967294 },
      uniqueItems: true,
    },
    // PATH for command hooks (close and release); HOME, USER and LOGNAME come from passwd.
    hook_path: { type: "string", pattern: "^/[^\\s]*$", maxLength: 4096 },
    close_hook: {
      oneOf: [
        // An HTTP path POSTed to the engine's first registered port on loopback.
        { type: "string", pattern: "^/[^\\s]*$", maxLength: 1024 },
        // An argv run by the daemon, as the session's uid.
        { type: "array", minItems: 1, items: { type: "string", minLength: 1 } },
      ],
    },
    // How long a SIGKILLed process may take to die before it is an `unkillable` leftover
    // (terminate's budget includes it).
    unkillable_timeout_sec: { type: "number", minimum: 0.1, maximum: 3600 },
    // Run once per reap that leaves unkillable processes: an argv run by the daemon, as its own
    // user (the hook templates, plus {pids}).
    unkillable_hook: { type: "array", minItems: 1, items: { type: "string", minLength: 1 } },
    // Run once the engine is gone (an outside registry or lock service).
    release_hooks: hookList,
    // A warning (session.warning, warn_hooks) this long before an idle or lifetime deadline; 0: none.
    warn_before_sec: seconds(0),
    // Run at each warning: a loopback URL POSTed to, or an argv run as the daemon's user (the
    // hook templates, plus {reason} and {in_sec}).
    warn_hooks: hookList,
    // The longest extension POST /v1/sessions/{id}/extend may ask (0: none may be asked).
    max_extend_sec: seconds(0),
    // How to recognise this profile's engines and leftovers that no session claims (the orphan
    // sweep, src/orphans/). Not inherited from [profiles.default]: a matcher names one profile's
    // engines. load.ts checks the regex, the uids and that every glob lies below allowed_roots.
    orphans: {
      type: "object",
      additionalProperties: false,
      properties: {
        mode: { enum: ["off", "report", "reap"] },
        exe: { type: "string", pattern: "^/", minLength: 2, maxLength: 4096 },
        cmdline: { type: "string", minLength: 1, maxLength: 4096 },
        uids: {
          type: "array",
          minItems: 1,
          maxItems: 1024,
          uniqueItems: true,
          items: { type: "integer", minimum: 0, maximum: 4294967294 },
        },
        min_age_sec: seconds(0),
        paths: {
          type: "array",
          maxItems: 64,
          uniqueItems: true,
          items: { type: "string", pattern: "^/", minLength: 2, maxLength: 4096 },
        },
      },
    },
  },
} as const;

export const configSchema = {
  type: "object",
  additionalProperties: false,
  properties: {
    api: {
      type: "object",
      additionalProperties: false,
      properties: {
        socket: { type: "string", pattern: "^/", minLength: 2 },
        socket_mode: { type: "string", pattern: "^0?[0-7]{3}$" },
        // The socket file's group (a name or a gid): "" keeps the daemon's own.
        socket_group: { type: "string", maxLength: 64 },
        body_limit_bytes: { type: "integer", minimum: 1024, maximum: 16777216 },
        // Members of this group (a name in /etc/group, or a numeric gid) are administrators, like
        // root; "" = none.
        admin_group: { type: "string", pattern: "^([A-Za-z_][A-Za-z0-9_.-]{0,31}|[0-9]{1,10})?$" },
        max_sessions_per_uid: { type: "integer", minimum: 1, maximum: 1000000 },
        header_timeout_ms: { type: "integer", minimum: 100, maximum: 600000 },
        request_timeout_ms: { type: "integer", minimum: 100, maximum: 600000 },
        keep_alive_timeout_ms: { type: "integer", minimum: 100, maximum: 600000 },
        max_connections: { type: "integer", minimum: 1, maximum: 65536 },
        // Connections one non-admin uid may hold open at once on the unix socket; load.ts
        // checks it is at most max_connections.
        max_connections_per_uid: { type: "integer", minimum: 1, maximum: 65536 },
        tcp: {
          type: "object",
          additionalProperties: false,
          required: ["listen", "token_file"],
          properties: {
            // "127.0.0.1:7787" or "[::1]:7787": a literal loopback address; load.ts checks it.
            listen: { type: "string", minLength: 3, maxLength: 64 },
            // A file holding the bearer token: mode 0600 or 0400, owned by the daemon's user.
            token_file: { type: "string", pattern: "^/", minLength: 2 },
          },
        },
      },
    },
    store: {
      type: "object",
      additionalProperties: false,
      properties: {
        path: { type: "string", minLength: 1 },
        flush_interval_ms: { type: "integer", minimum: 10, maximum: 60000 },
        retain_reaped_sec: { type: "integer", minimum: 0, maximum: 3_153_600_000 },
        retain_tombstones_sec: { type: "integer", minimum: 0, maximum: 3_153_600_000 },
      },
    },
    log: {
      type: "object",
      additionalProperties: false,
      properties: {
        level: { enum: ["fatal", "error", "warn", "info", "debug", "trace", "silent"] },
        file: { type: "string" },
      },
    },
    detect: {
      type: "object",
      additionalProperties: false,
      properties: {
        liveness_schedule: { type: "string", minLength: 1 },
        liveness_cpu_percent: { type: "number", exclusiveMinimum: 0, maximum: 100 },
      },
    },
    reaper: {
      type: "object",
      additionalProperties: false,
      properties: {
        concurrency: { type: "integer", minimum: 1, maximum: 4096 },
        shutdown_grace_sec: { type: "number", minimum: 0, maximum: 3600 },
      },
    },
    orphans: {
      type: "object",
      additionalProperties: false,
      properties: {
        schedule: { type: "string", minLength: 1 },
      },
    },
    pressure: {
      type: "object",
      additionalProperties: false,
      properties: {
        // A PSI file in the kernel's format: /proc/pressure/memory, or a cgroup v2 memory.pressure.
        file: { type: "string", pattern: "^/", minLength: 2, maxLength: 4096 },
        // The `some avg10` percentage at or above which pressure holds; 0 = off.
        some_avg10: { type: "number", minimum: 0, maximum: 100 },
        duration_sec: { type: "number", minimum: 0, maximum: 3600 },
        cooldown_sec: { type: "number", minimum: 0, maximum: 86400 },
        // A session active (heartbeat activity, busy CPU) this recently is never reclaimed.
        spare_active_sec: seconds(0),
        // Nor one whose processes used more CPU than this (percent of one core) over a sample.
        spare_cpu_percent: { type: "number", minimum: 0 },
      },
    },
    containment: {
      type: "object",
      additionalProperties: false,
      properties: {
        cgroup_base: { type: "string", pattern: "^(/.*)?$" },
      },
    },
    profiles: {
      type: "object",
      propertyNames: { pattern: "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$" },
      additionalProperties: profileSchema,
    },
  },
} as const;
