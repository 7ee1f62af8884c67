"""Linear probes on the frozen base model: how much of each task the CLS token (what the head reads) carries.

``BertForSequenceClassification`` puts its head on the first token (``[CLS]``, through the pooler). A checkpoint
trained for mean pooling, like ``all-MiniLM-L6-v2``, need not put the sentence into that token. This script fits
an L2-regularised logistic regression (L-BFGS, standardised features) on the reduced setting's 400 training
examples, once on the frozen ``[CLS]`` vector, once on the frozen mean over tokens, and reports dev accuracy per
regularisation strength. Nothing is trained in the model; the test split is not read.

Example:
    $ python -m benchmarks.accuracy.feature_probe --tasks trec movie
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.accuracy.loop import Encoded, build_model  # noqa: E402
from benchmarks.accuracy.run import SETTINGS, Runner  # noqa: E402

RESULTS = REPO / "benchmarks" / "accuracy" / "results" / "cpu_reduced_feature_probe.json"
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)


@torch.no_grad()
def frozen_features(model: torch.nn.Module, data: Encoded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([CLS] vectors, mean-pooled vectors, labels) of the frozen encoder's last layer."""
    model.eval()
    encoder = getattr(model, model.base_model_prefix)
    cls, mean = [], []
    for i in range(0, len(data), 128):
        batch = data.batch(list(range(i, min(len(data), i + 128))), torch.device("cpu"))
        batch.pop("labels")
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        cls.append(hidden[:, 0])
        mean.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(cls), torch.cat(mean), torch.tensor(data.labels)


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, x_dev: torch.Tensor, y_dev: torch.Tensor, l2: float) -> float:
    """Dev accuracy (%) of a logistic regression fitted on standardised ``x`` with an L2 penalty ``l2``."""
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z, z_dev = (x - mu) / sd, (x_dev - mu) / sd
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(z), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100 * float((lin(z_dev).argmax(-1) == y_dev).float().mean())


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
        cls, mean, y = frozen_features(model, runner.encoded(task, "train", s.train_cap))
        cls_dev, mean_dev, y_dev = frozen_features(model, runner.encoded(task, "dev", None))
        for l2 in L2_GRID:
            rows.append(dict(task=task, l2=l2, cls=probe_accuracy(cls, y, cls_dev, y_dev, l2),
                             mean=probe_accuracy(mean, y, mean_dev, y_dev, l2)))  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps({"setting": s.name, "l2_grid": L2_GRID, "rows": rows}, indent=1) + "\n")
    print("| task | [CLS] probe, best dev % | mean-pooled probe, best dev % |\n|---|---|---|")
    for task in args.tasks:
        mine = [r for r in rows if r["task"] == task]
        print(f"| {task} | {max(r['cls'] for r in mine):.1f} | {max(r['mean'] for r in mine):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
