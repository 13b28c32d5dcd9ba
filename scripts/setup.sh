#!/usr/bin/env bash
# Install evomerge (editable, with test tools) into the current Python.
# An installed torch is kept; torch==2.13.0 is installed only when none is present,
# because an unpinned torch would pull the newest CUDA build (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[dev]"
