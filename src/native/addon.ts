import { createRequire } from "node:module";

/** The native addon built from reaper_native.c by node-gyp at install (see that file). */
export interface NativeAddon {
  pidfdOpen(pid: number): number;
  pidfdSendSignal(fd: number, signo: number): void;
  closeFd(fd: number): void;
  watchExit(fd: number, callback: (status: number) => void): object;
  unwatch(handle: object): void;
  openDirAt(dirfd: number, name: string): number;
  sendDatagram(path: string, data: Buffer): void;
  peerCred(fd: number): PeerCred;
  /** flock(2) LOCK_EX | LOCK_NB on an open fd: true if taken, false if held elsewhere. */
  flockExclusive(fd: number): boolean;
  /**
   * A vfork-style spawn (clone with CLONE_VM | CLONE_VFORK): `file` is absolute, `argv`
   * includes argv[0], `stdio` are the fds that become 0-2 (nothing else is inherited),
   * `cwdFd` is fchdir'd to (-1: ours); with uid >= 0 the child drops its supplementary groups
   * and takes gid, then uid. On a libuv pool thread; rejects with the errno of what failed
   * before execve.
   */
  spawnAt(
    file: string,
    argv: readonly string[],
    env: readonly string[],
    cwdFd: number,
    stdio: readonly [number, number, number],
    uid: number,
    gid: number,
  ): Promise<{ pid: number; pidfd: number }>;
  /** waitpid(pid, WNOHANG) for a child spawnAt started: null while it runs. */
  waitExited(pid: number): { code: number; signal: number } | null;
  memfdCreate(name: string): number;
  /**
   * The connections waiting in a listening socket's backlog, up to `max`: accept4 until
   * EAGAIN, non-blocking and close-on-exec fds (libuv takes one per turn of the loop).
   */
  acceptPending(listenFd: number, max: number): number[];
  /**
   * Subscribes to the kernel's process events connector (netlink CN_IDX_PROC) on a thread of
   * the addon's own; `onBatch` runs on the event loop when records are waiting (coalesced).
   * Throws EPERM without CAP_NET_ADMIN, EPROTONOSUPPORT outside the initial network namespace,
   * ETIMEDOUT when the kernel never acknowledges (another pid or user namespace), EBUSY if open.
   */
  procEventsOpen(onBatch: () => void): void;
  /** The records read since the last drain (see src/proc/lineage.ts); `flush` also reads what the kernel queued up to now. */
  procEventsDrain(flush: boolean): ProcEventsBatch;
  procEventsClose(): void;
}

/** What procEventsDrain returns: records of 5 numbers each, and counters since the open. */
export interface ProcEventsBatch {
  readonly records: Float64Array;
  /** The kernel's socket buffer overran (ENOBUFS): events lost. */
  readonly overruns: number;
  /** The addon's buffer was full: records dropped. */
  readonly dropped: number;
  /** Records produced since the open. */
  readonly events: number;
}

/** The peer of a connected unix socket, as the kernel recorded it at connect(2). */
export interface PeerCred {
  pid: number;
  uid: number;
  gid: number;
  /** Supplementary groups (SO_PEERGROUPS); empty on kernels before 4.13. */
  groups: number[];
}

/** openDirAt's dirfd for "relative to the working directory" (absolute names). */
export const AT_FDCWD = -100;

function load(): NativeAddon | null {
  try {
    // From dist/src/native/ to the package root's build/.
    return createRequire(import.meta.url)("../../../build/Release/reaper_native.node") as NativeAddon;
  } catch {
    return null;
  }
}

/** Null when the addon was not built: callers fall back to what Node offers, and say so. */
export const addon: NativeAddon | null = load();
