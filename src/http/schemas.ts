/**
 * JSON schemas for every body, query and path parameter the API accepts. The routes
 * validate with exactly these objects (additionalProperties: false everywhere), and the
 * OpenAPI document is generated from them: one source of truth.
 */
export const SESSION_ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$";

const timeout = (minimum: number) => ({ type: "integer", minimum, maximum: 315360000 }) as const;

export const registerBody = {
  type: "object",
  additionalProperties: false,
  required: ["engine"],
  properties: {
    id: { type: "string", pattern: SESSION_ID_PATTERN },
    profile: { type: "string", minLength: 1, maxLength: 64 },
    owner: { type: "string", maxLength: 256 },
    engine: {
      type: "object",
      additionalProperties: false,
      required: ["pid"],
      // A number, not an integer: every pid problem answers SR_INVALID_PID.
      properties: { pid: { type: "number" } },
    },
    ownerPid: { type: "number" },
    ports: { type: "array", maxItems: 64, uniqueItems: true, items: { type: "integer", minimum: 1, maximum: 65535 } },
    paths: { type: "array", maxItems: 64, uniqueItems: true, items: { type: "string", minLength: 1, maxLength: 4096 } },
    heartbeatTimeoutSec: timeout(1),
    idleTimeoutSec: timeout(1),
    maxLifetimeSec: timeout(0),
    labels: {
      type: "object",
      maxProperties: 64,
      propertyNames: { pattern: "^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$" },
      additionalProperties: { type: "string", maxLength: 256 },
    },
  },
} as const;

export const heartbeatBody = {
  type: "object",
  additionalProperties: false,
  properties: { activity: { enum: ["busy", "idle"] } },
} as const;

export const emptyBody = { type: "object", additionalProperties: false, properties: {} } as const;

export const sessionIdParams = {
  type: "object",
  additionalProperties: false,
  required: ["id"],
  properties: { id: { type: "string", pattern: SESSION_ID_PATTERN } },
} as const;

export const listQuery = {
  type: "object",
  additionalProperties: false,
  properties: {
    state: { enum: ["live", "reaping", "reaped"] },
    profile: { type: "string", minLength: 1, maxLength: 64 },
    owner: { type: "string", maxLength: 256 },
    limit: { type: "integer", minimum: 1, maximum: 1000, default: 100 },
    cursor: { type: "string", maxLength: 64 },
  },
} as const;

export const noQuery = { type: "object", additionalProperties: false, properties: {} } as const;

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

export interface ListQuery {
  state?: "live" | "reaping" | "reaped";
  profile?: string;
  owner?: string;
  limit: number;
  cursor?: string;
}
