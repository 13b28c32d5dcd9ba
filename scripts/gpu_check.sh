#!/usr/bin/env bash
# GPU check: merge, eval and a short evolve on CUDA, each step timed, with the peak GPU
# memory it used; made to run in one go on a machine lent for a few minutes (no network,
# evomerge not installed, a time limit per command). It prints a plain summary and, when
# $OUT is set, writes it as a markdown table to $OUT/gpu_check.md (and the step logs to
# $OUT/gpu_check.log) for docs/benchmarks.md.
#
#   bash scripts/gpu_check.sh --prepare      # here, with the network: fill .cache/gpucheck
#   bash scripts/gpu_check.sh                # there: DEVICE=cuda, about 3-6 minutes
#   DEVICE=cpu bash scripts/gpu_check.sh     # anywhere: the same steps on the CPU, tiny budget
#
# --prepare copies the built zoos (micro, small; ~16 MB) and downloads wheels of the
# dependencies a bare PyTorch image lacks (pydantic and its parts, cma; ~3 MB) into
# .cache/gpucheck/ (git-ignored: name it in the device tool's `carry`). Without it the
# script builds the micro zoo (about a minute, one CPU thread) and stops at once, naming
# the modules, if evomerge's dependencies do not import.
#
# Steps: environment (torch import + CUDA start-up), zoo (reuse or build), static merge of
# a zoo recipe, eval of a zoo model, eval of the recipe (merged in memory), then a short
# PS evolve with --executor serial, pool --workers 1 and pool --workers 2, and ray with 1
# and 2 workers where `import ray` works and evomerge has the executor. Last, with the time
# left (BIG_MERGE=1, the default on CUDA), a TIES merge of three random ~1.1B-parameter
# Llamas (scripts/bench_merge.py's models, built first on the CPU: 6.6 GB of disk), the
# one step whose time says something about the GPU rather than about start-up costs. A
# failed step is reported and the next one runs; a step starts only while DEADLINE_S
# (seconds since the start) leaves it 30 s, and gets at most the time left.
#
# Settings (environment): DEVICE (cuda), ZOO_SIZE (auto: small if found, else micro),
# ZOO_DIR (a built zoo folder to use instead), MAX_EVALS (cuda 40, cpu 10), LIMIT (fitness
# examples; cuda 200, cpu 50), EVAL_LIMIT (cuda 300, cpu 50), THREADS (torch CPU threads in
# all; cuda 2, cpu 1), BATCH_SIZE and DTYPE (the evolve config's batch_size and dtype;
# unset: the config's defaults), DEADLINE_S (cuda 330, cpu 900), BIG_MERGE (cuda 1, cpu 0),
# WORK (scratch folder; a fresh one by default, removed at the end unless KEEP_WORK=1),
# PY_VERSION (--prepare: the device's Python, 3.12).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PREPARED=$ROOT/.cache/gpucheck
ZOO_HOME=${EVOMERGE_ZOO:-$HOME/.cache/evomerge/zoo}
WHEELS="pydantic pydantic-core annotated-types typing-inspection cma"
MODULES="torch transformers safetensors huggingface_hub accelerate cma pydantic yaml tqdm tokenizers psutil sklearn matplotlib"

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

# ------------------------------------------------------------------------- --prepare
prepare() {
    local size version
    mkdir -p "$PREPARED/zoo" "$PREPARED/whl"
    for size in micro small; do
        if [ -f "$ZOO_HOME/$size/zoo.json" ]; then
            rm -rf "${PREPARED:?}/zoo/$size" && cp -r "$ZOO_HOME/$size" "$PREPARED/zoo/$size"
            echo "zoo $size: copied from $ZOO_HOME/$size"
        elif [ "$size" = micro ]; then
            echo "zoo micro: building it (about a minute)"
            python3 -m evomerge zoo build --size micro --out "$PREPARED/zoo/micro" || return 1
        else
            echo "zoo $size: not built here ($ZOO_HOME/$size); the check will use micro"
        fi
    done
    git -C "$ROOT" rev-parse --short HEAD > "$PREPARED/commit" 2>/dev/null || rm -f "$PREPARED/commit"
    rm -f "$PREPARED"/whl/*.whl
    for pkg in $WHEELS; do
        version=$(python3 -m pip show "$pkg" 2>/dev/null | awk '/^Version:/ {print $2}')
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d "$PREPARED/whl" "$pkg${version:+==$version}" || return 1
    done
    ls "$PREPARED/whl"
    echo "prepared $(du -sh "$PREPARED" | cut -f1) in .cache/gpucheck: run with carry [\".cache/gpucheck\"]"
}

# ------------------------------------------------------------------------ arguments
while [ $# -gt 0 ]; do
    case $1 in
        --prepare) prepare; exit $? ;;
        --device) DEVICE=$2; shift ;;
        --device=*) DEVICE=${1#*=} ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
    MAX_EVALS=${MAX_EVALS:-10} LIMIT=${LIMIT:-50} EVAL_LIMIT=${EVAL_LIMIT:-50} DEADLINE_S=${DEADLINE_S:-900}
    BIG_MERGE=${BIG_MERGE:-0}
else
    MAX_EVALS=${MAX_EVALS:-40} LIMIT=${LIMIT:-200} EVAL_LIMIT=${EVAL_LIMIT:-300} DEADLINE_S=${DEADLINE_S:-330}
    BIG_MERGE=${BIG_MERGE:-1}
fi
# torch CPU threads in all (a pool splits them): on a busy CPU, more threads than free
# cores make these tiny models many times slower (measured: 8x with 2 on 2 busy cores)
THREADS=${THREADS:-$([ "$DEVICE" = cpu ] && echo 1 || echo 2)}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
if [ -z "${WORK:-}" ]; then
    WORK=$(mktemp -d /tmp/gpucheck.XXXXXX)
    [ "${KEEP_WORK:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"
START=$(date +%s.%N)
elapsed() { python3 -c "import sys; print(int(float(sys.argv[2]) - float(sys.argv[1])))" "$START" "$(date +%s.%N)"; }

# ------------------------------------------------------------------------ preflight
# Fail early and clearly: no torch, no CUDA, or evomerge's dependencies missing.
missing_modules() {
    python3 - $MODULES <<'PY'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PY
}
if ! python3 -c 'import torch' 2>/dev/null; then
    echo "gpu_check: python3 ($(command -v python3)) has no torch; this check needs PyTorch" >&2; exit 3
fi
if [ "$DEVICE" != cpu ]; then
    if ! python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo "gpu_check: torch $(python3 -c 'import torch; print(torch.__version__)') sees no CUDA device" \
             "(DEVICE=$DEVICE); run with DEVICE=cpu to check the CPU path" >&2; exit 3
    fi
    command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found: no peak GPU memory" >&2; }
fi
missing=$(missing_modules)
if [ -n "$missing" ] && ls "$PREPARED"/whl/*.whl >/dev/null 2>&1; then
    echo "installing the carried wheels (.cache/gpucheck/whl) for: $missing"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpucheck-site "$PREPARED"/whl/*.whl || exit 3
    export PYTHONPATH=$PYTHONPATH:/tmp/gpucheck-site
    missing=$(missing_modules)
fi
if [ -n "$missing" ]; then
    echo "gpu_check: python3 cannot import: $missing. Run 'bash scripts/gpu_check.sh --prepare'" \
         "where pip works and carry .cache/gpucheck, or install them" >&2; exit 3
fi
if ! error=$(python3 -c 'import evomerge.cli, merging.engine, evaluation.harness, niches.run' 2>&1); then
    echo "gpu_check: evomerge does not import from $ROOT:" >&2; echo "$error" | tail -5 >&2; exit 3
fi
# Ray runs only where ray imports and this evomerge has the executor, through
# scripts/loopback.sh (Ray's traffic stays on this machine where a namespace can be made).
HAVE_RAY=0 RAY_WHY="python3 cannot import ray" IN_LOOPBACK=()
if python3 -c 'import ray' >/dev/null 2>&1; then
    if RAY_WHY=$(python3 -c "from evaluation.executors import check_executor; check_executor('ray', 2)" 2>&1); then
        HAVE_RAY=1
        IN_LOOPBACK=(bash "$ROOT/scripts/loopback.sh")
    else
        RAY_WHY=$(echo "$RAY_WHY" | tail -1 | sed 's/^[A-Za-z_.]*Error: //')
    fi
fi

# ------------------------------------------------------------------ the environment
gpu_name=none gpu_total=- gpu_idle=- driver=-
if [ "$DEVICE" != cpu ] && command -v nvidia-smi >/dev/null; then
    IFS=, read -r gpu_name driver gpu_total gpu_idle < <(nvidia-smi -i 0 --query-gpu=name,driver_version,memory.total,memory.used \
        --format=csv,noheader,nounits | sed 's/, /,/g')
fi
versions=$(python3 -c 'import platform, torch, transformers
print(f"Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")')
commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null ||
         { [ -f "$PREPARED/commit" ] && echo "$(cat "$PREPARED/commit") (at --prepare)"; } || echo "unknown (no git)")
ENVIRONMENT="$(date -u +%Y-%m-%d), device $DEVICE; GPU: $gpu_name (driver $driver, $gpu_total MiB, $gpu_idle MiB used before the check); $(nproc) CPU cores; $versions; ray $(python3 -c 'import ray; print(ray.__version__)' 2>/dev/null || echo 'not installed'); evomerge commit $commit"

# ------------------------------------------------------------------------- stepping
ROWS=()
SUMMARY=()

peak_of() { [ -s "$1" ] && sort -n "$1" | tail -1 || echo -; }

# Evolve figures from a run folder: candidates logged, evaluations per minute of the
# executor's scoring time, each worker's utilisation, the workers' start-up.
evolve_stats() {
    python3 - "$1" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
candidates = sum(1 for _ in (run / "candidates.jsonl").open()) if (run / "candidates.jsonl").exists() else 0
try:
    usage = list(json.loads((run / "results.json").read_text()).get("executor", {}).values())
except (OSError, ValueError):
    usage = []
scored = sum(u.get("scored", 0) for u in usage)
wall = sum(u.get("wall_seconds", 0) for u in usage)
rate = f"{60 * scored / wall:.1f}" if wall else "-"
utilisation = "; ".join(", ".join(f"{x:.0%}" for x in u.get("utilisation", [])) for u in usage) or "-"
startup = f"{sum(u.get('startup_seconds') or 0 for u in usage):.1f}" if usage else "-"
print(f"{candidates}|{rate}|{utilisation}|{startup}")
PY
}

write_report() {
    local table
    table=$(printf '%s\n' "| step | command | wall s | peak GPU MiB | candidates | evaluations / min (scoring) | utilisation per worker | worker start-up s | status |" \
        "|---|---|---|---|---|---|---|---|---|" "${ROWS[@]}")
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT"
        { echo "## GPU check: $gpu_name (device $DEVICE)"; echo; echo "$ENVIRONMENT."; echo; echo "$SETTINGS"; echo; echo "$table"; echo
          if [ "$DEVICE" = cpu ]; then echo "No GPU (DEVICE=cpu): a run of the same steps on the CPU."
          else echo "Peak GPU MiB: the most memory.used that nvidia-smi read (about every 0.3 s) during the step, whole GPU, other processes and the $gpu_idle MiB in use before the check included."; fi
          echo; echo "Produced by \`$COMMAND\`."; } > "$OUT/gpu_check.md"
    fi
}

# run_step NAME DISPLAY TIMEOUT [--evolve RUN_DIR] -- CMD...: time CMD under `timeout`, poll
# the GPU's memory meanwhile, add a row; `--evolve` adds the run folder's figures.
run_step() {
    local name=$1 display=$2 limit=$3 run_dir="" left rc t0 t1 wall peak status stats monitor=""
    shift 3
    if [ "$1" = --evolve ]; then run_dir=$2; shift 2; fi
    shift  # --
    left=$((DEADLINE_S - $(elapsed)))
    if [ "$left" -lt 30 ]; then
        ROWS+=("| $name | \`$display\` | - | - | - | - | - | - | skipped: under 30 s left before DEADLINE_S=$DEADLINE_S |")
        SUMMARY+=("$(printf '%-22s skipped (deadline)' "$name")"); write_report; return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== $name: $display (at most ${limit} s)"
    if [ "$DEVICE" != cpu ] && command -v nvidia-smi >/dev/null; then
        # one nvidia-smi call per sample: each exits, so no sample waits in a buffer when the
        # monitor is stopped (a looping nvidia-smi writing to a file may hold them back)
        while :; do
            nvidia-smi -i 0 --query-gpu=memory.used --format=csv,noheader,nounits >> "$WORK/$name.mem" 2>/dev/null
            sleep 0.2
        done &
        monitor=$!
    fi
    t0=$(date +%s.%N)
    timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    [ -n "$monitor" ] && { kill "$monitor" 2>/dev/null; wait "$monitor" 2>/dev/null; }
    wall=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$t1")
    peak=$(peak_of "$WORK/$name.mem")
    case $rc in
        0) status=ok ;;
        124|137) status="timed out after $limit s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    if [ "$rc" != 0 ]; then
        echo "   $status; the end of its output:"; tail -n 15 "$WORK/$name.log" | sed 's/^/   | /'
    fi
    stats="-|-|-|-"
    [ -n "$run_dir" ] && [ -d "$run_dir" ] && stats=$(evolve_stats "$run_dir")
    IFS='|' read -r candidates rate utilisation startup <<< "$stats"
    ROWS+=("| $name | \`$display\` | $wall | $peak | $candidates | $rate | $utilisation | $startup | $status |")
    SUMMARY+=("$(printf '%-22s %8s s  peak GPU %6s MiB  candidates %4s  evals/min %7s  utilisation %-10s  start-up %5s s  %s' \
        "$name" "$wall" "$peak" "$candidates" "$rate" "$utilisation" "$startup" "$status")")
    echo "   ${SUMMARY[-1]}"
    write_report
}

# ------------------------------------------------------------------------------ zoo
find_zoo() {
    local d
    for d in "$PREPARED/zoo/$1" "$ZOO_HOME/$1"; do
        [ -f "$d/zoo.json" ] && { echo "$d"; return; }
    done
}
ZOO_SIZE=${ZOO_SIZE:-auto}
if [ -n "${ZOO_DIR:-}" ]; then
    ZOO=$(cd "$ZOO_DIR" 2>/dev/null && pwd) || { echo "gpu_check: ZOO_DIR=$ZOO_DIR is no folder" >&2; exit 3; }
    ZOO_SIZE=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["size"])' "$ZOO/zoo.json") ||
        { echo "gpu_check: ZOO_DIR=$ZOO_DIR has no readable zoo.json (evomerge zoo build writes one)" >&2; exit 3; }
else
    if [ "$ZOO_SIZE" = auto ]; then
        ZOO_SIZE=micro
        [ -n "$(find_zoo small)" ] && ZOO_SIZE=small
    fi
    ZOO=$(find_zoo "$ZOO_SIZE")
fi
COMMAND="$( [ "$DEVICE" = cpu ] && echo "DEVICE=cpu " )bash scripts/gpu_check.sh"
SETTINGS="Zoo $ZOO_SIZE; evolve: PS (DARE-TIES of zoo:lang and zoo:math, recipes/$( [ "$ZOO_SIZE" = small ] && echo zoo-small-ps-template.yaml || echo demo-evolve-template.yaml )), $MAX_EVALS evaluations, popsize 10, fitness math_lang train limit $LIMIT, $THREADS torch CPU threads in all${BATCH_SIZE:+, batch size $BATCH_SIZE}${DTYPE:+, dtype $DTYPE}; eval limit $EVAL_LIMIT."

echo "gpu_check: $ENVIRONMENT"
echo "gpu_check: $SETTINGS"
echo "gpu_check: scratch folder $WORK"
run_step environment "python3 -c 'import torch; torch.zeros(1, device=\"$DEVICE\")'" 120 -- \
    python3 -c "import torch; torch.zeros(1, device='$DEVICE'); print('ok')"
if [ -z "$ZOO" ]; then
    if [ "$ZOO_SIZE" != micro ]; then
        echo "gpu_check: no $ZOO_SIZE zoo in $PREPARED/zoo or $ZOO_HOME (building it takes 7+ minutes); use ZOO_SIZE=micro or --prepare" >&2
        exit 3
    fi
    ZOO=$WORK/zoo/micro
    run_step zoo-build "evomerge zoo build --size micro" 240 -- \
        python3 -m evomerge zoo build --size micro --out "$ZOO"
    [ -f "$ZOO/zoo.json" ] || { echo "gpu_check: the micro zoo did not build; see above" >&2; exit 1; }
else
    echo "== zoo: reusing $ZOO"
fi

# ---------------------------------------------------------------- merge and eval
cat > "$WORK/static.yaml" <<'YAML'
merge_method: dare_ties
base_model: zoo:base
models:
  - model: zoo:lang
    parameters: {density: 0.6, weight: 0.6}
  - model: zoo:math
    parameters: {density: 0.6, weight: 0.6}
dtype: bfloat16
YAML
run_step merge "evomerge merge static.yaml OUT --zoo $ZOO_SIZE --device $DEVICE" 120 -- \
    python3 -m evomerge merge "$WORK/static.yaml" "$WORK/merged" --zoo "$ZOO" --device "$DEVICE" --no-progress --overwrite
run_step eval-model "evomerge eval zoo:math --task math --task math_lang --limit $EVAL_LIMIT --device $DEVICE" 150 -- \
    python3 -m evomerge eval zoo:math --zoo "$ZOO" --task math --task math_lang --limit "$EVAL_LIMIT" --device "$DEVICE"
run_step eval-recipe "evomerge eval static.yaml --task math --task math_lang --limit $EVAL_LIMIT --device $DEVICE" 150 -- \
    python3 -m evomerge eval "$WORK/static.yaml" --zoo "$ZOO" --task math --task math_lang --limit "$EVAL_LIMIT" --device "$DEVICE"

# ---------------------------------------------------------------------- evolve
if [ "$ZOO_SIZE" = small ]; then cp recipes/zoo-small-ps-template.yaml "$WORK/template.yaml"
else cp recipes/demo-evolve-template.yaml "$WORK/template.yaml"; fi
cat > "$WORK/evolve.yaml" <<YAML
method: ps
zoo: $ZOO
models: [zoo:lang, zoo:math]
fitness: {tasks: [math_lang], split: train, limit: $LIMIT}
report: {tasks: [math_lang], split: test, limit: 20}
ps:
  template: template.yaml
  optimizer: {max_evals: $MAX_EVALS, popsize: 10, sigma0: 0.2}
seed: 0
device: $DEVICE
threads: $THREADS
${BATCH_SIZE:+batch_size: $BATCH_SIZE}
${DTYPE:+dtype: $DTYPE}
YAML
evolve_settings=("serial 0" "pool 1" "pool 2")
[ "$HAVE_RAY" = 1 ] && evolve_settings+=("ray 1" "ray 2")
for setting in "${evolve_settings[@]}"; do
    read -r executor workers <<< "$setting"
    name=evolve-$executor; flags=(--executor "$executor")
    if [ "$workers" != 0 ]; then name=$name-$workers; flags+=(--workers "$workers"); fi
    prefix=(); [ "$executor" = ray ] && prefix=("${IN_LOOPBACK[@]}")
    run_step "$name" "evomerge evolve CONFIG --run-dir DIR ${flags[*]}" 180 --evolve "$WORK/run-$name" -- \
        "${prefix[@]}" python3 -m evomerge evolve "$WORK/evolve.yaml" --run-dir "$WORK/run-$name" "${flags[@]}" --no-progress
done
if [ "$HAVE_RAY" = 0 ]; then
    echo "== evolve-ray: skipped ($RAY_WHY)"
    ROWS+=("| evolve-ray | \`evomerge evolve CONFIG --run-dir DIR --executor ray\` | - | - | - | - | - | - | skipped: $RAY_WHY |")
    SUMMARY+=("$(printf '%-22s skipped: %s' evolve-ray "$RAY_WHY")"); write_report
fi

# ------------------------------------------------------- optional: a ~1B merge
if [ "$BIG_MERGE" = 1 ]; then
    mkdir -p "$WORK/big"
    run_step big-models "bench_merge.build_models (3 x 1.1B bf16)" 300 -- python3 -c \
        "import sys; from pathlib import Path; sys.path.insert(0, 'scripts'); import bench_merge as b; b.build_models(Path(sys.argv[1]) / 'models', b.SCENARIOS['tinyllama-bf16'])" "$WORK/big"
    python3 -c "import sys; sys.path.insert(0, 'scripts'); import bench_merge as b; print(b.SCENARIOS['tinyllama-bf16'].recipe, end='')" > "$WORK/big/recipe.yaml"
    if [ -f "$WORK/big/models/done.json" ]; then
        run_step big-merge "evomerge merge (TIES, 3 x 1.1B bf16) --device $DEVICE" 300 -- \
            bash -c 'cd "$1" && python3 -m evomerge merge recipe.yaml merged --device "$2" --no-progress --overwrite' _ "$WORK/big" "$DEVICE"
    fi
fi

# -------------------------------------------------------------------- summary
echo
echo "GPU check summary ($(elapsed) s in all)"
echo "$ENVIRONMENT"
echo "$SETTINGS"
printf '%s\n' "${SUMMARY[@]}"
if [ -n "${OUT:-}" ]; then
    for log in "$WORK"/*.log; do echo "===== $(basename "$log")"; tail -n 200 "$log"; done > "$OUT/gpu_check.log"
    echo "wrote $OUT/gpu_check.md and $OUT/gpu_check.log"
fi
