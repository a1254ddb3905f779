#!/usr/bin/env bash
# The GPU device check, one command, no network needed, all five parts within 10 minutes on one GPU (200 + 170 + 140 + 60 s
# by default; each part's budget can be raised, or a part run alone, with the variables below):
#   1. the GPU tests and the speed tests (tests/test_gpu.py, tests/test_speed.py with the slow inductor test on),
#   2. the GPU benchmark (benchmarks/gpu_benchmark.py) with the time that is left,
#   3. full-size text-to-image pipelines against their own __call__ (benchmarks/pipeline_overhead.py),
#   4. the system ladder on full-size SD-1.5 and SDXL UNets (benchmarks/ladder.py --device cuda),
#   5. token merging on a full-size SD-1.5 (benchmarks/token_merging.py; TOME_CHECK_LIMIT_S, default 60 s),
# then prints where the results are: benchmarks/results/gpu_<gpu-name>.json and .md,
# benchmarks/results/pipeline_overhead_gpu.json and .md, plus the logs.
#
#   bash benchmarks/device_check.sh [COPY_DIR]
#
# COPY_DIR (optional): also copy the results and logs there (e.g. a folder that a remote runner brings back).
# Python: the repo's .venv when it sees a CUDA GPU, else python3 (a GPU image with torch). Missing pure-Python
# packages (diffusers, importlib_metadata) are installed from wheels in .whl/ when that folder exists; see docs/gpu.md.
# pytest runs without the project's addopts (they name nbval, which a GPU image need not have).
# DEVICE_CHECK_LIMIT_S overrides the total budget of parts 1-2 (default 200 s). Part 3, the full-size text-to-image
# pipelines (benchmarks/pipeline_overhead.py, needs transformers), has its own, PIPELINE_CHECK_LIMIT_S (default 170 s);
# DEVICE_CHECK_PARTS=pipelines runs part 3 alone, DEVICE_CHECK_PARTS=ladder part 4 alone (LADDER_CHECK_LIMIT_S, default
# 140 s), DEVICE_CHECK_PARTS=tome part 5 alone, DEVICE_CHECK_PARTS=core parts 1-2 alone (default: all).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LIMIT=${DEVICE_CHECK_LIMIT_S:-200}
START=$(date +%s)
COPY_DIR=${1:-}
RESULTS="$ROOT/benchmarks/results"
LOGS="$RESULTS/logs"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 COMPANION_SLOW_TESTS=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

left() { echo $(( LIMIT - ($(date +%s) - START) )); }
say() { echo "[device-check $(( $(date +%s) - START ))s] $*"; }

PY=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PY=.venv/bin/python
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  say "no CUDA GPU visible to $PY (torch.cuda.is_available() is False): this check needs a GPU machine"; exit 2
fi
if ! "$PY" -c "import diffusers" 2>/dev/null && [ -d .whl ]; then
  say "installing carried wheels from .whl/ into /tmp/companion-site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/companion-site .whl/*.whl || exit 2
  export PYTHONPATH="$PYTHONPATH:/tmp/companion-site"
fi
missing=$("$PY" - <<'EOF'
import importlib
need = ["torch", "diffusers", "numpy", "scipy", "safetensors", "tqdm", "pytest"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
  say "missing Python packages: $missing. On a machine with a registry run (for Python 3.12 here):"
  say "  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl $missing"
  say "and bring the .whl/ folder along; see docs/gpu.md"; exit 2
fi
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0), '| diffusers', diffusers.__version__)"

# ---- text-to-image pipelines at full size (benchmarks/pipeline_overhead.py): the companion's sampling loop against
# each pipeline's own __call__ (same scheduler, same NFE: checked) with random weights built from configs written in the
# script (no network): SD-1.5 UNet at 512 px, SDXL UNet at 1024 px, SD3-medium transformer at 1024 px; seconds per image
# at 1/4/20/50 steps, peak memory, network time per step, decode and text-encoding cost apart. Its own budget:
# PIPELINE_CHECK_LIMIT_S (default 200 s; 420 s lets it reach the 50-step rows of all three). DEVICE_CHECK_PARTS=pipelines runs only it.
# A part that needs transformers, with its own budget and log: with_transformers NAME BUDGET WHAT COMMAND...
with_transformers() {
  local name=$1 budget=$2 what=$3; shift 3
  if ! "$PY" -c "import transformers" 2>/dev/null; then
    say "$name: transformers is missing (pip install 'transformers>=4.45', or bring its wheel in .whl/): skipped"
    return 3
  fi
  say "$name: $what; budget $budget s"
  timeout --signal=INT "$budget" "$PY" "$@" 2>&1 | tee "$LOGS/$name.log"
  return "${PIPESTATUS[0]}"
}
pipelines_part() {
  local budget=${PIPELINE_CHECK_LIMIT_S:-170}
  with_transformers pipelines "$budget" "full-size random SD-1.5 / SDXL / SD3 against their own __call__" \
    benchmarks/pipeline_overhead.py --size full --pipelines sd15,sdxl,sd3 --steps 1,4,20,50 --time-limit $(( budget - 90 )) \
    --out "$RESULTS/pipeline_overhead_gpu"
}
# ---- the system ladder at full size (benchmarks/ladder.py --device cuda): SD-1.5 and SDXL UNets, random weights from
# the published configurations, Euler 30 steps with guidance; fp32 -> bf16 -> SDPA -> torch.compile -> fused QKV -> dynamic
# int8 (torchao; refused with the reason without it), each rung's speed-up and latent difference vs fp32, the network
# timed with CUDA events (one synchronisation per run). Needs transformers (it reads the configurations from
# benchmarks/pipeline_overhead.py). Its own budget: LADDER_CHECK_LIMIT_S (default 140 s; 240 s for both UNets' every rung); DEVICE_CHECK_PARTS=ladder runs
# only it.
ladder_part() {
  local budget=${LADDER_CHECK_LIMIT_S:-140}
  with_transformers ladder "$budget" "full-size SD-1.5 / SDXL UNets, cumulative levers" \
    benchmarks/ladder.py --device cuda --repeats 3 --time-limit $(( budget - 60 )) --out "$RESULTS/ladder_gpu"
}
# ---- token merging at full size (benchmarks/token_merging.py): SD-1.5 with random weights at 512 px, bfloat16,
# DPM-Solver++ 2M 20 steps with guidance, merge ratios 0 / 0.3 / 0.5 of the first level's self-attention tokens: the
# speed-up with its interval and the image difference. Its own budget: TOME_CHECK_LIMIT_S (default 60 s);
# DEVICE_CHECK_PARTS=tome runs only it.
tome_part() {
  local budget=${TOME_CHECK_LIMIT_S:-60}
  with_transformers tome "$budget" "token merging on a full-size SD-1.5" \
    benchmarks/token_merging.py --device cuda --dtype bfloat16 --steps 20 --repeats 3 --out "$RESULTS/token_merging_gpu"
}
# DEVICE_CHECK_PARTS=pipelines, =ladder or =tome: that part alone, its results copied to COPY_DIR
for only in pipelines:pipeline_overhead_gpu ladder:ladder_gpu tome:token_merging_gpu; do
  name=${only%%:*} stem=${only#*:}
  if [ "${DEVICE_CHECK_PARTS:-all}" = "$name" ]; then
    "${name}_part"; RC=$?
    say "$name exit code $RC; results: $RESULTS/$stem.json and .md, log $LOGS/$name.log"
    if [ -n "$COPY_DIR" ]; then
      mkdir -p "$COPY_DIR" && cp "$RESULTS"/"$stem".* "$LOGS"/"$name".log "$COPY_DIR"/ 2>/dev/null
    fi
    exit "$RC"
  fi
done

say "tests (GPU and speed options); budget $(( $(left) - 150 )) s"
timeout --signal=INT $(( $(left) - 150 )) "$PY" -m pytest tests/test_gpu.py tests/test_speed.py -q -rs --durations=10 -p no:cacheprovider -o addopts="" \
  2>&1 | tee "$LOGS/pytest.log"
TESTS_RC=${PIPESTATUS[0]}
say "tests exit code $TESTS_RC"

BUDGET=$(( $(left) - 20 ))
if [ "$BUDGET" -lt 60 ]; then
  say "only $BUDGET s left: the benchmark needs at least 60 s"; BENCH_RC=124
else
  say "benchmark; new measurements stop after $(( BUDGET - 25 )) s"
  timeout --signal=INT "$BUDGET" "$PY" benchmarks/gpu_benchmark.py --time-limit $(( BUDGET - 25 )) --out "$RESULTS" \
    2>&1 | tee "$LOGS/benchmark.log"
  BENCH_RC=${PIPESTATUS[0]}
fi
say "benchmark exit code $BENCH_RC"

if [ "${DEVICE_CHECK_PARTS:-all}" = "all" ]; then
  pipelines_part; PIPE_RC=$?
  say "pipelines exit code $PIPE_RC"
  ladder_part; LADDER_RC=$?
  say "ladder exit code $LADDER_RC"
  tome_part; TOME_RC=$?
  say "token merging exit code $TOME_RC"
else
  PIPE_RC=0; LADDER_RC=0; TOME_RC=0
fi

echo
say "results:"
ls -1 "$RESULTS"/gpu_*.json "$RESULTS"/gpu_*.md "$RESULTS"/pipeline_overhead_gpu.* "$RESULTS"/ladder_gpu.* "$RESULTS"/token_merging_gpu.* 2>/dev/null | sed 's/^/  /'
echo "  $LOGS/pytest.log"
echo "  $LOGS/benchmark.log"
echo "  $LOGS/pipelines.log"
echo "  $LOGS/ladder.log"
echo "  $LOGS/tome.log"
if [ -n "$COPY_DIR" ]; then
  mkdir -p "$COPY_DIR" && cp "$RESULTS"/gpu_*.json "$RESULTS"/gpu_*.md "$RESULTS"/pipeline_overhead_gpu.* "$RESULTS"/ladder_gpu.* "$RESULTS"/token_merging_gpu.* "$LOGS"/*.log "$COPY_DIR"/ 2>/dev/null
  say "copied to $COPY_DIR"
fi
[ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ] && [ "$PIPE_RC" -eq 0 ] && [ "$LADDER_RC" -eq 0 ]
