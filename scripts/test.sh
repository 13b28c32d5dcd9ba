#!/usr/bin/env bash
# Set up (with the test tools) and run the default test suite (what CI runs). Slow tests: add `-m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
PYTHON=${PYTHON:-python3}
exec "$PYTHON" -m pytest -m "not slow" -q "$@"
