#!/usr/bin/env bash
# Run every performance benchmark with GPU shapes; JSON + one log go to "$OUT" (default ./out).
#
#   OUT=/some/dir bash benchmarks/gpu_all.sh      # from the repo root; needs torch+CUDA, transformers, peft
#
# Time-boxed to finish in < 7 minutes on one H100/H200 (each step has its own hard `timeout`, and the
# Python scripts stop their timing loops early on a time budget). A failing/timed-out step does not stop
# the others; partial JSON is written after every model/part. Files written (<= 5):
#   env.txt  gpu_all.log  adapter_io.json  train_speed.json  mixed_batch.json
# Afterwards (on a machine with matplotlib):  python benchmarks/plot.py --results <dir with the JSONs>
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
LOG="$OUT/gpu_all.log"
: >"$LOG"
START=$(date +%s)

elapsed() { echo $(($(date +%s) - START)); }

step() { # step NAME LIMIT_S script args...
    local name=$1 limit=$2
    shift 2
    echo "=== [$(elapsed)s] $name (limit ${limit}s)" | tee -a "$LOG"
    timeout -k 5 "$limit" "$PY" "$@" 2>&1 | grep --line-buffered -v -E "Warning|warnings.warn" | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== [$(elapsed)s] $name rc=$rc$([ "$rc" = 124 ] && echo ' (TIMED OUT: partial JSON kept)')" \
        | tee -a "$LOG"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| transformers', transformers.__version__, '| peft', peft.__version__, '| gpu', torch.cuda.get_device_name())"
    "$PY" -c "import bitfit_peft; print('bitfit_peft', bitfit_peft.__version__, bitfit_peft.__file__)"
    git rev-parse --short HEAD 2>/dev/null
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$LOG"

# Expected: adapter_io ~20 s, train_speed ~80 s, mixed_batch ~90 s; hard limits sum to 330 s.
step adapter_io 50 benchmarks/adapter_io.py --gpu --json "$OUT/adapter_io.json"
step train_speed 150 benchmarks/train_speed.py --gpu --budget 20 --json "$OUT/train_speed.json"
step mixed_batch 130 benchmarks/mixed_batch.py --gpu --budget 10 --gen-budget 40 --json "$OUT/mixed_batch.json"

echo "=== total $(elapsed)s; results in $OUT" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
