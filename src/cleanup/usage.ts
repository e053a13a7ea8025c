import type { Session } from "../model/session.js";
import { journaled, type Journal } from "./journal.js";

/** What a session cost, reported when it ends (no peer does: a cost nobody sees is never cut). */
export interface SessionUsage {
  /** CPU seconds its processes used: the cgroup's total when contained, else the tree's at the reap. */
  readonly cpuSec: number;
  /** The most memory seen: the cgroup's memory.peak where the memory controller is on, else the largest resident sum the liveness passes and the reap saw. */
  readonly peakMemoryBytes: number;
  readonly peakMemorySource: "memory.peak" | "rss-samples";
  /** The most processes its tree was seen with. */
  readonly peakProcesses: number;
  /** From registration to the fence. */
  readonly lifetimeSec: number;
}

/** The session's usage, from what the fence (peaks) and terminate (usage before signalling) journaled. */
export function sessionUsage(session: Session, journal: Journal, now: number): SessionUsage {
  const t = journaled(journal, "terminate")?.usage;
  const peaks = journaled(journal, "fence")?.peaks;
  const fromPeak = t?.memorySource === "memory.peak";
  return {
    cpuSec: Math.round((t?.cpuSec ?? 0) * 1000) / 1000,
    peakMemoryBytes: fromPeak ? (t?.memoryBytes ?? 0) : Math.max(peaks?.rssBytes ?? 0, t?.memoryBytes ?? 0),
    peakMemorySource: fromPeak ? "memory.peak" : "rss-samples",
    peakProcesses: Math.max(peaks?.processes ?? 0, t?.processes ?? 0),
    lifetimeSec: Math.max(0, ((session.reapStartedAt ?? now) - session.createdAt) / 1000),
  };
}
