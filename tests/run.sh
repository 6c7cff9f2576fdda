#!/usr/bin/env bash
# Set up a virtual environment (CPU torch pinned) and run the test suite. Usage: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CINE_VENV:-.venv}
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
# Pin torch first: an unpinned torch would pull several GB of CUDA wheels.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
# Ray is optional: its test is skipped (with the reason) where it cannot be installed.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[ray]" || echo "tests/run.sh: Ray not installable here; the Ray test will be skipped" >&2
exec "$VENV/bin/python" -m pytest "$@"
