#!/usr/bin/env bash
# Set up (with the test tools) and run the default test suite (what CI runs). Slow tests: add `-m slow`.
# The tests start real Ray clusters: they run on loopback only (scripts/loopback.sh), after
# the set-up, which needs the network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
PYTHON=${PYTHON:-python3}
exec bash scripts/loopback.sh "$PYTHON" -m pytest -m "not slow" -q "$@"
