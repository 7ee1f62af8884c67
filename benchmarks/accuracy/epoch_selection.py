"""Which epoch should ``train()`` keep? Best-epoch selection rules compared on dev, from per-epoch records.

``product_train.py --modes defaults --per-epoch`` records, for every dev evaluation (one per epoch) of a
``train()`` run, each dev example's correctness and loss and each test example's correctness. The training run
does not depend on which epoch is kept, so every rule below can be read off the same runs:

- ``first best``: the first epoch with the highest dev accuracy (``load_best_model_at_end``, the recipe before
  round 6 of the dev search);
- ``last best``: the last epoch with the highest dev accuracy;
- ``best, loss ties``: the highest dev accuracy, ties broken by the lowest dev loss;
- ``last epoch``: no selection (today's default, ``restore_best_epoch=False``);
- ``lowest loss``: the epoch with the lowest dev loss.

A rule's dev figure is **2-fold cross-selection**: dev is split by position (even / odd in the length-sorted
order), the rule picks an epoch on one half and is scored on the other, both ways, averaged. A rule scored on the
dev set it selected on would always look best; this way each is scored on examples it did not see. Selecting on
half of dev is noisier than on all of it, so the estimate is a little pessimistic for the selecting rules. Test
accuracy at the epoch each rule picks on the whole dev set is reported beside it and decides nothing.

Example:
    $ python -m benchmarks.accuracy.epoch_selection --doc benchmarks/accuracy/LOG.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.accuracy.product_train import PER_EPOCH_RESULTS  # noqa: E402
from benchmarks.accuracy.report import publish  # noqa: E402

Curve = list[dict[str, list[float]]]  #: per epoch: {"correct": [0/1 per dev example], "loss": [...]}


def _acc(correct: Sequence[float], rows: Sequence[int]) -> float:
    return 100 * sum(correct[i] for i in rows) / len(rows)


def _loss(loss: Sequence[float], rows: Sequence[int]) -> float:
    return statistics.fmean(loss[i] for i in rows)


def _accs(dev: Curve, rows: Sequence[int]) -> list[float]:
    return [_acc(e["correct"], rows) for e in dev]


def first_best(dev: Curve, rows: Sequence[int]) -> int:
    accs = _accs(dev, rows)
    return accs.index(max(accs))


def last_best(dev: Curve, rows: Sequence[int]) -> int:
    accs = _accs(dev, rows)
    return max(e for e, a in enumerate(accs) if a == max(accs))


def best_loss_ties(dev: Curve, rows: Sequence[int]) -> int:
    accs = _accs(dev, rows)
    return min((e for e, a in enumerate(accs) if a == max(accs)), key=lambda e: _loss(dev[e]["loss"], rows))


def last_epoch(dev: Curve, rows: Sequence[int]) -> int:
    return len(dev) - 1


def lowest_loss(dev: Curve, rows: Sequence[int]) -> int:
    losses = [_loss(e["loss"], rows) for e in dev]
    return losses.index(min(losses))


#: rule name -> (dev curve, dev rows it may look at) -> chosen epoch index; the first is the reference
RULES: dict[str, Callable[[Curve, Sequence[int]], int]] = {
    "first best": first_best, "last best": last_best, "best, loss ties": best_loss_ties,
    "last epoch": last_epoch, "lowest loss": lowest_loss,
}  # fmt: skip


def cross_selected(rule: Callable[[Curve, Sequence[int]], int], dev: Curve) -> float:
    """2-fold cross-selection dev accuracy (%) of ``rule`` on one run's per-epoch dev curve."""
    n = len(dev[0]["correct"])
    even, odd = list(range(0, n, 2)), list(range(1, n, 2))
    return statistics.fmean(_acc(dev[rule(dev, a)]["correct"], b) for a, b in ((even, odd), (odd, even)))


def analyse(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """task -> rule -> {"cross_dev": [per seed], "test": [per seed], "epoch": [per seed, 1-based]}."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        dev, test = r["per_epoch"]["dev"], r["per_epoch"]["test"]
        every = list(range(len(dev[0]["correct"])))
        for name, rule in RULES.items():
            cell = out.setdefault(r["task"], {}).setdefault(name, {"cross_dev": [], "test": [], "epoch": []})
            cell["cross_dev"].append(cross_selected(rule, dev))
            chosen = rule(dev, every)
            cell["test"].append(100 * statistics.fmean(test[chosen]))
            cell["epoch"].append(chosen + 1)
    return out


def markdown(records: list[dict[str, Any]]) -> str:
    """Two tables: cross-selected dev accuracy (gain over ``first best``) and test at each rule's pick."""
    res = analyse(records)
    names = list(RULES)
    head = "| task | seeds | " + " | ".join(f"`{n}`" for n in names) + " |\n" + "|---" * (len(names) + 2) + "|"
    dev_rows, test_rows, gains = [], [], {n: [] for n in names[1:]}
    for task, by_rule in res.items():
        ref = statistics.fmean(by_rule[names[0]]["cross_dev"])
        cells = [f"{ref:.2f}"]
        for n in names[1:]:
            g = statistics.fmean(by_rule[n]["cross_dev"]) - ref
            gains[n].append(g)
            cells.append(f"{g:+.2f}")
        seeds = len(by_rule[names[0]]["cross_dev"])
        dev_rows.append(f"| {task} | {seeds} | {' | '.join(cells)} |")
        test_cells = [f"{statistics.fmean(by_rule[n]['test']):.1f} (ep. {statistics.fmean(by_rule[n]['epoch']):.1f})"
                      for n in names]  # fmt: skip
        test_rows.append(f"| {task} | {seeds} | {' | '.join(test_cells)} |")
    mean = " | ".join(f"{statistics.fmean(v):+.2f}" for v in gains.values())
    dev_rows.append(f"| mean | | | {mean} |")
    return (
        "Dev accuracy (%) under 2-fold cross-selection; `first best` as measured, the other rules as the gain over "
        f"it (mean over seeds):\n\n{head}\n" + "\n".join(dev_rows)
        + "\n\nTest accuracy (%) at the epoch each rule picks on the whole dev set (mean over seeds; mean epoch "
        f"picked, of 16). Decides nothing:\n\n{head}\n" + "\n".join(test_rows)
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=PER_EPOCH_RESULTS, help="product_train records with per_epoch")
    p.add_argument("--seeds", nargs="*", type=int, default=None, help="only these seeds (default: all)")
    p.add_argument("--doc", type=Path, default=None, help="also write the tables into this page (the research log)")
    args = p.parse_args(argv)
    records = [json.loads(x) for x in args.results.read_text().splitlines()]
    records = [r for r in records if "per_epoch" in r and (args.seeds is None or r["seed"] in args.seeds)]
    if not records:
        raise SystemExit(f"no per-epoch records in {args.results}; run product_train.py --modes defaults --per-epoch")
    publish(markdown(records), args.doc, "epoch_selection")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
