#!/usr/bin/env bash
# The one script a session with a lent GPU runs (no network there; torch and triton are the
# machine's own). One call returns everything, planned to end within PLAN_S (480 s, 8
# minutes, so that a second call with fixes fits in a 15-minute lease):
#
#   device run: bash bench/device.sh                (timeout_s 560: the plan + margin)
#   here:       DRY_RUN=1 bash bench/device.sh      (or --dry-run: the stages, their caps
#               and commands, the files it would return; no CUDA call, nothing written)
#
# Stages, in order, each with its own cap (the caps and the bench's floor sum to PLAN_S):
#   wheels     pip install --target of .whl/*.whl, when such wheels were carried
#   env        card, driver, clocks, python/torch/CUDA/cuDNN/triton/numpy/pytest/nvcc
#              versions and the date -> summary.txt
#   build      setup.py build_ext --inplace for this card's SM only (SKIP_BUILD=1: use a
#              carried build); a failure only skips the native tests
#   ext        which backends load on cuda, and why not
#   tests      the CUDA tests, one pytest process per file, cheapest and most basic first
#              (native ops, Triton BN ops, Triton conv, Triton train, Triton eval, native
#              block, the block-level suite, any other file with CUDA tests; CUDA-graph and
#              compile tests last). Each: `timeout -s INT` (pytest still prints its
#              summary), --maxfail, per-test --timeout (pytest-timeout), -rfE. Its status
#              is read from its own log's pytest summary line. Time a file leaves unused
#              goes to the next ones (a file may take up to 3x its nominal cap).
#   bench      bench/run.py --quick with what is left (floor BENCH_FLOOR_S), its own
#              --budget-s and --hard-timeout-s inside the stage's cap
#   post       make_preference.py -> measured.json; copy into bench/results/<gpu>/
#
# Returned under $OUT (7 files, 1 folder down), each written as it is produced:
#   $OUT/summary.txt                 versions, every stage's status and time, the failing
#                                    tests' first lines (rewritten after every stage)
#   $OUT/log.txt                     everything: build, each test file, benchmark
#   $OUT/<gpu>/results.{csv,json,md} rows as measured  -> bench/results/<gpu>/
#   $OUT/<gpu>/speedup.png
#   $OUT/<gpu>/measured.json         -> resnet_fused/backends/measured.json
# The same results are copied into bench/results/<gpu>/ of the tree it ran in. The
# summary and the benchmark's short table are printed last.
#
# Knobs (environment): PLAN_S (480), BENCH_FULL=1 (run.py without --quick), BENCH_ARGS
# (extra run.py options), BENCH_FLOOR_S (50), SKIP_BUILD=1, SKIP_TESTS=1, SKIP_BENCH=1,
# TESTS=name,name (only these test stages), MAXFAIL (20), WHEEL_DIR (.whl), SITE_DIR
# (/tmp/resnet_fused_site), PYTHON (python3), OUT (/tmp/resnet_fused_device), REV (the
# commit, recorded in summary.txt when the tree has no .git), DRY_GPU (the card a dry run
# names, nvidia-h200).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
T0=$(date +%s)
DRY=${DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/resnet_fused_device}
PY=${PYTHON:-python3}
PLAN_S=${PLAN_S:-480}
BENCH_FLOOR_S=${BENCH_FLOOR_S:-50}
[ "${SKIP_BENCH:-0}" = 1 ] && BENCH_FLOOR_S=0  # the tests may use the bench's time
POST_S=20            # make_preference, copies, the final print
KILL_S=5             # SIGKILL this long after the SIGINT of a stage's timeout
MAX_FACTOR=3         # a test file may take up to this times its nominal cap
MIN_CAP_S=15         # below this (or its nominal cap, if smaller) a stage is not started
MAXFAIL=${MAXFAIL:-20}
WHEEL_DIR=${WHEEL_DIR:-.whl}
SITE_DIR=${SITE_DIR:-/tmp/resnet_fused_site}
export PYTHONUNBUFFERED=1

# Test stages: name|file|-k expression|nominal cap (s)|per-test timeout (s)|needs native.
# "@others" is where files with CUDA tests that this list does not name are run.
TEST_PLAN=(
    "native_ops|tests/test_native_ops.py||25|15|native"
    "triton_bn|tests/test_triton_bn_ops.py||20|15|"
    "triton_conv|tests/test_triton_conv.py||35|20|"
    "triton_train|tests/test_triton_train.py||20|15|"
    "triton_eval|tests/test_triton_eval.py||25|15|"
    "native_block|tests/test_native_block.py||15|10|native"
    "block|tests/test_cuda_block.py|not cuda_graph and not compile|20|15|"
    "@others"
    "graphs|tests/test_cuda_block.py|cuda_graph|15|10|"
    "compile|tests/test_cuda_block.py|compile|25|25|"
)
OTHER_CAP=10
OTHER_PER_TEST=8
# Fixed stages' caps (s).
WHEELS_CAP=20
ENV_CAP=40
BUILD_CAP=110
EXT_CAP=20

# ------------------------------------------------------------------ clock and bookkeeping
SIM=0  # the dry run's clock: every stage is taken to use its whole cap (the worst case)
now() { if [ "$DRY" = 1 ]; then echo "$SIM"; else echo $(( $(date +%s) - T0 )); fi; }
WORK=""
LOG=/dev/null
if [ "$DRY" != 1 ]; then
    WORK=$(mktemp -d /tmp/resnet_fused_device.XXXXXX)  # per-stage logs; not under $OUT
    trap 'rm -rf "$WORK"' EXIT
    mkdir -p "$OUT"
    LOG="$OUT/log.txt"
    : > "$LOG"
fi
say() { echo "[device.sh +$(now)s] $*" | tee -a "$LOG"; }

STAGE_LINES=()   # one line per finished stage, for summary.txt
FAIL_LINES=()    # "[stage] FAILED tests/...::test - first line"
ENV_LINES=()
STAGE_TOTAL=0    # sum of the caps given out (the dry run checks it against PLAN_S)

record() {  # record NAME STATUS SECONDS CAP
    STAGE_LINES+=("$(printf '%-14s %-60s %4ss of %ss' "$1" "$2" "$3" "$4")")
    write_summary
}

write_summary() {
    [ "$DRY" = 1 ] && return 0
    {
        echo "device.sh summary: $(date -u +%Y-%m-%dT%H:%M:%SZ), plan ${PLAN_S} s, +$(now) s so far"
        [ ${#ENV_LINES[@]} -gt 0 ] && printf '%s\n' "${ENV_LINES[@]}"
        echo "stages (status from each file's own pytest summary line):"
        printf '  %s\n' ${STAGE_LINES[@]+"${STAGE_LINES[@]}"}
        if [ ${#FAIL_LINES[@]} -gt 0 ]; then
            echo "failures and errors (first lines; log.txt has the tracebacks):"
            printf '  %s\n' "${FAIL_LINES[@]}"
        fi
    } > "$WORK/summary.tmp" && mv -f "$WORK/summary.tmp" "$OUT/summary.txt"
}

# Run a command under `timeout -s INT` with CAP seconds in all (SIGINT at CAP-KILL_S,
# SIGKILL KILL_S later), output to the log and to $2; sets RC. Dry run: prints only.
capped() {  # capped CAP LOGFILE CMD...
    local cap=$1 flog=$2
    shift 2
    local soft=$(( cap - KILL_S ))
    [ "$soft" -lt 1 ] && soft=1
    if [ "$DRY" = 1 ]; then
        echo "      \$ timeout -s INT -k $KILL_S $soft$(printf ' %q' "$@")"
        RC=0
        return
    fi
    echo "\$ timeout -s INT -k $KILL_S $soft$(printf ' %q' "$@")" >> "$LOG"
    timeout -s INT -k "$KILL_S" "$soft" "$@" 2>&1 | tee "$flog" >> "$LOG"
    RC=${PIPESTATUS[0]}
}

plan_line() {  # plan_line NAME CAP [detail]
    STAGE_TOTAL=$(( STAGE_TOTAL + $2 ))
    say "stage $1: cap $2 s${3:+ ($3)}"
}

# The pytest summary line of one file's log ("3 failed, 20 passed in 12.3s"), or "".
pytest_summary() {
    grep -E '^=+ .*(passed|failed|error|skipped|deselected|xfailed|xpassed|no tests ran).* in [0-9.]+s.*=+$' "$1" \
        | tail -1 | sed -E 's/^=+ //; s/ =+$//'
}

# Run one test file (or part of one) the way the full run does; appends to STAGE_LINES
# and FAIL_LINES. Kept a function of its own so tests/test_device_sh.py can drive it.
run_test_stage() {  # run_test_stage NAME CAP PER_TEST FILE [K_EXPR]
    local name=$1 cap=$2 per=$3 file=$4 kexpr=${5:-}
    local args=(-m pytest -m cuda -p no:cacheprovider -rfE --tb=short --maxfail="$MAXFAIL")
    # A file given more than its nominal cap gives its tests more too: a third of it, so
    # that at least three hung tests fit before the SIGINT.
    [ "$per" -lt $(( cap / 3 )) ] && per=$(( cap / 3 ))
    [ "$per" -gt $(( cap - KILL_S - 2 )) ] && per=$(( cap - KILL_S - 2 ))
    [ "$per" -lt 5 ] && per=5
    if [ -z "${HAVE_PYTEST_TIMEOUT:-}" ]; then  # not probed yet (a caller of this function)
        HAVE_PYTEST_TIMEOUT=1
        [ "$DRY" = 1 ] || timeout 10 "$PY" -c "import pytest_timeout" >/dev/null 2>&1 \
            || HAVE_PYTEST_TIMEOUT=0
    fi
    if [ "$HAVE_PYTEST_TIMEOUT" = 1 ]; then args+=(--timeout="$per"); fi
    args+=("$file")
    [ -n "$kexpr" ] && args+=(-k "$kexpr")
    plan_line "$name" "$cap" "per-test $per s"
    local t=$(now)
    if [ "$DRY" = 1 ]; then
        capped "$cap" "" "$PY" "${args[@]}"
        SIM=$(( SIM + cap ))
        return
    fi
    local flog="$WORK/$name.log"
    echo "======== $name: $file${kexpr:+ -k '$kexpr'}" >> "$LOG"
    capped "$cap" "$flog" "$PY" "${args[@]}"
    local line st
    line=$(pytest_summary "$flog")
    case $RC in
        0) st="ok" ;;
        1) st="FAILED" ;;
        5) st="no tests" ;;
        124) st="TIMEOUT (SIGINT at $(( cap - KILL_S )) s)" ;;
        137) st="KILLED (no exit ${KILL_S} s after SIGINT)" ;;
        2) st="INTERRUPTED or collection error" ;;
        *) st="rc $RC" ;;
    esac
    record "$name" "$st: ${line:-no pytest summary line}" "$(( $(now) - t ))" "$cap"
    local l
    while IFS= read -r l; do
        FAIL_LINES+=("[$name] ${l:0:240}")
    done < <(grep -E '^(FAILED|ERROR) ' "$flog" | head -40)
    # Where a SIGINT stopped it: pytest prints "path:line: KeyboardInterrupt".
    l=$(grep -E ': KeyboardInterrupt$' "$flog" | tail -1)
    [ -n "$l" ] && FAIL_LINES+=("[$name] interrupted in ${l%: KeyboardInterrupt}")
    write_summary
}

if [ "${DEVICE_SH_LIB:-0}" = 1 ]; then return 0 2>/dev/null || exit 0; fi

# ------------------------------------------------------------------ the plan
# Test files with CUDA tests that TEST_PLAN does not name run before the graph/compile
# stages (a new file is not silently left out).
# A file has CUDA tests when it marks them (@pytest.mark.cuda, pytestmark = ...,
# marks=pytest.mark.cuda) or parametrizes over conftest's DEVICES.
CUDA_TESTS_RE='^\s*@pytest\.mark\.cuda|^pytestmark\s*=.*mark\.cuda|marks=pytest\.mark\.cuda|^from conftest import .*\bDEVICES\b'
OTHERS=()
for f in tests/test_*.py; do
    grep -qE "$CUDA_TESTS_RE" "$f" || continue
    known=0
    for e in "${TEST_PLAN[@]}"; do [ "$(echo "$e" | cut -d'|' -f2)" = "$f" ] && known=1; done
    [ "$known" = 0 ] && OTHERS+=("other_$(basename "$f" .py | sed 's/^test_//')|$f||$OTHER_CAP|$OTHER_PER_TEST|")
done
STAGES=()
for e in "${TEST_PLAN[@]}"; do
    if [ "$e" = "@others" ]; then STAGES+=(${OTHERS[@]+"${OTHERS[@]}"}); else STAGES+=("$e"); fi
done
if [ -n "${TESTS:-}" ]; then  # TESTS=name,name: only these stages
    keep=()
    for e in "${STAGES[@]}"; do
        case ",$TESTS," in *",${e%%|*},"*) keep+=("$e") ;; esac
    done
    STAGES=(${keep[@]+"${keep[@]}"})
fi
[ "${SKIP_TESTS:-0}" = 1 ] && STAGES=()

[ "$DRY" = 1 ] && say "DRY RUN: no command runs, no CUDA call, nothing is written; each stage is taken to use its whole cap (the worst case)"
say "plan ${PLAN_S} s: wheels ${WHEELS_CAP}, env ${ENV_CAP}, build ${BUILD_CAP}, ext ${EXT_CAP}, ${#STAGES[@]} test stages, bench >= ${BENCH_FLOOR_S}, post ${POST_S} (s)"

# ------------------------------------------------------------------ wheels
shopt -s nullglob
WHEELS=("$WHEEL_DIR"/*.whl)
shopt -u nullglob
if [ ${#WHEELS[@]} -gt 0 ]; then
    plan_line wheels "$WHEELS_CAP" "${#WHEELS[@]} wheels -> $SITE_DIR"
    t=$(now)
    capped "$WHEELS_CAP" "$WORK/wheels.log" "$PY" -m pip install -q --no-index --no-deps \
        --no-compile --no-cache-dir --upgrade --target "$SITE_DIR" "${WHEELS[@]}"
    SIM=$(( SIM + WHEELS_CAP ))
    if [ "$RC" = 0 ]; then
        export PYTHONPATH="$SITE_DIR${PYTHONPATH:+:$PYTHONPATH}"
        st="ok: $(basename -a "${WHEELS[@]}" | tr '\n' ' ')"
    else
        st="FAILED (rc $RC): running without them"
    fi
    record wheels "$st" "$(( $(now) - t ))" "$WHEELS_CAP"
else
    say "stage wheels: skipped (no $WHEEL_DIR/*.whl)"
    record wheels "skipped: no $WHEEL_DIR/*.whl" 0 0
fi

# ------------------------------------------------------------------ env: card and versions
plan_line env "$ENV_CAP" "card, driver, versions"
t=$(now)
ENV_PY='
import re, sys, torch
from importlib import metadata
def v(dist):
    try:
        return metadata.version(dist)
    except Exception as e:
        return "absent (%s)" % type(e).__name__
if not torch.cuda.is_available():
    print("NO_CUDA=1"); sys.exit(0)
p = torch.cuda.get_device_properties(0)
print("GPU=%s" % p.name)
print("SLUG=%s" % (re.sub(r"[^a-z0-9]+", "-", p.name.lower()).strip("-") or "unknown"))
print("CAP=%d.%d" % (p.major, p.minor))
print("card: %s (sm %d.%d, %d SMs, %.1f GiB)" % (p.name, p.major, p.minor, p.multi_processor_count, p.total_memory / 2**30))
print("versions: python %s, torch %s (CUDA %s), cuDNN %s, triton %s, numpy %s, pytest %s, pytest-timeout %s, setuptools %s"
      % (sys.version.split()[0], torch.__version__, torch.version.cuda, torch.backends.cudnn.version(),
         v("triton"), v("numpy"), v("pytest"), v("pytest-timeout"), v("setuptools")))
'
if [ "$DRY" = 1 ]; then
    echo "      \$ timeout -s INT -k 2 $(( ENV_CAP - 12 )) $PY -c '<probe: card, capability, versions>'"
    echo "      \$ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv"
    echo "      \$ nvcc --version; git rev-parse HEAD; date -u"
    SIM=$(( SIM + ENV_CAP ))
    SLUG=${DRY_GPU:-nvidia-h200}
    CAP=9.0
    record env "dry run" 0 "$ENV_CAP"
else
    # The probe (a cold torch import and CUDA init can take 10-20 s), nvidia-smi and nvcc
    # within ENV_CAP together.
    timeout -s INT -k 2 $(( ENV_CAP - 12 )) "$PY" -c "$ENV_PY" > "$WORK/env.log" 2>&1
    RC=$?
    cat "$WORK/env.log" >> "$LOG"
    if grep -q '^NO_CUDA=1' "$WORK/env.log"; then
        say "no CUDA device visible to $PY: this script is for a GPU machine; DRY_RUN=1 shows its plan"
        ENV_LINES+=("NO CUDA DEVICE (torch.cuda.is_available() is False); see log.txt")
        record env "NO CUDA DEVICE" "$(( $(now) - t ))" "$ENV_CAP"
        exit 2
    fi
    GPU=$(sed -n 's/^GPU=//p' "$WORK/env.log")
    SLUG=$(sed -n 's/^SLUG=//p' "$WORK/env.log")
    CAP=$(sed -n 's/^CAP=//p' "$WORK/env.log")
    if [ -z "$SLUG" ] || [ -z "$CAP" ]; then
        # The probe failed or timed out: name the card from nvidia-smi and go on (each
        # later stage reports its own failure) rather than lose the whole call.
        GPU=$(timeout 5 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
        CAP=$(timeout 5 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
        GPU=${GPU:-unknown GPU}; CAP=${CAP:-9.0}
        SLUG=$(echo "$GPU" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
        ENV_LINES+=("PROBE FAILED (rc $RC): card from nvidia-smi: $GPU, sm $CAP; see log.txt")
        say "env probe failed (rc $RC); going on with $GPU (sm $CAP)"
    fi
    while IFS= read -r l; do ENV_LINES+=("$l"); done < <(grep -E '^(card|versions): ' "$WORK/env.log")
    smi=$(timeout 5 nvidia-smi --query-gpu=driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,utilization.gpu \
          --format=csv,noheader 2>&1 | head -1)
    ENV_LINES+=("driver, SM clock/max, power/limit, temp, util: ${smi:-nvidia-smi failed}")
    NVCC=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
    [ -x "$NVCC" ] || NVCC=$(command -v nvcc || echo nvcc)
    ENV_LINES+=("nvcc: $NVCC $(timeout 5 "$NVCC" --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'not found')")
    ENV_LINES+=("tree: ${REV:-$(git rev-parse --short HEAD 2>/dev/null || echo 'commit unknown (no .git; pass REV=)')}; date $(date -u +%Y-%m-%dT%H:%M:%SZ)")
    printf '%s\n' "${ENV_LINES[@]}" | tee -a "$LOG"
    # Without pytest-timeout, --timeout would be an unknown option to pytest.
    HAVE_PYTEST_TIMEOUT=0
    if grep -q '^versions: ' "$WORK/env.log"; then
        grep -q 'pytest-timeout absent' "$WORK/env.log" || HAVE_PYTEST_TIMEOUT=1
    elif timeout 10 "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
        HAVE_PYTEST_TIMEOUT=1
    fi
    [ "$HAVE_PYTEST_TIMEOUT" = 1 ] || ENV_LINES+=("pytest-timeout not importable: no per-test timeouts")
    record env "ok: $GPU" "$(( $(now) - t ))" "$ENV_CAP"
fi
RES="$OUT/$SLUG"

# ------------------------------------------------------------------ build (this card's SM only)
# sm_90 gets the arch-specific 90a (wgmma, TMA); other cards their plain SM.
ARCH=${CAP/./}
[ "$ARCH" = 90 ] && ARCH=90a
if [ "${SKIP_BUILD:-0}" = 1 ]; then
    say "stage build: skipped (SKIP_BUILD=1: the carried build is used)"
    record build "skipped (SKIP_BUILD=1)" 0 0
else
    if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
    plan_line build "$BUILD_CAP" "sm $ARCH, MAX_JOBS=16"
    t=$(now)
    capped "$BUILD_CAP" "$WORK/build.log" env MAX_JOBS=16 RESNET_FUSED_CUDA_ARCHS="$ARCH" \
        TORCH_CUDA_ARCH_LIST="$CAP" "$PY" setup.py build_ext --inplace
    SIM=$(( SIM + BUILD_CAP ))
    case $RC in
        0) st="ok" ;;
        124|137) st="TIMEOUT after $BUILD_CAP s: the native tests are skipped" ;;
        *) st="FAILED (rc $RC): the native tests are skipped; $(grep -m1 -E 'error' "$WORK/build.log" 2>/dev/null | cut -c1-160)" ;;
    esac
    [ "$DRY" = 1 ] && st="dry run"
    say "build: $st"
    record build "$st" "$(( $(now) - t ))" "$BUILD_CAP"
fi

# ------------------------------------------------------------------ ext: which backends load
plan_line ext "$EXT_CAP" "backends available on cuda"
t=$(now)
EXT_PY='import torch, resnet_fused.backends as b; [print("backend %s: %s" % (n, b.unavailable_reason(n, torch.device("cuda")) or "available")) for n in b.NAMES]'
NATIVE_OK=1
capped "$EXT_CAP" "$WORK/ext.log" "$PY" -c "$EXT_PY"
SIM=$(( SIM + EXT_CAP ))
if [ "$DRY" != 1 ]; then
    # Only a reason the backend gives skips the native tests: a probe that fails or times
    # out decides nothing (the native files then report their own errors).
    NATIVE_WHY=$(grep -m1 '^backend native:' "$WORK/ext.log" | cut -c17-)
    if [ -n "$NATIVE_WHY" ] && [ "$NATIVE_WHY" != available ]; then NATIVE_OK=0; fi
    while IFS= read -r l; do ENV_LINES+=("$l"); done < <(grep '^backend ' "$WORK/ext.log")
    record ext "rc $RC; native $([ "$NATIVE_OK" = 1 ] && echo available || echo UNAVAILABLE); see the backend lines" \
        "$(( $(now) - t ))" "$EXT_CAP"
else
    record ext "dry run" 0 "$EXT_CAP"
fi

# ------------------------------------------------------------------ tests, one file per process
# Test time ends where the bench's floor and the post stage begin; a stage gets its nominal
# cap plus what earlier ones left, up to MAX_FACTOR times it, minus the nominal caps of the
# stages after it.
TEST_END=$(( PLAN_S - BENCH_FLOOR_S - POST_S ))
n=${#STAGES[@]}
for (( i = 0; i < n; i++ )); do
    IFS='|' read -r name file kexpr nominal per needs <<< "${STAGES[$i]}"
    later=0
    for (( j = i + 1; j < n; j++ )); do
        later=$(( later + $(echo "${STAGES[$j]}" | cut -d'|' -f4) ))
    done
    cap=$(( TEST_END - $(now) - later ))
    [ "$cap" -gt $(( MAX_FACTOR * nominal )) ] && cap=$(( MAX_FACTOR * nominal ))
    if [ ! -f "$file" ]; then
        say "stage $name: skipped ($file not found)"
        record "$name" "skipped: $file not found" 0 0
    elif [ "$needs" = native ] && [ "$NATIVE_OK" != 1 ]; then
        say "stage $name: skipped (native backend unavailable: $NATIVE_WHY)"
        record "$name" "SKIPPED: native backend unavailable: ${NATIVE_WHY:0:80}" 0 0
    elif [ "$cap" -lt "$MIN_CAP_S" ] && [ "$cap" -lt "$nominal" ]; then
        say "stage $name: skipped (${cap} s left in the plan for it)"
        record "$name" "SKIPPED: no time left in the plan" 0 0
    else
        run_test_stage "$name" "$cap" "$per" "$file" "$kexpr"
    fi
done

# ------------------------------------------------------------------ bench
BENCH_RC="not run"
if [ "${SKIP_BENCH:-0}" = 1 ]; then
    say "stage bench: skipped (SKIP_BENCH=1)"
    record bench "skipped (SKIP_BENCH=1)" 0 0
else
    cap=$(( PLAN_S - POST_S - $(now) ))
    [ "$cap" -lt "$BENCH_FLOOR_S" ] && cap=$BENCH_FLOOR_S
    # run.py's own hard timeout 10 s before the SIGINT; its budget leaves a fifth of that
    # (at least 20 s) for the measurement in flight and the writing of the results.
    hard=$(( cap - KILL_S - 10 ))
    slack=$(( hard / 5 )); [ "$slack" -lt 20 ] && slack=20
    budget=$(( hard - slack )); [ "$budget" -lt 10 ] && budget=10
    mode=--quick; [ "${BENCH_FULL:-0}" = 1 ] && mode=""
    plan_line bench "$cap" "run.py --budget-s $budget --hard-timeout-s $hard"
    t=$(now)
    [ "$DRY" != 1 ] && mkdir -p "$RES"
    # shellcheck disable=SC2086
    capped "$cap" "$WORK/bench.log" "$PY" bench/run.py $mode --budget-s "$budget" \
        --hard-timeout-s "$hard" --out "$RES" ${BENCH_ARGS:-}
    SIM=$(( SIM + cap ))
    BENCH_RC=$RC
    case $RC in
        0) st="ok" ;;
        1) st="rc 1: a numerics FAIL or a provider ERROR (see results.md)" ;;
        3) st="HARD TIMEOUT (run.py's own, ${hard} s): results so far written" ;;
        124|130) st="INTERRUPTED at the stage cap: results so far written" ;;
        *) st="rc $RC" ;;
    esac
    [ "$DRY" = 1 ] && st="dry run"
    rows=0; [ -f "$RES/results.csv" ] && rows=$(( $(wc -l < "$RES/results.csv") - 1 ))
    record bench "$st; $rows rows" \
        "$(( $(now) - t ))" "$cap"
fi

# ------------------------------------------------------------------ post: preference, copies
plan_line post "$POST_S" "make_preference, copy to bench/results/$SLUG/"
t=$(now)
if [ "$DRY" = 1 ] || [ -f "$RES/results.json" ]; then
    capped $(( POST_S - 5 )) "$WORK/post.log" "$PY" bench/make_preference.py "$RES/results.json" \
        --replace --out "$RES/measured.json"
else
    RC="no results.json"
fi
SIM=$(( SIM + POST_S ))
if [ "$DRY" = 1 ]; then
    echo "      \$ cp $RES/{results.csv,results.json,results.md,speedup.png} bench/results/$SLUG/"
else
    [ "$RC" != 0 ] && say "make_preference: $RC (rc 1: no fused CUDA timing rows)"
    mkdir -p "bench/results/$SLUG"
    for f in results.csv results.json results.md speedup.png; do
        [ -f "$RES/$f" ] && cp "$RES/$f" "bench/results/$SLUG/"
    done
    record post "measured.json: $([ -f "$RES/measured.json" ] && echo written || echo none)" \
        "$(( $(now) - t ))" "$POST_S"
fi

# ------------------------------------------------------------------ what comes back, the short tables last
FILES=(summary.txt log.txt "$SLUG/results.csv" "$SLUG/results.json" "$SLUG/results.md"
       "$SLUG/speedup.png" "$SLUG/measured.json")
if [ "$DRY" = 1 ]; then
    say "worst case: stages' caps sum to ${STAGE_TOTAL} s of the ${PLAN_S} s plan"
    echo "would return ${#FILES[@]} files (at most 8, 1 folder down) under \$OUT=$OUT:"
    printf '  file %s\n' "${FILES[@]}"
    echo "and copy results.{csv,json,md} and speedup.png into bench/results/$SLUG/"
    exit 0
fi
echo
echo "=== device.sh: $SLUG, $(now) s of the ${PLAN_S} s plan; bench rc $BENCH_RC"
cat "$OUT/summary.txt"
echo "files: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
sed -n '/^=== summary/,/^total [0-9]* s$/p' "$WORK/bench.log" 2>/dev/null
exit 0
