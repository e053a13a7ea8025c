import type { Session } from "../model/session.js";
import { journaled, type Journal, type SessionUsage } from "./journal.js";

export type { SessionUsage } from "./journal.js";

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
