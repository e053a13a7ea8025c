/**
 * The passwd database, by uid: `getent passwd UID` (so NSS sources such as LDAP or sssd
 * answer, as they do for login), else /etc/passwd itself when getent is missing.
 */
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";

export interface PasswdEntry {
  name: string;
  uid: number;
  gid: number;
  home: string;
}

function parse(line: string): PasswdEntry | null {
  const f = line.trim().split(":");
  if (f.length < 7) return null;
  return { name: f[0] as string, uid: Number(f[2]), gid: Number(f[3]), home: f[5] as string };
}

/** The uid's entry from /etc/passwd alone (synchronous, no NSS), or null. */
export function passwdFileEntry(uid: number): PasswdEntry | null {
  try {
    for (const line of readFileSync("/etc/passwd", "utf8").split("\n")) {
      const e = parse(line);
      if (e !== null && e.uid === uid) return e;
    }
  } catch {
    // no passwd file
  }
  return null;
}

/** The uid's entry, through NSS (getent, 2 s at most) or /etc/passwd; null if it has none. */
export function passwdEntry(uid: number): Promise<PasswdEntry | null> {
  return new Promise((resolve) => {
    execFile("getent", ["passwd", String(uid)], { timeout: 2000 }, (err, stdout) => {
      if (err === null) return resolve(parse(stdout.split("\n")[0] ?? ""));
      // exit 2: no such entry; anything else (getent missing, a hung NSS source): the file.
      resolve((err as { code?: unknown }).code === 2 ? null : passwdFileEntry(uid));
    });
  });
}
