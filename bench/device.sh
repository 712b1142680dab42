#!/usr/bin/env bash
# The one script a session with a lent GPU runs (no network there; torch and triton are
# the machine's own):
#
#   device run: bash bench/device.sh                 # quick: build, GPU tests, run.py --quick (< 6 min)
#   device run: BENCH_FULL=1 bash bench/device.sh    # the full benchmark (~10 min)
#
# It builds the extension for the present card only, runs the CUDA tests with a time cap,
# runs the benchmark, and leaves under $OUT (at most 8 files, 1 folder down):
#   $OUT/log.txt                    build, tests and benchmark output
#   $OUT/<gpu>/results.{csv,json,md} speedup.png   -> commit as bench/results/<gpu>/
#   $OUT/<gpu>/measured.json        -> resnet_fused/backends/measured.json (fastest backend)
# and copies the same into bench/results/<gpu>/ of the tree it ran in (a GPU machine of
# your own keeps them there). The short table is printed last.
#
# Knobs (environment): BENCH_FULL=1, BENCH_ARGS="--shapes s2,s3" (extra run.py options),
# BUILD_TIMEOUT (s, default 240), TEST_TIMEOUT (s, default 120), BENCH_BUDGET (s, run.py's
# --budget-s; default: what is left of 330 s in quick mode, 480 s full), SKIP_BUILD=1,
# SKIP_TESTS=1, PYTHON (default python3).
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT=${OUT:-/tmp/resnet_fused_bench}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
say() { echo "[device.sh +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - T0 )); }

# ---------------------------------------------------------------- the card
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1; then
    say "no CUDA device visible to $PY: this script is for a GPU machine (on CPU run: python bench/run.py)"
    exit 2
fi
read -r CAP SLUG < <($PY - <<'EOF'
import re, torch
name = torch.cuda.get_device_name(0)
print("%d.%d" % torch.cuda.get_device_capability(0), re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
EOF
)
say "card: $($PY -c 'import torch; print(torch.cuda.get_device_name(0))') (sm $CAP) -> results folder $SLUG"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,utilization.gpu \
    --format=csv >>"$LOG" 2>&1 || true
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())" 2>&1 | tee -a "$LOG"

# ---------------------------------------------------------------- build (this card's arch only)
BUILD_STATUS="skipped"
if [ "${SKIP_BUILD:-0}" != "1" ]; then
    export MAX_JOBS=16 RESNET_FUSED_CUDA_ARCHS="$CAP" TORCH_CUDA_ARCH_LIST="$CAP"
    if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
    say "build: pip install --no-build-isolation --no-deps -e . (MAX_JOBS=16, arch $CAP, cap ${BUILD_TIMEOUT:-240} s)"
    if timeout "${BUILD_TIMEOUT:-240}" $PY -m pip install --no-build-isolation --no-deps --no-cache-dir -e . >>"$LOG" 2>&1; then
        BUILD_STATUS="ok in $(elapsed) s"
    else
        BUILD_STATUS="FAILED (rc $?): the native backend will be skipped; see log.txt"
        tail -20 "$LOG"
    fi
    say "build: $BUILD_STATUS"
fi
$PY -c "import resnet_fused as r; print('backends available on cuda:', r.backends.available('cuda')); [print(' ', n, '->', r.backends.unavailable_reason(n, __import__('torch').device('cuda'))) for n in r.backends.NAMES]" 2>&1 | tee -a "$LOG"

# ---------------------------------------------------------------- GPU tests
TEST_STATUS="skipped"
if [ "${SKIP_TESTS:-0}" != "1" ]; then
    say "tests: pytest -m cuda -x -q tests (cap ${TEST_TIMEOUT:-120} s)"
    timeout "${TEST_TIMEOUT:-120}" $PY -m pytest -m cuda -x -q -p no:cacheprovider tests >>"$LOG" 2>&1
    rc=$?
    TEST_STATUS="$(grep -E '^(FAILED|ERROR)|[0-9]+ (passed|failed|error)' "$LOG" | tail -1)"
    [ "$rc" = 124 ] && TEST_STATUS="TIMED OUT after ${TEST_TIMEOUT:-120} s; last: $TEST_STATUS"
    [ "$rc" != 0 ] && [ "$rc" != 124 ] && TEST_STATUS="rc $rc: $TEST_STATUS"
    say "tests: $TEST_STATUS"
fi

# ---------------------------------------------------------------- benchmark
RES="$OUT/$SLUG"
mkdir -p "$RES"
if [ "${BENCH_FULL:-0}" = "1" ]; then
    MODE_ARGS=""
    BUDGET=${BENCH_BUDGET:-$(( 480 - $(elapsed) ))}
else
    MODE_ARGS="--quick"
    BUDGET=${BENCH_BUDGET:-$(( 330 - $(elapsed) ))}
fi
[ "$BUDGET" -lt 60 ] && BUDGET=60
say "bench: run.py $MODE_ARGS --budget-s $BUDGET ${BENCH_ARGS:-}"
# shellcheck disable=SC2086
$PY bench/run.py $MODE_ARGS --budget-s "$BUDGET" --out "$RES" ${BENCH_ARGS:-} >"$OUT/bench.txt" 2>&1
BENCH_RC=$?
cat "$OUT/bench.txt" >>"$LOG"
rm -f "$OUT/bench.txt"
say "bench: rc $BENCH_RC (1 = a numerics FAIL or a provider ERROR; see the summary)"
$PY bench/make_preference.py "$RES/results.json" --replace --out "$RES/measured.json" >>"$LOG" 2>&1 \
    || say "make_preference: no fused timing rows"
mkdir -p "bench/results/$SLUG"
cp "$RES"/results.csv "$RES"/results.json "$RES"/results.md "bench/results/$SLUG/" 2>/dev/null
cp "$RES"/speedup.png "bench/results/$SLUG/" 2>/dev/null || true

# ---------------------------------------------------------------- the short table, last
echo
echo "=== device.sh: $SLUG, build: $BUILD_STATUS; tests: $TEST_STATUS; bench rc $BENCH_RC; $(elapsed) s total"
echo "files: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
sed -n '/^=== summary/,/^total [0-9]* s$/p' "$LOG"
exit 0
