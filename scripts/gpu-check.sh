#!/usr/bin/env bash
# The GPU check, in one go, within five minutes on one GPU: the tests marked cuda, then the GPU
# part of `memprop bench` (and its runtime part where it exists). Run from anywhere:
#
#     scripts/gpu-check.sh                 # or: PYTHON=/path/to/python scripts/gpu-check.sh
#
# Results go to reports/ (gpu-<device>.md/.json, for committing) and, when $OUT is set, to $OUT
# as well (with the test log, the environment and a summary). Installs nothing but memprop itself
# (`pip install -e '.[dev]'`) when it is not importable. Exit status: 0 all passed, 1 a step
# failed, 2 no GPU or no usable Python.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
OUT="${OUT:-}"
LOGS="$(mktemp -d)"
STARTED=$(date +%s)

say() { echo "gpu-check: $*"; echo "gpu-check: $*" >>"$LOGS/summary.txt"; }

finish() {
    local status=$1
    say "done in $(( $(date +%s) - STARTED )) s, exit $status"
    if [ -n "$OUT" ]; then
        mkdir -p "$OUT/reports"
        cp "$LOGS"/*.txt "$OUT"/ 2>/dev/null
        cp reports/gpu-* reports/runtime* "$OUT/reports/" 2>/dev/null
    fi
    exit "$status"
}

if [ -z "$PYTHON" ] || ! "$PYTHON" -c "import torch" 2>/dev/null; then
    say "no Python with torch found (PYTHON=${PYTHON:-unset}): set PYTHON to one"
    finish 2
fi

if ! "$PYTHON" - <<'EOF' >"$LOGS/env.txt" 2>&1
import sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to PyTorch")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}", p.name, p.total_memory, "bytes")
EOF
then
    say "no GPU: $(tail -n 1 "$LOGS/env.txt"): run this on a machine with an NVIDIA GPU"
    # GPU_CHECK_WITHOUT_GPU=1 runs the rest anyway, to check this script's plumbing on a CPU.
    [ "${GPU_CHECK_WITHOUT_GPU:-0}" = 1 ] || finish 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi >>"$LOGS/env.txt" 2>&1
say "$(grep '^cuda:0' "$LOGS/env.txt")"

if ! "$PYTHON" -c "import memprop, memprop_cli" 2>/dev/null; then
    say "memprop is not installed: pip install -e '.[dev]'"
    timeout 120 "$PYTHON" -m pip install -q -e '.[dev]' >"$LOGS/pip.txt" 2>&1 \
        || timeout 60 "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . \
            >>"$LOGS/pip.txt" 2>&1
    if ! "$PYTHON" -c "import memprop, memprop_cli" 2>>"$LOGS/pip.txt"; then
        say "could not install memprop (see pip.txt)"
        finish 2
    fi
fi

MEMPROP=("$PYTHON" -c "from memprop_cli.main import main; main()")  # no PATH needed
status=0

timeout 150 "$PYTHON" -m pytest -m cuda tests/cuda -q -p no:cacheprovider \
    >"$LOGS/pytest-cuda.txt" 2>&1
code=$?
say "pytest -m cuda tests/cuda: exit $code ($(tail -n 1 "$LOGS/pytest-cuda.txt"))"
[ "$code" -eq 0 ] || status=1

mkdir -p reports
timeout 100 "${MEMPROP[@]}" bench --only gpu --out reports/ >"$LOGS/bench-gpu.txt" 2>&1
code=$?
say "memprop bench --only gpu: exit $code ($(tail -n 1 "$LOGS/bench-gpu.txt"))"
[ "$code" -eq 0 ] || status=1

if "$PYTHON" -c "import sys; from memprop_cli.bench import PARTS; sys.exit('runtime' not in PARTS)"
then
    timeout 60 "${MEMPROP[@]}" bench --only runtime --out reports/ >"$LOGS/bench-runtime.txt" 2>&1
    code=$?
    say "memprop bench --only runtime: exit $code"
    [ "$code" -eq 0 ] || status=1
else
    say "memprop bench has no runtime part: skipped"
fi

finish "$status"
