/**
 * What a caller may ask of sessions, whatever carries the request (the HTTP API validates its
 * JSON against src/http/schemas.ts, built on these limits; the client library sends these).
 */
import type { SessionState } from "./session.js";

/** A session's cap on ports, on paths and on labels. */
export const MAX_ITEMS = 64;

export interface RegisterBody {
  id?: string;
  profile?: string;
  owner?: string;
  engine: { pid: number };
  ownerPid?: number;
  ports?: number[];
  paths?: string[];
  heartbeatTimeoutSec?: number;
  idleTimeoutSec?: number;
  maxLifetimeSec?: number;
  labels?: Record<string, string>;
}

export interface UpdateBody {
  ports?: number[];
  paths?: string[];
  labels?: Record<string, string>;
}

export interface ExpiringQuery {
  withinSec: number;
}

export interface ListQuery {
  state?: SessionState;
  profile?: string;
  owner?: string;
  limit: number;
  cursor?: string;
}
