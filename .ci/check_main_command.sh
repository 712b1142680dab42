#!/usr/bin/env bash
# The README's main command (README.md, "Two commands for a fresh machine": the one that
# ends in bench/run.py), exactly as written there, run the way a person on a fresh
# machine runs it: a new shell whose environment holds only PATH and HOME (and CUDA_HOME
# where the caller has it, which the command reads), nothing that .ci/run or the test
# suite exported. Fails on a non-zero exit, and on any FAIL or ERROR row in the results
# it reports or in its output.
#
# Usage: .ci/check_main_command.sh [LOG]   (from anywhere; LOG: where its output goes,
# default a temporary file). RESNET_FUSED_MAIN_TIMEOUT_S caps the run (default 1800 s):
# a hang fails with a message instead of using up CI's time.
set -euo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-$(mktemp -t main_command.XXXXXX.log)}
CAP=${RESNET_FUSED_MAIN_TIMEOUT_S:-1800}

mapfile -t found < <(grep -E '^    python3 -m venv .*bench/run\.py' README.md || true)
if [ "${#found[@]}" -ne 1 ]; then
    echo "check_main_command: README.md should have exactly one indented command line ending" \
         "in bench/run.py (the main command), found ${#found[@]}" >&2
    exit 2
fi
cmd=${found[0]#    }
echo "check_main_command: running README.md's main command in a clean environment:"
echo "    $cmd"

clean_env=(PATH="$PATH" HOME="$HOME")
[ -n "${CUDA_HOME:-}" ] && clean_env+=(CUDA_HOME="$CUDA_HOME")
set +e
env -i "${clean_env[@]}" timeout "$CAP" bash -c "$cmd" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -eq 124 ]; then
    echo "check_main_command: the main command ran past ${CAP} s (log: $LOG)" >&2
    exit 1
fi
if [ "$rc" -ne 0 ]; then
    echo "check_main_command: the main command exited with $rc (log: $LOG)" >&2
    exit 1
fi
# bench/run.py names its results folder in its last lines: "results: DIR  (files)".
dir=$(sed -n 's/^results: \(.*\)  (.*)$/\1/p' "$LOG" | tail -n 1)
if [ -z "$dir" ] || [ ! -f "$dir/results.json" ]; then
    echo "check_main_command: no results.json named in the output (log: $LOG)" >&2
    exit 1
fi
python3 - "$dir/results.json" <<'EOF'
import json
import sys

doc = json.load(open(sys.argv[1]))
bad = [r for r in doc["rows"] if r.get("status") in ("FAIL", "ERROR")]
for r in bad:
    print(f"check_main_command: {r['status']} row: {r.get('section')} {r.get('provider')} "
          f"{r.get('mode')} {r.get('dtype')} {r.get('kernel')} {r.get('quantity', '')} "
          f"{r.get('note', '')}", file=sys.stderr)
for e in doc.get("errors", []):
    print(f"check_main_command: error: {e}", file=sys.stderr)
if not doc["rows"]:
    print("check_main_command: results.json has no rows", file=sys.stderr)
sys.exit(1 if bad or doc.get("errors") or not doc["rows"] else 0)
EOF
if grep -nwE 'FAIL|ERROR|ERRORS' "$LOG" >&2; then
    echo "check_main_command: FAIL/ERROR in the output above (log: $LOG)" >&2
    exit 1
fi
echo "check_main_command: OK, $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["rows"]))' "$dir/results.json") rows in $dir"
