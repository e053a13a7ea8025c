import { constants } from "node:os";
import type { Logger } from "pino";
import type { ProcessIdentity } from "../sessions/types.js";
import { bootId } from "./identity.js";
import { ProcessHandle } from "./pidfd.js";
import { isExited, isKernelThread, readStat, type ProcStat } from "./stat.js";

export type SignalResult = "sent" | "gone" | "refused";

/**
 * The one code path through which the daemon signals a process. It refuses pid <= 1, the
 * daemon itself and kernel threads whatever the caller says, and never hits a reused pid:
 *
 * - With pidfd (Linux 5.3+): open a pidfd on the pid, then check the identity (boot id +
 *   start time) of the process *that pidfd refers to*, then signal through the pidfd. A pidfd
 *   names one process for good, so a pid reused after the check cannot be hit.
 * - Without: check the identity, then kill(2) (a window of microseconds remains).
 *
 * Every signal sent or refused is logged.
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
  const handle = ProcessHandle.open(target.pid);
  try {
    // With a handle open, the process it refers to cannot be replaced: this check is final.
    const stat = readStat(target.pid);
    const verdict = judge(stat, target);
    if (verdict !== "ok") {
      if (verdict === "refused") log.warn(fields, "signal refused: kernel thread");
      return verdict;
    }
    if (handle !== null) {
      if (!handle.signal(constants.signals[signal])) return "gone";
    } else {
      process.kill(target.pid, signal);
    }
    log.info({ ...fields, comm: stat?.comm, via: handle ? "pidfd" : "kill" }, "signal sent");
    return "sent";
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ESRCH") return "gone";
    log.warn({ ...fields, err }, "signal failed");
    return "refused";
  } finally {
    handle?.close();
  }
}

function judge(stat: ProcStat | null, target: ProcessIdentity): "ok" | "gone" | "refused" {
  if (!stat || isExited(stat) || stat.startTime !== target.startTime) return "gone";
  if (isKernelThread(stat)) return "refused";
  return "ok";
}
