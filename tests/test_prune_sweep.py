"""``benchmarks/accuracy/prune_sweep.py``: tolerance selection and the save / reload loop, on a tiny random BERT."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from peft import get_peft_model

import bitfit_peft

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.accuracy import prune_sweep as PS  # noqa: E402


def test_tolerances_drop_the_requested_share() -> None:
    torch.manual_seed(0)
    means = (10 ** torch.empty(50).uniform_(-5, -1)).tolist()
    fractions = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
    pairs = PS.tolerances_for_fractions(means, fractions)
    assert [f for f, _ in pairs] == list(fractions)
    assert [PS.n_dropped(means, t) for _, t in pairs] == [0, 5, 13, 25, 38, 45, 50]
    assert pairs[0][1] == 0.0
    tols = [t for _, t in pairs]
    assert tols == sorted(tols)
    for _, t in pairs[1:-1]:  # short, readable numbers (1-3 significant digits) when the gaps allow it
        assert t == float(f"{t:.3g}")


def test_tolerances_ties_nan_and_fp32_rounding() -> None:
    # a tie at the boundary cannot be split: fewer vectors are dropped, never more
    means = [0.1, 0.2, 0.2, 0.2, 0.3]
    ((_, tol),) = PS.tolerances_for_fractions(means, [0.5])
    assert PS.n_dropped(means, tol) == 1
    # NaN means are ignored when choosing and never dropped (the save keeps non-finite vectors)
    means = [math.nan, 1e-3, 2e-3, 3e-3, 4e-3]
    ((_, tol),) = PS.tolerances_for_fractions(means, [0.5])
    assert PS.n_dropped(means, tol) == 2
    # adjacent fp32 values: the save compares in fp32, so a float64 midpoint would round onto one of them
    lo, hi = 0.23914891481399536, 0.23914892971515656  # adjacent fp32 values; 0.23914892 lies between them
    assert float(torch.tensor(0.23914892, dtype=torch.float32)) == lo  # ... but rounds onto lo in fp32
    ((_, tol),) = PS.tolerances_for_fractions([lo, hi], [0.5])
    assert PS.n_dropped([lo, hi], tol) == 1
    assert int((torch.tensor([lo, hi], dtype=torch.float32) < tol).sum()) == 1  # the save's own comparison
    # the shortest number strictly above lo and at most hi
    assert PS._shortest_in(0.0123, 0.0456) == 0.03
    assert PS._shortest_in(0.2, 0.21) == 0.21
    assert PS._shortest_in(0.3, 0.3) == 0.3
    with pytest.raises(ValueError):
        PS.tolerances_for_fractions([1.0], [1.5])


def test_sweep_saves_prunes_and_reloads(tmp_path: Path) -> None:
    def fresh() -> torch.nn.Module:
        return make_tiny_model("bert", task="seq_cls", num_labels=3)

    model = get_peft_model(fresh(), bitfit_peft.BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    deltas = [p for n, p in model.named_parameters() if ".bitfit_delta." in n]
    with torch.no_grad():
        for i, p in enumerate(deltas):  # spread the vector magnitudes over four decades
            p.mul_(10.0 ** -(i % 4))
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)  # head must come from file
    model.eval()
    x = torch.randint(1, 100, (6, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    logits: list[torch.Tensor] = []

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        with torch.no_grad():
            out = m(input_ids=x).logits
        logits.append(out)
        return {"test": float((out.argmax(-1) == ref.argmax(-1)).float().mean())}

    trained = PS.delta_vectors(model)
    n = len(trained)
    assert n == len(deltas) == 2 * 8 + 2  # 8 biases per block + embeddings LayerNorm + pooler
    tolerances, points = PS.sweep(model, fresh, evaluate, tmp_path, fractions=(0.0, 0.5, 0.9), log=lambda _: None)
    assert [p.save_dtype for p in points] == ["float32"] * 3 + ["bfloat16"] * 3 + ["float16"] * 3
    assert model.peft_config["default"].save_dtype == "float32"  # the config is restored after each save
    assert model.peft_config["default"].prune_tolerance is None
    means = PS.mean_abs(trained)
    for p, out in zip(points, logits, strict=True):
        assert p.vectors_kept == p.vectors_kept_expected == n - math.floor(p.target_fraction * n + 0.5)
        dropped = {k for k, m in means.items() if m < p.prune_tolerance}
        assert len(dropped) == n - p.vectors_kept
        assert p.max_err_all == pytest.approx(max([trained[k].abs().max().item() for k in dropped] + [p.max_err_kept]))
        if p.save_dtype == "float32":
            assert p.max_err_kept == 0.0
            expected = copy.deepcopy(model)  # the trained model with the pruned vectors zeroed
            with torch.no_grad():
                for name, param in expected.named_parameters():
                    if any(name.startswith(f"base_model.model.{k}.bitfit_delta.") for k in dropped):
                        param.zero_()
                torch.testing.assert_close(out, expected(input_ids=x).logits, rtol=0, atol=1e-6)
            if not dropped:
                assert torch.equal(out, ref)
        else:
            scale = max(t.abs().max().item() for t in trained.values())
            assert 0 < p.max_err_kept <= scale * 2**-8
    by = {(p.save_dtype, p.target_fraction): p for p in points}
    for f in (0.0, 0.5, 0.9):
        half = [by["bfloat16", f].file_bytes, by["float16", f].file_bytes]
        assert abs(half[0] - half[1]) <= 16 and max(half) < by["float32", f].file_bytes  # header: "BF16" vs "F16"
    for dtype in PS.SAVE_DTYPES:
        sizes = [by[dtype, f].file_bytes for f in (0.0, 0.5, 0.9)]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3
        mass = [by[dtype, f].abs_mass_dropped for f in (0.0, 0.5, 0.9)]
        assert mass[0] == 0 and 0 < mass[1] < 0.05 < mass[2] < 1  # the smaller half holds little of the change
    table = PS.markdown_table(points)
    assert table.count("\n") == 2 + len(points) - 1
    assert f"| float32 | 0% | 0 | {n}/{n} | 0.0% |" in table
