#!/usr/bin/env bash
# Fetch espeak-ng (the speech synthesizer the audio ground-truth test speaks with) from Debian,
# unpacked into .cache/espeak/ without installing it system-wide. Idempotent; prints the path of
# a wrapper that runs it with its own libraries and voice data.
#
#   scripts/setup-espeak.sh            # -> /path/to/repo/.cache/espeak/espeak-ng
#   LK_OBSERVE_ESPEAK_DIR=/elsewhere scripts/setup-espeak.sh
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LK_OBSERVE_ESPEAK_DIR:-$repo/.cache/espeak}"
root="$cache/root"
wrapper="$cache/espeak-ng"
# libpcaudio0 needs libasound2 and libpulse0, which Debian images already carry
packages=(espeak-ng libespeak-ng1 espeak-ng-data libpcaudio0 libsonic0)

log() { echo "setup-espeak: $*" >&2; }

as_root() {
  if [[ "$(id -u)" == 0 ]]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo -n "$@"
  else return 1
  fi
}

if [[ ! -x "$root/usr/bin/espeak-ng" ]]; then
  debs="$cache/debs"
  rm -rf "$debs"
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
fi

data="$(dirname "$(find "$root/usr/lib" -type d -name espeak-ng-data | head -n 1)")"
libs="$(dirname "$(find "$root/usr/lib" -name 'libespeak-ng.so.1' | head -n 1)")"
cat >"$wrapper.tmp" <<WRAPPER
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export ESPEAK_DATA_PATH="$data"
exec "$root/usr/bin/espeak-ng" "\$@"
WRAPPER
chmod +x "$wrapper.tmp"
mv "$wrapper.tmp" "$wrapper"
"$wrapper" --version >/dev/null || { log "unpacked espeak-ng does not run"; exit 1; }
echo "$wrapper"
