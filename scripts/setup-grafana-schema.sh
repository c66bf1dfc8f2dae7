#!/usr/bin/env bash
# Install the dashboard schema checker's pinned npm packages (@grafana/schema 11.6.0, TypeScript 5)
# from tools/grafana-schema/package-lock.json. Idempotent: skips `npm ci` when node_modules
# already matches the lock file. Prints the checker's directory.
#
#   scripts/setup-grafana-schema.sh && node tools/grafana-schema/check.mjs dashboards
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$repo/tools/grafana-schema"
stamp="$dir/node_modules/.lk-observe-lock.json"

command -v npm >/dev/null || { echo "setup-grafana-schema: npm not found (install Node.js 18+)" >&2; exit 1; }

if ! cmp -s "$dir/package-lock.json" "$stamp" 2>/dev/null; then
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
  cp "$dir/package-lock.json" "$stamp"
fi

echo "$dir"
