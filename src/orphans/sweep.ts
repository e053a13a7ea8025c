/**
 * The orphan sweep: finds what escaped the sessions table. On its schedule (and once at
 * start, after recovery) it looks for
 *
 * - processes that match a profile's matcher, belong to no live or reaping session, and are
 *   older than the profile's min_age_sec;
 * - paths matching the profile's globs that belong to no such session and were not modified
 *   for min_age_sec;
 * - live sessions whose engine no longer matches its recorded identity (`identity_mismatch`).
 *
 * Each finding is reported once (an `orphan.found` audit event and a metric) while it stays
 * present; in reap mode it also becomes a synthetic session reaped as `orphaned` (adopt.ts).
 */
import { Cron } from "croner";
import { lstatSync, type Stats } from "node:fs";
import { dirname } from "node:path";
import type { Logger } from "pino";
import { journaled } from "../cleanup/journal.js";
import { knownProcesses } from "../cleanup/step.js";
import type { Config, OrphanPolicy, Profile } from "../config/load.js";
import type { Detector } from "../detect/detector.js";
import type { LiveSessions } from "../sessions/live.js";
import { errorMessage } from "../errors.js";
import type { Metrics } from "../metrics/metrics.js";
import { checkPath } from "../paths/validate.js";
import { bootId } from "../proc/identity.js";
import { portsHeldBy } from "../proc/sockets.js";
import { damageOf, describeDamage, engineReadable } from "../store/columns.js";
import {
  isExited,
  isKernelThread,
  listStats,
  listStatsPaced,
  readCmdline,
  readExe,
  readUid,
  startedAtMs,
  type ProcStat,
} from "../proc/stat.js";
import { ProcessTable } from "../proc/tree.js";
import { loopTurn } from "../pace/turns.js";
import { type ProcessIdentity, processKey, type Session, type StepName, type StepResult } from "../model/session.js";
import { adoptPath, adoptProcess, pathSessionId, processSessionId, type AdoptDeps } from "./adopt.js";
import { compileGlob, expandGlob, type PathGlob } from "../paths/glob.js";

export const ORPHAN_KINDS = ["process", "path", "identity_mismatch"] as const;
export type OrphanKind = (typeof ORPHAN_KINDS)[number];

/** One finding, as GET /v1/orphans lists it (and `orphan.found` records it). */
export interface OrphanFinding {
  readonly kind: OrphanKind;
  readonly profile: string;
  /** What the sweep does with it: `report` only, or `reap` it as a synthetic session. identity_mismatch: always report. */
  readonly action: "report" | "reap";
  /**
   * process and path: the synthetic session's id (reap mode: the session it became; report
   * mode: the one reap mode would give it). identity_mismatch: the live session concerned.
   */
  readonly sessionId: string;
  /** False when reap mode could not make it a session (see `detail`); true once it is one. */
  readonly adopted: boolean;
  readonly firstSeenAt: number;
  /** At the last sweep: since the process started, or since the path was last modified. */
  readonly ageSec: number;
  /** The process's real uid, or the path's owner. */
  readonly uid: number;
  readonly pid: number | null;
  readonly startTime: number | null;
  readonly exe: string | null;
  readonly cmdline: string | null;
  readonly path: string | null;
  /** process: the pids reap mode terminates (the process and its tree), oldest first. */
  readonly processes: readonly number[];
  /** process: the ports the tree holds, which reap mode verifies free. */
  readonly ports: readonly number[];
  /** identity_mismatch: what differs; reap mode: why it could not become a session. */
  readonly detail: string | null;
}

export interface OrphanSweepDeps extends AdoptDeps {
  config: Config;
  detector: Detector;
  registry: LiveSessions;
  metrics: Metrics;
  log: Logger;
}

interface Matcher {
  readonly profile: Profile;
  readonly policy: OrphanPolicy;
  readonly cmdline: RegExp | null;
  readonly globs: readonly PathGlob[];
}

/** What one pass found, before the dedup rule decides what is new. */
interface Candidate {
  readonly key: string;
  readonly matcher: Matcher | null;
  readonly finding: Omit<OrphanFinding, "firstSeenAt" | "adopted" | "action" | "ports">;
  readonly identity?: ProcessIdentity;
  readonly tree?: readonly ProcessIdentity[];
}

export class OrphanSweep {
  private readonly matchers: Matcher[];
  private readonly byProfile: Map<string, Matcher>;
  /** The last pass's findings by key: a key seen before is not reported again. */
  private findings = new Map<string, OrphanFinding>();
  private sweptAt: number | null = null;
  /** A live or reaping session of this pass whose damaged row may hide a claim, per kind. */
  private doubts: { process: Session | undefined; path: Session | undefined } = {
    process: undefined,
    path: undefined,
  };
  private cron: Cron | null = null;

  constructor(private readonly deps: OrphanSweepDeps) {
    this.matchers = Object.values(deps.config.profiles).flatMap((profile) =>
      profile.orphans === null
        ? []
        : [
            {
              profile,
              policy: profile.orphans,
              cmdline: profile.orphans.cmdline === null ? null : new RegExp(profile.orphans.cmdline),
              globs: profile.orphans.paths.map(compileGlob),
            },
          ],
    );
    this.byProfile = new Map(this.matchers.map((m) => [m.profile.name, m]));
  }

  /** False when no profile declares a matcher: then nothing is scheduled and nothing read. */
  get enabled(): boolean {
    return this.matchers.length > 0;
  }

  /** One pass now (start-up, after recovery), then on `orphans.schedule`. */
  start(): void {
    if (!this.enabled) return;
    this.runLogged();
    // protect: a pass still running when the next is due makes that one skip.
    this.cron = new Cron(this.deps.config.orphans.schedule, { protect: true }, () => this.runPaced());
  }

  stop(): void {
    this.cron?.stop();
    this.cron = null;
  }

  /** The last pass's findings (GET /v1/orphans). */
  current(): { enabled: boolean; sweptAt: number | null; findings: OrphanFinding[] } {
    return { enabled: this.enabled, sweptAt: this.sweptAt, findings: [...this.findings.values()] };
  }

  private runLogged(stats?: ProcStat[]): void {
    try {
      this.sweep(stats);
    } catch (err) {
      this.deps.log.error({ err }, "orphan sweep failed");
    }
  }

  /**
   * A scheduled pass: its snapshot of /proc is read a chunk per turn of the loop (heartbeats
   * are answered between), then judged in one synchronous run on it.
   */
  private async runPaced(): Promise<void> {
    if (!this.enabled || !this.deps.store.available) return;
    let stats: ProcStat[];
    try {
      stats = await listStatsPaced(loopTurn);
    } catch (err) {
      this.deps.log.error({ err }, "orphan sweep failed");
      return;
    }
    this.runLogged(stats);
  }

  /**
   * One pass. Synchronous on its snapshot of /proc (`stats`: read now when not given; the
   * scheduled passes read it paced, runPaced): the globbed directories are read and a
   * reap-mode finding is inserted and fenced before anything else can claim it.
   */
  sweep(snapshot?: ProcStat[]): OrphanFinding[] {
    // Adoption inserts and fences: nothing to do while the store cannot commit.
    if (!this.enabled || !this.deps.store.available) return [];
    const { clock, detector, metrics, log } = this.deps;
    const now = clock.now();
    const stats = (snapshot ?? listStats()).filter((s) => !isExited(s) && !isKernelThread(s));
    const table = new ProcessTable(stats);
    // The detector's own pass on this snapshot: engines gone are expired by it (engine_gone),
    // and the trees counted as claimed below are this snapshot's.
    detector.checkLiveness(table);
    const live = this.deps.store.sessionsInState("live");
    const reaping = this.deps.store.sessionsInState("reaping");
    // A reap that left unkillable processes owns them, and its paths, until it is resolved
    // (src/reaper/resolver.ts): nothing else takes them up meanwhile.
    const unresolved = this.deps.store.unresolvedReaps();
    const claimed = this.claimedProcesses(table, live, reaping, unresolved);
    const claimedPaths = new PathClaims([...live, ...reaping, ...unresolved].flatMap((s) => s.paths));
    // A session whose row is damaged may own what nothing else claims: its unreadable paths,
    // the processes of an engine it can no longer identify. Nothing is reaped on that doubt.
    this.doubts = {
      process: [...live, ...reaping].find((s) => !engineReadable(s)),
      path: [...live, ...reaping].find((s) => damageOf(s, "paths") !== undefined),
    };

    const candidates = [
      ...this.identityMismatches(table, live, now),
      ...this.processes(stats, table, claimed, now),
      ...this.paths(claimedPaths, now),
    ];
    const next = new Map<string, OrphanFinding>();
    for (const c of candidates) {
      const prev = this.findings.get(c.key);
      // The dedup rule: one report per process identity, path (device + inode) or mismatch,
      // for as long as it stays present; gone for one pass and back is a new finding.
      next.set(c.key, prev ? { ...prev, ageSec: c.finding.ageSec, processes: c.finding.processes } : this.act(c, now));
    }
    this.findings = next;
    this.sweptAt = now;
    metrics.setOrphans([...next.values()]);
    if (next.size > 0) log.debug({ findings: next.size }, "orphan sweep");
    return [...next.values()];
  }

  /** A new finding: reported, and in reap mode made a session. */
  private act(c: Candidate, now: number): OrphanFinding {
    const { audit, metrics } = this.deps;
    const m = c.matcher;
    const action = c.finding.kind === "identity_mismatch" || m === null ? "report" : m.policy.mode;
    const ports = c.tree ? [...portsHeldBy(c.tree.map((p) => p.pid)).keys()].sort((a, b) => a - b).slice(0, 64) : [];
    let finding: OrphanFinding = { ...c.finding, action, ports, firstSeenAt: now, adopted: false };
    const doubt = c.finding.kind === "process" || c.finding.kind === "path" ? this.doubts[c.finding.kind] : undefined;
    if (action === "reap" && doubt !== undefined) {
      finding = {
        ...finding,
        detail: `not reaped: session ${doubt.id}'s stored row is damaged (${describeDamage(doubt.damage)}), and it may own this`,
      };
    } else if (action === "reap" && m !== null) {
      const adoption =
        c.finding.kind === "process" && c.identity && c.tree
          ? adoptProcess(this.deps, m.profile, { identity: c.identity, tree: c.tree, ports }, eventDetail(finding))
          : adoptPath(
              this.deps,
              m.profile,
              { path: c.finding.path as string, id: c.finding.sessionId, uid: c.finding.uid },
              eventDetail(finding),
            );
      if (adoption.ok) finding = { ...finding, adopted: true };
      else finding = { ...finding, detail: `not reaped: ${adoption.refused}` };
    }
    // Adopted: orphan.found was recorded with the session, in the transaction that fenced it.
    if (!finding.adopted) audit.record({ event: "orphan.found", detail: eventDetail(finding) });
    metrics.orphanFound(finding.profile, finding.kind);
    return finding;
  }

  /**
   * Claimed: every live or reaping session's engine and owner, the live ones' trees (the
   * detector's, refreshed on this snapshot), and for reaping sessions what their journal
   * lists plus whatever their engine forked since; the unkillable processes of reaps not yet
   * resolved (by identity: pid and start time).
   */
  private claimedProcesses(
    table: ProcessTable,
    live: readonly Session[],
    reaping: readonly Session[],
    unresolved: readonly Session[],
  ): Set<string> {
    const claimed = new Set<string>();
    const add = (p: { pid: number; startTime: number }): void => void claimed.add(processKey(p));
    for (const s of [...live, ...reaping]) {
      add(s.engine);
      if (s.ownerPid !== null) add(s.ownerPid);
    }
    for (const s of live) for (const p of this.deps.registry.get(s.id)?.tree ?? table.tree(s.engine)) add(p);
    for (const s of reaping) {
      const journal = new Map<StepName, StepResult>(this.deps.store.steps(s.id).map((r) => [r.name, r]));
      const known = knownProcesses(journal);
      (journaled(journal, "terminate")?.processes ?? []).forEach(add);
      known.forEach(add);
      table.tree(s.engine, known).forEach(add);
    }
    for (const s of unresolved) {
      for (const l of s.leftovers) {
        if (l.kind === "unkillable" && l.pid !== undefined && l.startTime !== undefined)
          add({ pid: l.pid, startTime: l.startTime });
      }
    }
    return claimed;
  }

  /**
   * The daemon itself and its ancestors are never candidates (a loose cmdline regex such as
   * "node" must not find the daemon, nor the service manager that runs it).
   */
  private excludedPids(stats: readonly ProcStat[]): Set<number> {
    const byPid = new Map(stats.map((s) => [s.pid, s]));
    const out = new Set<number>();
    for (let pid = this.deps.daemonPid; pid > 1 && !out.has(pid); pid = byPid.get(pid)?.ppid ?? 0) out.add(pid);
    return out;
  }

  private processes(stats: ProcStat[], table: ProcessTable, claimed: Set<string>, now: number): Candidate[] {
    const matchers = this.matchers.filter((m) => m.policy.exe !== null || m.cmdline !== null);
    if (matchers.length === 0) return [];
    const excluded = this.excludedPids(stats);
    const boot = bootId();
    // Oldest first: an engine is met before its children, and the first too young ends the walk.
    const byAge = [...stats].sort((a, b) => a.startTime - b.startTime);
    // The processes of a finding's tree go with it (reaping it terminates them all): a forked
    // worker that matches too is not a second finding; the first profile to match wins.
    const covered = new Set<string>();
    const out: Candidate[] = [];
    for (const m of matchers) {
      const minAgeMs = m.policy.minAgeSec * 1000;
      for (const st of byAge) {
        const ageMs = now - startedAtMs(st.startTime);
        if (ageMs < minAgeMs) break;
        const key = processKey(st);
        if (st.pid <= 1 || excluded.has(st.pid) || claimed.has(key) || covered.has(key)) continue;
        const uid = readUid(st.pid);
        if (uid === null || !m.policy.uids.includes(uid)) continue;
        if (m.policy.exe !== null && readExe(st.pid) !== m.policy.exe) continue;
        const cmdline = readCmdline(st.pid);
        if (cmdline === null || (m.cmdline !== null && !m.cmdline.test(cmdline))) continue;
        const exe = readExe(st.pid);
        const identity: ProcessIdentity = { pid: st.pid, startTime: st.startTime, bootId: boot, uid };
        const tree = table
          .tree(identity)
          .filter((p) => !claimed.has(processKey(p)) && !excluded.has(p.pid))
          .sort((a, b) => a.startTime - b.startTime || a.pid - b.pid);
        for (const p of tree) covered.add(processKey(p));
        out.push({
          key: `process:${key}`,
          matcher: m,
          identity,
          tree,
          finding: {
            kind: "process",
            profile: m.profile.name,
            sessionId: processSessionId(identity),
            ageSec: Math.max(0, Math.floor(ageMs / 1000)),
            uid,
            pid: st.pid,
            startTime: st.startTime,
            exe,
            cmdline,
            path: null,
            processes: tree.map((p) => p.pid),
            detail: null,
          },
        });
      }
    }
    return out;
  }

  private paths(claimed: PathClaims, now: number): Candidate[] {
    const out: Candidate[] = [];
    const seen = new Set<string>();
    for (const m of this.matchers) {
      for (const glob of m.globs) {
        for (const path of expandGlob(glob)) {
          if (seen.has(path)) continue;
          let st: Stats;
          try {
            st = lstatSync(path);
          } catch {
            continue; // gone meanwhile
          }
          const ageMs = now - st.mtimeMs;
          if (st.isSymbolicLink() || !m.policy.uids.includes(st.uid) || ageMs < m.policy.minAgeSec * 1000) continue;
          if (claimed.claims(path)) continue;
          try {
            // The path policy the delete path applies: a path it would refuse is no finding.
            checkPath(path, m.profile.allowedRoots, st.uid, "orphan");
          } catch (err) {
            this.deps.log.debug({ path, err: errorMessage(err) }, "orphan sweep: path left alone");
            continue;
          }
          seen.add(path);
          out.push({
            key: `path:${st.dev}:${st.ino}:${path}`,
            matcher: m,
            finding: {
              kind: "path",
              profile: m.profile.name,
              sessionId: pathSessionId(path, st),
              ageSec: Math.max(0, Math.floor(ageMs / 1000)),
              uid: st.uid,
              pid: null,
              startTime: null,
              exe: null,
              cmdline: null,
              path,
              processes: [],
              detail: null,
            },
          });
        }
      }
    }
    // A path below another finding goes with it: deleting the upper one removes it.
    const found = new PathClaims(out.map((c) => c.finding.path as string));
    return out.filter((c) => !found.claimsStrictlyAbove(c.finding.path as string));
  }

  /**
   * Live sessions whose engine still runs under its recorded pid and start time, but as
   * another uid than the one recorded (setuid after registration). A gone or reused pid is
   * not reported here: the detector's pass above has already expired it (engine_gone).
   * Reported only, never acted on: the detector owns the expiry of sessions.
   */
  private identityMismatches(table: ProcessTable, live: readonly Session[], now: number): Candidate[] {
    const out: Candidate[] = [];
    for (const s of live) {
      const m = this.byProfile.get(s.profile);
      if (m === undefined || table.find(s.engine) === undefined) continue;
      const uid = readUid(s.engine.pid);
      if (uid === null || uid === s.engine.uid) continue;
      out.push({
        key: `identity_mismatch:${s.id}:${uid}`,
        matcher: null,
        finding: {
          kind: "identity_mismatch",
          profile: s.profile,
          sessionId: s.id,
          ageSec: Math.max(0, Math.floor((now - startedAtMs(s.engine.startTime)) / 1000)),
          uid,
          pid: s.engine.pid,
          startTime: s.engine.startTime,
          exe: readExe(s.engine.pid),
          cmdline: readCmdline(s.engine.pid),
          path: null,
          processes: [],
          detail: `the engine was registered as uid ${s.engine.uid} and now runs as uid ${uid}`,
        },
      });
    }
    return out;
  }
}

/** The finding as an `orphan.found` event's detail: its JSON fields without the empty ones. */
function eventDetail(f: OrphanFinding): Record<string, unknown> {
  const { firstSeenAt: _firstSeenAt, adopted: _adopted, ...rest } = f;
  return Object.fromEntries(
    Object.entries(rest).filter(([, v]) => v !== null && !(Array.isArray(v) && v.length === 0)),
  );
}

/** Session paths, looked up as a path, its ancestors, or its descendants. */
class PathClaims {
  private readonly set: Set<string>;
  private readonly sorted: string[];

  constructor(paths: readonly string[]) {
    this.set = new Set(paths);
    this.sorted = [...this.set].sort();
  }

  /** The path is claimed, lies below a claimed path, or holds one (deleting it would delete a session's path). */
  claims(path: string): boolean {
    return this.set.has(path) || this.claimsStrictlyAbove(path) || this.holdsOne(path);
  }

  claimsStrictlyAbove(path: string): boolean {
    for (let p = dirname(path); p !== "/" && p !== "."; p = dirname(p)) if (this.set.has(p)) return true;
    return false;
  }

  private holdsOne(path: string): boolean {
    const prefix = path + "/";
    let lo = 0;
    let hi = this.sorted.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if ((this.sorted[mid] as string) < prefix) lo = mid + 1;
      else hi = mid;
    }
    return this.sorted[lo]?.startsWith(prefix) === true;
  }
}
