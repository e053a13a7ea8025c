import { readFileSync } from "node:fs";
import { ReaperError } from "../errors.js";
import type { ProcessIdentity } from "../model/session.js";
import { isExited, isKernelThread, readStat, readUid } from "./stat.js";

let cachedBootId: string | undefined;

/** /proc/sys/kernel/random/boot_id: start times are only comparable within one boot. */
export function bootId(): string {
  cachedBootId ??= readFileSync("/proc/sys/kernel/random/boot_id", "latin1").trim();
  return cachedBootId;
}

/** The kernel's PID_MAX_LIMIT (2^22): no pid is ever larger, whatever kernel.pid_max says. */
const PID_MAX_LIMIT = 4194304;

/**
 * Records the identity of a process that may be managed: a live (not zombie), user-space
 * process other than pid 1 and the daemon itself. Throws SR_INVALID_PID or
 * SR_PROCESS_NOT_FOUND; `field` names the request field in the message.
 */
export function identify(pid: number, field: string, daemonPid: number): ProcessIdentity {
  if (!Number.isSafeInteger(pid) || pid <= 1 || pid > PID_MAX_LIMIT) {
    throw new ReaperError(
      "SR_INVALID_PID",
      `${field}: ${pid} is not a manageable pid (must be an integer from 2 to ${PID_MAX_LIMIT})`,
    );
  }
  if (pid === daemonPid) {
    throw new ReaperError("SR_INVALID_PID", `${field}: ${pid} is the daemon itself`);
  }
  const stat = readStat(pid);
  if (!stat || isExited(stat)) {
    throw new ReaperError("SR_PROCESS_NOT_FOUND", `${field}: no live process has pid ${pid}`);
  }
  if (isKernelThread(stat)) {
    throw new ReaperError("SR_INVALID_PID", `${field}: ${pid} is a kernel thread`);
  }
  const uid = readUid(pid);
  if (uid === null) throw new ReaperError("SR_PROCESS_NOT_FOUND", `${field}: no live process has pid ${pid}`);
  return { pid, startTime: stat.startTime, bootId: bootId(), uid };
}

export type Liveness = "alive" | "gone";

/**
 * Whether the process this identity names still runs. A zombie, a vanished pid, a pid now
 * worn by another process (start time differs) and any process of an earlier boot are gone.
 */
export function liveness(id: ProcessIdentity): Liveness {
  if (id.bootId !== bootId()) return "gone";
  const stat = readStat(id.pid);
  if (!stat || isExited(stat) || stat.startTime !== id.startTime) return "gone";
  return "alive";
}
