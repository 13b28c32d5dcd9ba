#!/usr/bin/env bash
# Install evomerge (editable) into the current Python: `setup.sh` the core package (what
# the demo needs), `setup.sh dev` with the test tools (pytest, lm-eval, datasets: ~1.9 GB).
# An install that is current is skipped: a stamp records pyproject.toml's hash, the extras
# and the interpreter, and evomerge must import from this checkout.
# An installed torch is kept; torch==2.13.0 is installed only when none is present,
# because an unpinned torch would pull the newest CUDA build (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${1:-}
PYTHON=${PYTHON:-python3}
case "$EXTRAS" in ""|dev) ;; *) echo "usage: setup.sh [dev]" >&2; exit 2;; esac

stamp_of() {  # what an install with extras $1 records: pyproject's hash, extras, interpreter
    echo "$(sha256sum pyproject.toml | cut -c1-64) extras=$1 python=$("$PYTHON" -c 'import sys; print(sys.executable)')"
}
current() {  # is an install with extras $1 recorded and still true?
    local stamp=".cache/setup/installed-${1:-core}"
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(stamp_of "$1")" ] &&
        [ "$(cd / && "$PYTHON" -c 'import evomerge, pathlib; print(pathlib.Path(evomerge.__file__).parents[1])' 2>/dev/null)" = "$PWD" ]
}

if current "$EXTRAS" || { [ -z "$EXTRAS" ] && current dev; }; then
    echo "evomerge${EXTRAS:+[$EXTRAS]} is installed and current (pyproject.toml unchanged)"
    exit 0
fi
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
echo "installing evomerge${EXTRAS:+[$EXTRAS]} (editable) into $("$PYTHON" -c 'import sys; print(sys.executable)')"
"$PYTHON" -m pip install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
mkdir -p .cache/setup
stamp_of "$EXTRAS" > ".cache/setup/installed-${EXTRAS:-core}"
