import { createHash, timingSafeEqual } from "node:crypto";
import { closeSync, constants, fstatSync, openSync, readFileSync } from "node:fs";
import type { IncomingHttpHeaders } from "node:http";
import { ReaperError, errorMessage, type ErrorCode } from "../errors.js";

/** Shortest token accepted: 128 bits, written as 32 hex digits or more. */
const MIN_TOKEN_LENGTH = 32;

/**
 * Reads the bearer token for loopback TCP. The file must be a regular file of the daemon's
 * own user (or root), readable by nobody else (mode 0600 or 0400), and hold one token of at
 * least 32 characters: a token others can read is no secret. Checked at start; the daemon
 * refuses to start otherwise (exit 78), naming the problem.
 */
export function loadToken(file: string, daemonUid: number): Buffer {
  const where = `api.tcp.token_file: ${file}`;
  let fd: number;
  try {
    fd = openSync(file, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NOCTTY);
  } catch (err) {
    throw new ReaperError("SR_CONFIG_INVALID", `${where}: cannot open: ${errorMessage(err)}`);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new ReaperError("SR_CONFIG_INVALID", `${where}: not a regular file`);
    if ((st.mode & 0o077) !== 0) {
      throw new ReaperError(
        "SR_CONFIG_INVALID",
        `${where}: mode ${(st.mode & 0o777).toString(8).padStart(4, "0")} lets others read it; chmod 0600`,
      );
    }
    if (st.uid !== daemonUid && st.uid !== 0) {
      throw new ReaperError("SR_CONFIG_INVALID", `${where}: owned by uid ${st.uid}, not by the daemon's user or root`);
    }
    const token = readFileSync(fd, "utf8").trim();
    if (token.length < MIN_TOKEN_LENGTH || /\s/.test(token)) {
      throw new ReaperError(
        "SR_CONFIG_INVALID",
        `${where}: must hold one token of at least ${MIN_TOKEN_LENGTH} characters without spaces (e.g. openssl rand -hex 32)`,
      );
    }
    return digest(token);
  } finally {
    closeSync(fd);
  }
}

const digest = (s: string): Buffer => createHash("sha256").update(s, "utf8").digest();

/** Loopback names a Host header may carry; any port. Anything else may be DNS rebinding. */
const LOOPBACK_HOST = /^(localhost|127\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[::1\])(:\d{1,5})?$/i;

export interface Refusal {
  status: number;
  code: ErrorCode;
  message: string;
}

/**
 * The three checks every loopback TCP request passes before it reaches a route, in this
 * order: no Origin header (a browser sends one, and must never drive this API), a loopback
 * Host (a DNS rebinding page reaches 127.0.0.1 under its own name), and the bearer token,
 * compared in constant time (both sides hashed to 32 bytes, so lengths never differ).
 */
export function tcpRefusal(headers: IncomingHttpHeaders, token: Buffer): Refusal | null {
  if (headers.origin !== undefined) {
    return { status: 403, code: "SR_ORIGIN_REFUSED", message: "requests carrying an Origin header are refused" };
  }
  const host = headers.host;
  if (host === undefined || !LOOPBACK_HOST.test(host)) {
    return {
      status: 403,
      code: "SR_HOST_REFUSED",
      message: "the Host header must name a loopback address (localhost, 127.0.0.1, [::1])",
    };
  }
  const auth = headers.authorization;
  const m = auth === undefined ? null : /^Bearer ([^\s]+)$/.exec(auth);
  const given = m?.[1];
  if (given === undefined || !timingSafeEqual(digest(given), token)) {
    return {
      status: 401,
      code: "SR_UNAUTHORIZED",
      message: "send Authorization: Bearer <token from api.tcp.token_file>",
    };
  }
  return null;
}
