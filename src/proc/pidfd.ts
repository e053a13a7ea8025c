import { addon, type NativeAddon } from "../native/addon.js";

function probe(native: NativeAddon | null): NativeAddon | null {
  if (native === null) return null;
  try {
    native.closeFd(native.pidfdOpen(process.pid));
    return native;
  } catch {
    return null; // ENOSYS: a kernel before 5.3, or a seccomp filter that forbids pidfd_open
  }
}

/**
 * pidfd support, or null when the addon is missing or the kernel lacks pidfd_open; every
 * caller then falls back to the /proc identity check (start time + boot id) before kill(2).
 */
export const pidfd: NativeAddon | null = probe(addon);

export function errnoOf(err: unknown): string | undefined {
  return (err as { code?: string }).code;
}

/** A held pidfd with an optional exit watch: released exactly once. */
export class ProcessHandle {
  private fd: number | null;
  private watch: object | null = null;

  private constructor(fd: number) {
    this.fd = fd;
  }

  /**
   * Opens a pidfd on `pid`; null if pidfd is unsupported, the process is gone, or fds ran
   * out. `onError` hears of every failure but "gone" (ESRCH): EMFILE and ENFILE above all,
   * which would otherwise leave exits noticed only by the liveness pass, silently.
   */
  static open(pid: number, onError?: (code: string) => void): ProcessHandle | null {
    if (pidfd === null) return null;
    try {
      return new ProcessHandle(pidfd.pidfdOpen(pid));
    } catch (err) {
      const code = errnoOf(err) ?? "EUNKNOWN";
      if (code !== "ESRCH") onError?.(code);
      return null;
    }
  }

  /** Sends a signal to exactly this process; false if it has exited. */
  signal(signo: number): boolean {
    if (this.fd === null || pidfd === null) return false;
    try {
      pidfd.pidfdSendSignal(this.fd, signo);
      return true;
    } catch (err) {
      if (errnoOf(err) === "ESRCH") return false;
      throw err;
    }
  }

  /** Calls `onExit` once when the process exits (event-driven, no polling). */
  onExit(onExit: () => void): void {
    if (this.fd === null || pidfd === null || this.watch !== null) return;
    this.watch = pidfd.watchExit(this.fd, () => onExit());
  }

  close(): void {
    if (pidfd === null) return;
    if (this.watch !== null) pidfd.unwatch(this.watch);
    this.watch = null;
    if (this.fd !== null) pidfd.closeFd(this.fd);
    this.fd = null;
  }
}
