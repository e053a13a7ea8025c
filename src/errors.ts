/**
 * Every error the daemon reports has a stable code and an HTTP status, kept here in one
 * place (as fastify's lib/errors.js does). Clients and tests match on `code`, never on
 * the message, so messages may be improved freely; codes are a contract.
 */
export const ERRORS = {
  SR_BAD_REQUEST: { status: 400, summary: "the request does not match the route's schema" },
  SR_INVALID_JSON: { status: 400, summary: "the body is not valid JSON" },
  SR_BODY_TOO_LARGE: { status: 413, summary: "the body exceeds the size cap" },
  SR_HEADERS_TOO_LARGE: { status: 431, summary: "the request line and headers exceed 16 KiB" },
  SR_REQUEST_TIMEOUT: {
    status: 408,
    summary: "the request's headers or body did not arrive within api.header_timeout_ms / request_timeout_ms",
  },
  SR_UNSUPPORTED_MEDIA_TYPE: { status: 415, summary: "the body must be application/json" },
  SR_ROUTE_NOT_FOUND: { status: 404, summary: "no such route" },
  SR_INVALID_PID: { status: 400, summary: "the pid may not be managed (pid <= 1, the daemon, a kernel thread)" },
  SR_PROCESS_NOT_FOUND: { status: 400, summary: "no live process has this pid" },
  SR_INVALID_PATH: { status: 400, summary: "the path is not absolute and normalized, or is a root itself" },
  SR_PATH_SYMLINK: { status: 400, summary: "a component of the path is a symbolic link" },
  SR_PATH_OUTSIDE_ROOT: { status: 400, summary: "the path is not below one of the profile's allowed roots" },
  SR_PATH_NOT_OWNED: { status: 400, summary: "the path is not owned by the engine's uid" },
  SR_PATH_OTHER_FS: { status: 400, summary: "the path is on another file system than its allowed root" },
  SR_PORT_NOT_OWNED: {
    status: 400,
    summary: "the port is not held by the engine's process tree (TCP LISTEN, or a bound UDP socket)",
  },
  SR_LIMIT_EXCEEDED: {
    status: 400,
    summary: "too many ports, paths or labels in one session (64 each), or a field over its length cap",
  },
  SR_UNAUTHORIZED: { status: 401, summary: "loopback TCP: the bearer token is missing or wrong" },
  SR_HOST_REFUSED: { status: 403, summary: "loopback TCP: the Host header is not a loopback name (DNS rebinding)" },
  SR_ORIGIN_REFUSED: { status: 403, summary: "loopback TCP: requests with an Origin header (browsers) are refused" },
  SR_CALLER_UNKNOWN: {
    status: 403,
    summary: "the caller's credentials could not be read (SO_PEERCRED), so nothing may be changed",
  },
  SR_PROCESS_NOT_OWNED: {
    status: 403,
    summary: "a non-admin caller named a process (engine or owner) that runs under another uid",
  },
  SR_UID_NOT_ALLOWED: { status: 403, summary: "the profile's allowed_uids does not include the engine's uid" },
  SR_NOT_SESSION_OWNER: {
    status: 403,
    summary:
      "only the uid that registered the session, or an admin, may heartbeat, close or reap it, or follow its events (GET /v1/events?session=)",
  },
  SR_TOO_MANY_SESSIONS: { status: 429, summary: "the caller's uid already has api.max_sessions_per_uid live sessions" },
  SR_TOO_MANY_STREAMS: {
    status: 429,
    summary: "the caller's uid (not an admin) already has 8 event streams (GET /v1/events) open",
  },
  SR_UNKNOWN_PROFILE: { status: 400, summary: "no profile has this name" },
  SR_TIMEOUT_ABOVE_MAX: { status: 400, summary: "a requested timeout exceeds the profile's maximum" },
  SR_EXTEND_ABOVE_MAX: {
    status: 400,
    summary: "a requested extension exceeds the profile's max_extend_sec (detail: maxExtendSec)",
  },
  SR_CONTAINMENT_UNAVAILABLE: {
    status: 400,
    summary: 'the profile requires a cgroup per session (containment = "cgroup") and none could be made or filled',
  },
  SR_SESSION_EXISTS: { status: 409, summary: "a session with this id already exists" },
  SR_SESSION_NOT_FOUND: { status: 404, summary: "no session has this id" },
  SR_SESSION_GONE: {
    status: 410,
    summary:
      "the session ended and its record was purged (store.retain_reaped_sec): its tombstone says when and why; do not register it again",
  },
  SR_EVENTS_PURGED: {
    status: 410,
    summary:
      "GET /v1/events: events after `since` were purged (store.retain_reaped_sec): detail.purgedThrough is the highest seq removed; resume from it knowing what is lost",
  },
  SR_SESSION_FENCED: { status: 409, summary: "the session is being reaped or was reaped" },
  SR_SESSION_NOT_LIVE: { status: 409, summary: "the session is no longer live" },
  SR_SESSION_DAMAGED: {
    status: 409,
    summary:
      "a stored value of the session cannot be read (a damaged row): it cannot be changed, and if its engine cannot be identified (state damaged) it takes no heartbeats; close or force-reap it",
  },
  SR_INVALID_CURSOR: { status: 400, summary: "the list cursor is malformed" },
  SR_SHUTTING_DOWN: { status: 503, summary: "the daemon is shutting down and takes no new sessions" },
  SR_STORE_UNAVAILABLE: {
    status: 503,
    summary:
      "the database cannot commit now (locked by another process, disk full, I/O error): nothing was changed; retry later",
  },
  SR_INTERNAL: { status: 500, summary: "an unexpected error; see the daemon's log" },
  SR_CONFIG_INVALID: { status: 500, summary: "the configuration is invalid" },
  SR_DAEMON_UNREACHABLE: { status: 503, summary: "the daemon's socket cannot be reached (CLI only)" },
  SR_ALREADY_RUNNING: {
    status: 500,
    summary: "another daemon holds the database's lock or answers on the socket (start only: exit 78)",
  },
  SR_STORE_CORRUPT: { status: 500, summary: "the database failed its integrity check (start only: exit 78)" },
  SR_STORE_UNUSABLE: { status: 500, summary: "the database cannot be opened or written (start only: exit 78)" },
} as const;

export type ErrorCode = keyof typeof ERRORS;

/** Codes that never come from the daemon's own process, so never in an HTTP answer. */
const NOT_FROM_THE_API: ReadonlySet<ErrorCode> = new Set([
  "SR_CONFIG_INVALID",
  "SR_DAEMON_UNREACHABLE",
  "SR_ALREADY_RUNNING",
  "SR_STORE_CORRUPT",
  "SR_STORE_UNUSABLE",
]);

/** Codes that stop the daemon at start with exit 78 (EX_CONFIG: systemd does not restart-loop on it). */
export const START_REFUSALS: ReadonlySet<ErrorCode> = new Set([
  "SR_CONFIG_INVALID",
  "SR_ALREADY_RUNNING",
  "SR_STORE_CORRUPT",
  "SR_STORE_UNUSABLE",
]);

/** The codes an API answer may carry (the OpenAPI document's error envelope lists them). */
export const API_ERROR_CODES: readonly ErrorCode[] = (Object.keys(ERRORS) as ErrorCode[]).filter(
  (c) => !NOT_FROM_THE_API.has(c),
);

export class ReaperError extends Error {
  readonly code: ErrorCode;
  readonly status: number;
  readonly detail: Record<string, unknown> | undefined;

  constructor(code: ErrorCode, message: string, detail?: Record<string, unknown>) {
    super(message);
    this.name = "ReaperError";
    this.code = code;
    this.status = ERRORS[code].status;
    this.detail = detail;
  }
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
