"""Linear probes on the frozen base model: how much of each task the CLS token (what the head reads) carries.

``BertForSequenceClassification`` puts its head on the first token (``[CLS]``, through the pooler). A checkpoint
trained for mean pooling, like ``all-MiniLM-L6-v2``, need not put the sentence into that token. This script fits
an L2-regularised logistic regression (L-BFGS, standardised features; the probe of ``train(cls_attention_init=
"auto")``, ``bitfit_peft.training.cls_init.probe_accuracy``) on the reduced setting's 400 training examples (and,
for the data-size sweep's tasks, on its smaller training sets), once on the frozen ``[CLS]`` vector, once on the
frozen mean over tokens, and reports dev accuracy per regularisation strength and training-set size (the report
reads ``--cls-init auto``'s decision at each size from it). Nothing is trained in the model; the test split is not
read.

Example:
    $ python -m benchmarks.accuracy.feature_probe --tasks trec movie
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.accuracy.loop import Encoded, build_model  # noqa: E402
from benchmarks.accuracy.run import SETTINGS, Runner  # noqa: E402
from benchmarks.accuracy.settings import feature_probe_path  # noqa: E402

from bitfit_peft.training.cls_init import PROBE_L2_GRID, frozen_features, probe_accuracy  # noqa: E402

RESULTS = feature_probe_path("reduced")


def _batches(data: Encoded) -> tuple[Iterator[dict[str, torch.Tensor]], int]:
    """``frozen_features``' arguments for a whole split: its batches on the CPU and their count of examples."""
    return data.batches(128, torch.device("cpu")), len(data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="*", default=["trec", "sms", "movie", "bbc"])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    s = SETTINGS["reduced"]
    runner = Runner(s, torch.device("cpu"), Path("/dev/null"))
    rows = []
    for task in args.tasks:
        model = build_model("full", runner.task(task).num_labels, 0)
        cls_dev, mean_dev, y_dev = frozen_features(model, *_batches(runner.encoded(task, "dev", None)))
        # the main table's training set, and for the sweep's tasks its smaller ones (the sweep's defaults rows)
        sizes = {s.train_cap} | ({n for n in s.sweep_sizes if n is not None} if task in s.sweep_tasks else set())
        for n in sorted(sizes):
            cls, mean, y = frozen_features(model, *_batches(runner.encoded(task, "train", n)))
            for l2 in PROBE_L2_GRID:
                rows.append(dict(task=task, n_train=len(y), l2=l2, cls=probe_accuracy(cls, y, cls_dev, y_dev, l2),
                                 mean=probe_accuracy(mean, y, mean_dev, y_dev, l2)))  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps({"setting": s.name, "l2_grid": PROBE_L2_GRID, "rows": rows}, indent=1) + "\n")
    print("| task | training examples | [CLS] probe, best dev % | mean-pooled probe, best dev % |\n|---|---|---|---|")
    for task, n in dict.fromkeys((r["task"], r["n_train"]) for r in rows):
        mine = [r for r in rows if (r["task"], r["n_train"]) == (task, n)]
        print(f"| {task} | {n} | {max(r['cls'] for r in mine):.1f} | {max(r['mean'] for r in mine):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
