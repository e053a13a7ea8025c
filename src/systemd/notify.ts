import type { Logger } from "pino";
import { ReaperError, errorMessage } from "../errors.js";
import { addon } from "../native/addon.js";

/**
 * sd_notify(3) without libsystemd (zigbee2mqtt's lib/util/sd-notify.ts): one unix datagram
 * per message to $NOTIFY_SOCKET, through the project's addon since Node has no AF_UNIX
 * datagram socket. A no-op when NOTIFY_SOCKET is unset; a failed send is logged, never fatal.
 */
export class SystemdNotifier {
  constructor(
    private readonly socket: string | undefined,
    private readonly log: Logger,
  ) {
    if (socket && addon === null) log.warn("NOTIFY_SOCKET is set but the native addon is not built: no sd_notify");
  }

  get enabled(): boolean {
    return Boolean(this.socket) && addon !== null;
  }

  /** Sends "KEY=value" lines in one datagram. */
  send(fields: Record<string, string>): void {
    if (!this.enabled || addon === null || !this.socket) return;
    const text = Object.entries(fields)
      .map(([k, v]) => `${k}=${v.replace(/\n/g, " ")}`)
      .join("\n");
    try {
      addon.sendDatagram(this.socket, Buffer.from(text + "\n"));
    } catch (err) {
      this.log.warn({ err: errorMessage(err) }, "sd_notify failed");
    }
  }
}

/**
 * The watchdog ping interval: half of WATCHDOG_USEC (as sd_watchdog_enabled(3) advises),
 * when the watchdog is meant for this process (WATCHDOG_PID unset or equal to our pid).
 */
export function watchdogIntervalMs(env: Readonly<Record<string, string | undefined>>, pid: number): number | null {
  const usec = Number(env.WATCHDOG_USEC);
  if (!Number.isFinite(usec) || usec <= 0) return null;
  if (env.WATCHDOG_PID && Number(env.WATCHDOG_PID) !== pid) return null;
  return Math.max(1, Math.floor(usec / 2000));
}

/**
 * Socket activation (sd_listen_fds(3)): the fd systemd passed, if the passed fds are meant
 * for this process. The daemon serves one socket, so more than one passed fd is an error.
 */
export function activationFd(env: Readonly<Record<string, string | undefined>>, pid: number): number | null {
  if (!env.LISTEN_FDS || Number(env.LISTEN_PID) !== pid) return null;
  const count = Number(env.LISTEN_FDS);
  if (count === 1) return 3; // SD_LISTEN_FDS_START
  throw new ReaperError("SR_CONFIG_INVALID", `LISTEN_FDS=${env.LISTEN_FDS}: expected exactly one socket (the API's)`);
}
