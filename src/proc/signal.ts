import type { Logger } from "pino";
import type { ProcessIdentity } from "../sessions/types.js";
import { bootId } from "./identity.js";
import { isExited, isKernelThread, readStat } from "./stat.js";

export type SignalResult = "sent" | "gone" | "refused";

/**
 * The one code path through which the daemon signals a process. It refuses pid <= 1, the
 * daemon itself and kernel threads whatever the caller says, and re-checks the identity
 * (boot id + start time) immediately before kill(2), so a pid that was reused since the
 * session registered is never hit. Every signal sent or refused is logged.
 *
 * The window between the check and kill(2) is a few microseconds; a pidfd closes it (see
 * the issue on Linux-grade process safety).
 */
export function signalProcess(
  target: ProcessIdentity,
  signal: NodeJS.Signals,
  log: Logger,
  daemonPid: number,
): SignalResult {
  const fields = { pid: target.pid, signal };
  if (!Number.isSafeInteger(target.pid) || target.pid <= 1 || target.pid === daemonPid) {
    log.warn(fields, "signal refused: protected pid");
    return "refused";
  }
  if (target.bootId !== bootId()) return "gone";
  const stat = readStat(target.pid);
  if (!stat || isExited(stat) || stat.startTime !== target.startTime) return "gone";
  if (isKernelThread(stat)) {
    log.warn(fields, "signal refused: kernel thread");
    return "refused";
  }
  try {
    process.kill(target.pid, signal);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ESRCH") return "gone";
    log.warn({ ...fields, err }, "signal failed");
    return "refused";
  }
  log.info({ ...fields, comm: stat.comm }, "signal sent");
  return "sent";
}
