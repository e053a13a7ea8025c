import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { constants } from "node:os";
import type { Logger } from "pino";
import type { ProcessIdentity } from "../model/session.js";
import { cgroupPids, ownCgroup } from "./cgroup.js";
import { bootId } from "./identity.js";
import { ProcessHandle } from "./pidfd.js";
import { isExited, isKernelThread, readStat, readUid, type ProcStat } from "./stat.js";

export type SignalResult = "sent" | "gone" | "refused";

export interface SignalPolicy {
  /**
   * When set, only a process whose real uid is this one may be signalled (a session that a
   * non-admin registered is reaped with that user's power: src/auth/policy.ts). The uid is
   * read again with the pidfd held, so a process that changed uid since it was seen is refused.
   */
  readonly onlyUid?: number | undefined;
}

/**
 * The one code path through which the daemon signals a process. It refuses pid <= 1, the
 * daemon itself and kernel threads whatever the caller says, and never hits a reused pid:
 *
 * - With pidfd (Linux 5.3+): open a pidfd on the pid, then check the identity (boot id +
 *   start time) of the process *that pidfd refers to*, then signal through the pidfd. A pidfd
 *   names one process for good, so a pid reused after the check cannot be hit.
 * - Without: check the identity, then kill(2) (a window of microseconds remains).
 *
 * - Policy: with `policy.onlyUid`, a process of another uid is refused.
 *
 * Every signal sent or refused is logged.
 */
export function signalProcess(
  target: ProcessIdentity,
  signal: NodeJS.Signals,
  log: Logger,
  daemonPid: number,
  policy: SignalPolicy = {},
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
    if (policy.onlyUid !== undefined) {
      const uid = readUid(target.pid);
      if (uid === null) return "gone";
      if (uid !== policy.onlyUid) {
        log.warn({ ...fields, uid, onlyUid: policy.onlyUid }, "signal refused: the process runs as another uid");
        return "refused";
      }
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

/**
 * The other signal path: `cgroup.kill` SIGKILLs every process of a cgroup at once, with no
 * fork race. Used only when `ownCgroup` finds the cgroup is the engine's own (see there);
 * the engine's identity is checked first. Logged like every signal.
 */
export function killCgroup(engine: ProcessIdentity, log: Logger, policy: SignalPolicy = {}): string | null {
  // Held while /proc/<pid>/cgroup is read, so the pid cannot change hands meanwhile.
  const handle = ProcessHandle.open(engine.pid);
  let verdict;
  try {
    if (engine.bootId !== bootId() || judge(readStat(engine.pid), engine) !== "ok") return null;
    verdict = ownCgroup(engine.pid, engine.startTime, policy.onlyUid);
  } finally {
    handle?.close();
  }
  if (!verdict.usable) {
    log.debug({ pid: engine.pid, why: verdict.why }, "cgroup.kill not used");
    return null;
  }
  try {
    writeFileSync(join(verdict.dir, "cgroup.kill"), "1");
  } catch (err) {
    log.warn({ cgroup: verdict.dir, err }, "cgroup.kill failed");
    return null;
  }
  log.info({ cgroup: verdict.dir, pid: engine.pid }, "signal sent: cgroup.kill");
  return verdict.dir;
}

/**
 * `cgroup.kill` on a session's own cgroup (containment: the daemon made it, or found it as
 * the engine's own at registration): every process in it and its descendant cgroups gets
 * SIGKILL from the kernel at once, whatever it forked, double-forked or setsid'd. The cgroup
 * holds only the session's processes (the daemon moved them there, or the launcher made it
 * for the engine), so no identity is checked per process; the policy is: for a non-admin's
 * session, no member may run as another uid (then nothing is written, and the per-process
 * path handles the members it may). Logged like every signal.
 */
export function killSessionCgroup(dir: string, log: Logger, policy: SignalPolicy = {}): "sent" | "refused" | "failed" {
  if (policy.onlyUid !== undefined) {
    const others = cgroupPids(dir).filter((pid) => {
      const uid = readUid(pid);
      return uid !== null && uid !== policy.onlyUid;
    });
    if (others.length > 0) {
      log.warn({ cgroup: dir, others: others.slice(0, 5), onlyUid: policy.onlyUid }, "signal refused: cgroup.kill");
      return "refused";
    }
  }
  try {
    writeFileSync(join(dir, "cgroup.kill"), "1");
  } catch (err) {
    log.warn({ cgroup: dir, err }, "cgroup.kill failed");
    return "failed";
  }
  log.info({ cgroup: dir }, "signal sent: cgroup.kill");
  return "sent";
}
