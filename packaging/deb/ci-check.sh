#!/usr/bin/env bash
# CI's check of the Debian package (after npm test): build it, lintian (no error), install it
# with dpkg -i, run the installed reaperd on a temporary configuration and ask it with the
# installed reaperctl, then dpkg --purge it and check that no file of it is left.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="$(mktemp -d)"
run="$(mktemp -d)"
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  rm -rf "$out" "$run"
}
trap cleanup EXIT

deb="$(bash packaging/deb/build.sh "$out")"
echo "built $deb ($(stat -c %s "$deb") bytes)"

# lintian: warnings are listed, an error fails the check.
lintian --tag-display-limit 0 "$deb" | tee "$out/lintian.txt" || true
if grep -q '^E:' "$out/lintian.txt"; then
  echo "lintian reported errors" >&2
  exit 1
fi

dpkg -i "$deb"
files="$(dpkg -L session-reaper)"
test -x /usr/bin/reaperd && test -x /usr/bin/reaperctl
test -f /lib/systemd/system/session-reaper.service && test -f /etc/session-reaper/config.toml
getent passwd session-reaper >/dev/null
test -d /var/lib/session-reaper
# Nothing was started where systemd does not run; the socket unit is enabled.
test -L /etc/systemd/system/sockets.target.wants/session-reaper.socket
[ -d /run/systemd/system ] || ! pgrep -f /usr/lib/session-reaper/dist/src/main.js >/dev/null

# The installed daemon on a temporary configuration, asked by the installed CLI.
cat >"$run/config.toml" <<TOML
[api]
socket = "$run/reaper.sock"
[store]
path = "$run/reaper.db"
TOML
reaperd --config "$run/config.toml" >"$run/reaperd.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  [ -S "$run/reaper.sock" ] && break
  sleep 0.1
done
reaperctl --socket "$run/reaper.sock" status
reaperctl --socket "$run/reaper.sock" --json status | grep -q '"state": "running"'
kill -TERM "$pid"
wait "$pid"
pid=""
grep -q '"event":"daemon.stopped"' "$run/reaperd.log"

dpkg --purge session-reaper
left=""
while IFS= read -r f; do
  [ -z "$f" ] || [ -d "$f" ] && continue
  [ -e "$f" ] && left="$left $f"
done <<<"$files"
for d in /usr/lib/session-reaper /etc/session-reaper /var/lib/session-reaper /var/log/session-reaper /run/session-reaper \
  /etc/systemd/system/sockets.target.wants/session-reaper.socket; do
  [ -e "$d" ] && left="$left $d"
done
if [ -n "$left" ]; then
  echo "left after purge:$left" >&2
  exit 1
fi
echo "package: built, lintian clean of errors, installed, run, purged with nothing left"
