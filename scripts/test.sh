#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run all checks and tests.
# Extra arguments go to pytest (e.g. scripts/test.sh -k accuracy).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v uv >/dev/null || python3 -m pip install --quiet "uv>=0.5"
export UV_PYTHON_DOWNLOADS=never  # use the machine's Python; never fetch one

bash scripts/setup-prometheus.sh >/dev/null      # Debian prometheus + alertmanager, unpacked
bash scripts/setup-chromium.sh >/dev/null        # Debian chromium for the live page test
bash scripts/setup-grafana-schema.sh >/dev/null  # npm @grafana/schema + typescript 5
bash scripts/setup-espeak.sh >/dev/null          # Debian espeak-ng for the audio ground truth

uv sync --frozen
uv run ruff check .
uv run ruff format --check .
uv run mypy
uv run lk-observe generate --check
uv run pytest "$@"
