import { readFileSync, readdirSync, readlinkSync } from "node:fs";

export interface TcpSocket {
  readonly family: 4 | 6;
  readonly localPort: number;
  /** LISTEN, ESTABLISHED, TIME_WAIT, … */
  readonly state: string;
  readonly inode: number;
}

// include/net/tcp_states.h
const TCP_STATES: Record<string, string> = {
  "01": "ESTABLISHED",
  "02": "SYN_SENT",
  "03": "SYN_RECV",
  "04": "FIN_WAIT1",
  "05": "FIN_WAIT2",
  "06": "TIME_WAIT",
  "07": "CLOSE",
  "08": "CLOSE_WAIT",
  "09": "LAST_ACK",
  "0A": "LISTEN",
  "0B": "CLOSING",
};

function readTable(file: string, family: 4 | 6): TcpSocket[] {
  let text: string;
  try {
    text = readFileSync(file, "latin1");
  } catch {
    return [];
  }
  const out: TcpSocket[] = [];
  for (const line of text.split("\n").slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 10) continue;
    const local = f[1] ?? "";
    const port = parseInt(local.slice(local.lastIndexOf(":") + 1), 16);
    out.push({ family, localPort: port, state: TCP_STATES[f[3] ?? ""] ?? f[3] ?? "?", inode: Number(f[9]) });
  }
  return out;
}

/** The TCP sockets of the daemon's network namespace (IPv4 and IPv6). */
export function tcpSockets(): TcpSocket[] {
  return [...readTable("/proc/net/tcp", 4), ...readTable("/proc/net/tcp6", 6)];
}

/** Socket inodes held open by a process (empty if it is gone or unreadable). */
export function socketInodes(pid: number): Set<number> {
  const out = new Set<number>();
  let fds: string[];
  try {
    fds = readdirSync(`/proc/${pid}/fd`);
  } catch {
    return out;
  }
  for (const fd of fds) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (m) out.add(Number(m[1]));
    } catch {
      // the fd closed while we looked
    }
  }
  return out;
}

/** Pids holding any of these socket inodes, found by walking /proc/<pid>/fd. */
export function holdersOf(inodes: ReadonlySet<number>): number[] {
  if (inodes.size === 0) return [];
  const out: number[] = [];
  for (const name of readdirSync("/proc")) {
    const c = name.charCodeAt(0);
    if (c < 48 || c > 57) continue;
    const pid = Number(name);
    for (const inode of socketInodes(pid)) {
      if (inodes.has(inode)) {
        out.push(pid);
        break;
      }
    }
  }
  return out;
}
