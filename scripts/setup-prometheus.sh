#!/usr/bin/env bash
# Fetch Prometheus 2.42 (+promtool) and Alertmanager 0.25 (+amtool) from Debian, unpacked into
# .cache/promstack/ without installing them system-wide. Idempotent; prints the bin directory.
#
#   scripts/setup-prometheus.sh            # -> /path/to/repo/.cache/promstack/root/usr/bin
#   LK_OBSERVE_PROMSTACK_DIR=/elsewhere scripts/setup-prometheus.sh
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LK_OBSERVE_PROMSTACK_DIR:-$repo/.cache/promstack}"
root="$cache/root"
bin="$root/usr/bin"
packages=(prometheus prometheus-alertmanager)
# Debian patches Alertmanager to read its built-in templates (default.tmpl, email.tmpl) from
# this fixed directory (no flag or config key moves it; `templates:` only adds files), and it
# refuses to start without them.
am_templates=/usr/share/prometheus/alertmanager

log() { echo "setup-prometheus: $*" >&2; }

have_binaries() {
  for b in prometheus promtool prometheus-alertmanager amtool; do
    [[ -x "$bin/$b" ]] || return 1
  done
}

as_root() {
  if [[ "$(id -u)" == 0 ]]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo -n "$@"
  else return 1
  fi
}

if ! have_binaries; then
  debs="$cache/debs"
  mkdir -p "$debs"
  # apt-get download writes into the current directory; a subshell keeps our cwd.
  if ! (cd "$debs" && apt-get download "${packages[@]}" >&2); then
    log "package lists missing or stale; running apt-get update"
    as_root apt-get update >&2 || { log "apt-get update needs root (or passwordless sudo)"; exit 1; }
    (cd "$debs" && apt-get download "${packages[@]}" >&2)
  fi
  rm -rf "$root.tmp"
  mkdir -p "$root.tmp"
  for deb in "$debs"/*.deb; do
    dpkg-deb -x "$deb" "$root.tmp"
  done
  # Swap in atomically so a half-unpacked tree never looks ready to the next run.
  rm -rf "$root"
  mv "$root.tmp" "$root"
  have_binaries || { log "unpacked packages but binaries are missing under $bin"; exit 1; }
fi

for src in "$root$am_templates"/*.tmpl; do
  dest="$am_templates/$(basename "$src")"
  [[ -f "$dest" ]] && continue
  log "installing Alertmanager template $dest (path hard-coded by Debian)"
  if ! as_root install -D -m 0644 "$src" "$dest"; then
    log "cannot write $dest: run once as root: install -D -m 0644 '$src' '$dest'"
    exit 1
  fi
done

echo "$bin"
