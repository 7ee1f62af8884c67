#!/usr/bin/env bash
# Run every performance benchmark with GPU shapes; JSON + one log go to "$OUT" (default ./out).
#
#   OUT=/some/dir bash benchmarks/gpu_all.sh      # from the repo root; needs torch+CUDA, transformers, peft
#
# Time-boxed to finish in <= 8 minutes on one H100/H200: each step has its own hard `timeout`, every limit is
# also capped so that all steps end by DEADLINE_S (465 s after the start), and the Python scripts stop their
# timing loops early on a time budget. A failing/timed-out step does not stop the others; partial JSON is
# written after every model/part (mixed_batch.py: after every stage and timing round, and on SIGTERM).
# Files written (<= 7):
#   env.txt  gpu_all.log  gpu_checks.json  adapter_io.json  train_speed.json  mixed_batch.json
#   mixed_batch_qwen05b.json
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
DEADLINE_S="${DEADLINE_S:-465}" # every step ends by then (+5 s kill grace): whole script < 480 s

elapsed() { echo $(($(date +%s) - START)); }

step() { # step NAME LIMIT_S script args...
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE_S - $(elapsed)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "=== [$(elapsed)s] $name SKIPPED (only ${limit}s left before the ${DEADLINE_S}s deadline)" | tee -a "$LOG"
        return
    fi
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

# Expected: gpu_checks ~40 s, adapter_io ~20 s, train_speed ~90 s (7 modes incl. naive on a bf16 base), mixed_batch
# ~60 s eager + ~60-90 s compiling, mixed_batch_qwen05b ~60-80 s; hard limits sum to 475 s, and DEADLINE_S caps
# the last steps if earlier ones overran.
# Correctness on CUDA that CI cannot run (mixed batches, low-memory mode vs naive on a bf16 base incl. dispatched
# ops, device_map split, inductor compile incl. the in-place pattern with mixed batches): ~30-50 s.
step gpu_checks 60 benchmarks/gpu_checks.py --out "$OUT"
step adapter_io 40 benchmarks/adapter_io.py --gpu --json "$OUT/adapter_io.json"
step train_speed 125 benchmarks/train_speed.py --gpu --budget 18 --json "$OUT/train_speed.json"
# BERT-base bs64x128 bf16 forward: eager patterns, then torch.compile (mode "default": "max-autotune-no-cudagraphs"
# benchmarks GEMM configs for minutes, which does not fit the box) of base and of the PEFT model, single adapter
# and mixed 8-task batch, timed against the eager base and base_compiled. Compiled patterns still uncompiled after
# 90 s of compiling are skipped (recorded in the JSON).
step mixed_batch 150 benchmarks/mixed_batch.py --gpu --parts forward --compile --compile-budget 90 --budget 8 \
    --json "$OUT/mixed_batch.json"
# Issue shape: Qwen2-0.5B, batch 16, prompt 64, 128 new tokens (greedy), bf16. To fit the box the per-task split
# (8 sequential generate calls) is left out; 2 rounds, or 1 when a round takes > 30 s.
step mixed_batch_qwen05b 100 benchmarks/mixed_batch.py --gpu --shape qwen05b --new-tokens 128 \
    --gen-patterns bitfit_single,bitfit_mixed,lora_single,lora_mixed --gen-rounds 2 --gen-budget 30 \
    --json "$OUT/mixed_batch_qwen05b.json"

echo "=== total $(elapsed)s; results in $OUT" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
