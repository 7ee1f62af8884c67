"""The accuracy suite's selection protocol: grids widened until dev picks an inside value, recipe overrides per
method, and seeds matched to the selected schedule (no training: ``Runner.one`` is replaced by a dev table)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.accuracy import report  # noqa: E402
from benchmarks.accuracy.run import SETTINGS, Runner, RunResult, recipe_schedule, widen  # noqa: E402
from benchmarks.accuracy.settings import CLS_METHOD, FULL_FT_PROTOCOL  # noqa: E402

ORIGINAL = [5e-5, 1.5e-4, 3e-4]


@pytest.mark.parametrize(
    ("grid", "best", "expected"),
    [
        (ORIGINAL, 1.5e-4, ORIGINAL),  # inside: unchanged
        (ORIGINAL, 3e-4, [*ORIGINAL, 6e-4]),  # top: x2
        (ORIGINAL, 5e-5, [1.67e-5, *ORIGINAL]),  # bottom: /3
        ([*ORIGINAL, 6e-4], 6e-4, [*ORIGINAL, 6e-4, 1.2e-3]),
        ([*ORIGINAL, 6e-4, 1.2e-3], 1.2e-3, [*ORIGINAL, 6e-4, 1.2e-3]),  # two additions per side at most
        ([1e-2], 1e-2, [1e-2]),  # a single value is the recipe, never widened
    ],
)
def test_widen(grid: list[float], best: float, expected: list[float]) -> None:
    assert widen(grid, best, ORIGINAL) == pytest.approx(expected)


class TableRunner(Runner):
    """A Runner whose runs come from a {lr: dev accuracy} table; records what was run."""

    def __init__(self, dev: dict[float, float], **setting: Any) -> None:
        super().__init__(replace(SETTINGS["reduced"], **setting), device=None, log_path=Path("/dev/null"))  # type: ignore[arg-type]
        self.dev, self.calls = dev, []

    def one(self, name, method, lr, seed, size, phase, with_test, sched=None):  # type: ignore[override]
        self.calls.append((lr, seed, phase))
        steps = self.schedule(method, 400, name).steps
        r = RunResult(name, method, lr, seed, 400, steps, self.dev[lr], 0.5 if with_test else None, 1, 1, 1.0,
                      phase, size, schedule={"steps": steps})  # fmt: skip
        return r, object()

    def evaluate(self, model, name, part):  # type: ignore[override]
        return 0.5

    def log(self, r: RunResult) -> None:
        self.results.append(r)


def test_grid_is_widened_until_dev_picks_an_inside_value() -> None:
    dev = {1.67e-5: 0.1, 5e-5: 0.2, 1.5e-4: 0.5, 3e-4: 0.7, 6e-4: 0.8, 1.2e-3: 0.6}
    runner = TableRunner(dev, grid_override={"full": tuple(ORIGINAL)})
    assert runner.select_and_seed("trec", "full", 400, "main", seeds=2) == 6e-4
    assert [lr for lr, seed, _ in runner.calls if seed == 0] == [*ORIGINAL, 6e-4, 1.2e-3]  # each LR once
    assert (6e-4, 1, "seed") in runner.calls  # the remaining seed at the selected LR


def test_no_widening_without_extend_grid() -> None:
    runner = TableRunner({5e-5: 0.2, 1.5e-4: 0.5, 3e-4: 0.7}, extend_grid=False,
                         grid_override={"full": tuple(ORIGINAL)})  # fmt: skip
    assert runner.select_and_seed("trec", "full", 400, "main", seeds=1) == 3e-4
    assert [lr for lr, _, _ in runner.calls] == ORIGINAL


@pytest.mark.parametrize("setting", ["reduced", "gpu_recipe"])
def test_full_ft_trains_with_its_protocol_and_bitfit_with_the_recipe(setting: str) -> None:
    from bitfit_peft.training.recipe import RECIPE

    s = SETTINGS[setting]
    runner = Runner(s, device=None, log_path=Path("/dev/null"))  # type: ignore[arg-type]
    full, bitfit = runner.schedule("full", 400, "trec"), runner.schedule("bitfit", 400, "trec")
    per_epoch = 400 // s.batch_size + (400 % s.batch_size > 0)
    assert set(s.methods) <= set(s.recipe_methods)  # no method falls back to the legacy 50-step protocol
    assert asdict(full) == asdict(recipe_schedule(400, s, recipe=FULL_FT_PROTOCOL))
    assert full.head_lr_factor == 1.0 and full.steps == 8 * per_epoch and full.patience == 3
    assert bitfit.head_lr_factor == RECIPE.head_lr_factor and bitfit.steps == RECIPE.num_epochs * per_epoch
    assert full.eval_every == bitfit.eval_every == per_epoch  # both evaluate on dev each epoch
    assert full.restore_best and bitfit.restore_best == RECIPE.restore_best_epoch  # each keeps what its recipe keeps
    cls = runner.schedule("bitfit_cls", 400, "trec")  # the recipe plus the uniform [CLS] init, nothing else
    assert cls.cls_init and not bitfit.cls_init and asdict(cls) == {**asdict(bitfit), "cls_init": True}


def test_seed_runs_must_match_the_selected_schedule() -> None:
    """A seed run at the selected LR but another planned length (e.g. an older file) is not averaged in."""
    sel = dict(task="t", method="full", lr=1e-4, size=400, phase="selected", test_acc=0.8, dev_acc=0.8,
               schedule={"steps": 200})  # fmt: skip
    same = {**sel, "phase": "seed", "test_acc": 0.7}
    other = {**same, "schedule": {"steps": 50}, "test_acc": 0.1}
    cells = report._seeded([sel, same, other], "")
    assert [r["test_acc"] for r in cells[("t", "full", 400)]] == [0.8, 0.7]


def test_product_train_splits_keep_the_suites_class_ids(tmp_path: Path) -> None:
    """The JSONL files product_train hands to ``train()`` map every label back to the suite's class id."""
    from benchmarks.accuracy.data import Split
    from benchmarks.accuracy.product_train import write_split

    from bitfit_peft.training.data import load_task_data

    labels = [i % 12 for i in range(36)]  # 12 classes: "10" and "11" sort after "2" as numbers, not text
    split = Split([f"text {i} é" for i in range(36)], labels)
    train_file, dev_file = write_split(split, tmp_path / "train.jsonl"), write_split(split, tmp_path / "dev.jsonl")
    data = load_task_data(train_file, dev_source=dev_file)
    assert data.label_names == [str(i) for i in range(12)]
    by_text = {ex["text"]: ex["label"] for ex in data.train}
    assert by_text == dict(zip(split.texts, labels, strict=True))


def test_product_train_table_reports_auto_picks_and_wall_ratio() -> None:
    from benchmarks.accuracy.product_train import markdown

    records = [
        dict(task="trec", mode="full", seed=0, lr=1.5e-4, test_acc=0.9, train_seconds=100.0, search_seconds=0.0),
        dict(task="trec", mode="default", seed=0, lr=1e-2, test_acc=0.88, train_seconds=110.0, search_seconds=0.0),
        dict(task="trec", mode="default", seed=1, lr=1e-2, test_acc=0.86, train_seconds=130.0, search_seconds=0.0),
        dict(task="trec", mode="auto", seed=0, lr=3e-3, test_acc=0.80, train_seconds=100.0, search_seconds=50.0),
        dict(task="trec", mode="cls", seed=0, lr=1e-2, test_acc=0.89, train_seconds=105.0, search_seconds=0.0),
    ]
    row = markdown(records).splitlines()[-1]
    want = ("| trec | 90.0 ± 0.0 (1) | 87.0 ± 1.4 (2) | 80.0 ± 0.0 (1) | 89.0 ± 0.0 (1) | – | – | – | 0.003 "
            "| 1.20x, 1.50x, 1.05x, –, – |")
    assert row == want
    assert markdown(records[:-1]).splitlines()[-1].endswith("| – | – | – | – | 0.003 | 1.20x, 1.50x, –, –, – |")


def test_product_train_gap_to_full_ft_pairs_seeds() -> None:
    """The defaults − full FT column: per seed both ran (unpaired seeds left out), mean ± standard error."""
    from benchmarks.accuracy.product_train import markdown

    def rec(mode: str, seed: int, test: float) -> dict[str, Any]:
        return dict(task="sms", mode=mode, seed=seed, lr=1e-2, test_acc=test, train_seconds=100.0, search_seconds=0)

    full = [rec("full", 0, 0.90), rec("full", 1, 0.80), rec("full", 2, 0.85)]
    defaults = [rec("defaults", 0, 0.91), rec("defaults", 1, 0.83), rec("defaults", 5, 0.10)]
    cells = markdown(full + defaults).splitlines()[-1].split(" | ")
    assert cells[7] == "+2.0 ± 1.0 (2)"  # (+1, +3): mean 2, sd 1.41, s.e. 1.0; seed 5 has no full FT twin


def test_product_train_reference_is_every_full_ft_seed_at_the_selected_lr(tmp_path: Path) -> None:
    """``--reference``: the suite's selected full FT run, its seeds and ``more_seeds.py``'s at that LR (once per
    seed, other LRs and the sweep left out); the wall ratio still divides by seed 0's training time."""
    from benchmarks.accuracy.more_seeds import PHASE
    from benchmarks.accuracy.product_train import markdown, suite_references

    def run(phase: str, seed: int, lr: float, test: float | None, secs: float = 100.0) -> dict[str, Any]:
        return dict(task="trec", method="full", phase=phase, seed=seed, lr=lr, dev_acc=0.9, test_acc=test,
                    train_seconds=secs, seconds=secs + 5)  # fmt: skip

    suite, extra = tmp_path / "runs_reduced_full_ft.jsonl", tmp_path / "extra.jsonl"
    suite.write_text("\n".join(json.dumps(r) for r in [
        run("grid", 0, 5e-5, None), run("grid", 0, 1.5e-4, None), run("selected", 0, 1.5e-4, 0.90),
        run("seed", 1, 1.5e-4, 0.80, 300.0), run("sweep_seed", 1, 1.5e-4, 0.10)]))  # fmt: skip
    extra.write_text("\n".join(json.dumps(r) for r in [run(PHASE, 2, 1.5e-4, 0.70, 200.0), run(PHASE, 3, 5e-5, 0.0)]))
    refs = suite_references([suite, extra, extra], {"trec"})
    assert sorted((r["seed"], r["test_acc"]) for r in refs) == [(0, 0.9), (1, 0.8), (2, 0.7)]
    bitfit = dict(task="trec", mode="default", seed=0, lr=1e-2, test_acc=0.88, train_seconds=120.0, search_seconds=0)
    row = markdown([*reversed(refs), bitfit]).splitlines()[-1]  # seed 0 not first
    assert row.startswith("| trec | 80.0 ± 10.0 (3) | 88.0 ± 0.0 (1) |") and row.endswith("| 1.20x, –, –, –, – |")


def test_product_train_dev_table_pairs_seeds_for_the_cls_init_gain() -> None:
    from benchmarks.accuracy.product_train import dev_table

    def rec(mode: str, seed: int, dev: float) -> dict[str, Any]:
        return dict(task="movie", mode=mode, seed=seed, dev_acc=dev)

    records = [rec("full", 0, 0.815), rec("default", 0, 0.80), rec("default", 1, 0.70), rec("default", 2, 0.90),
               rec("cls", 0, 0.83), rec("cls", 1, 0.80)]  # fmt: skip
    *_, row, mean = dev_table(records).splitlines()  # the gain uses seeds 0 and 1 only (seed 2 has no cls-init run)
    assert row == "| movie | 81.5 ± 0.0 (1) | 80.0 ± 10.0 (3) | – | 81.5 ± 2.1 (2) | – | – | +6.50 ± 4.95 (2) | – | – |"
    assert mean == "| mean | | | | | | | +6.50 (1 task) | | – |"


@pytest.mark.parametrize("on", [True, False])
def test_product_train_dev_table_reads_the_cls_init_auto_decision(on: bool) -> None:
    """``--cls-init auto``'s gain is on − off where it decided on and 0 where off; its runs must equal that mode's."""
    from benchmarks.accuracy.product_train import dev_table

    probe = {"first_token": 44.0, "mean_pooled": 75.0}
    twin = 0.83 if on else 0.80

    def rec(mode: str, seed: int, dev: float, **kw: Any) -> dict[str, Any]:
        return dict(task="trec", mode=mode, seed=seed, dev_acc=dev, **kw)

    records = [rec("default", 0, 0.80), rec("default", 1, 0.70), rec("default", 2, 0.75), rec("cls", 0, 0.83),
               rec("cls", 1, 0.80), rec("cls_auto", 0, twin, cls_init_enabled=on, cls_probe=probe)]  # fmt: skip
    *_, row, mean = dev_table(records).splitlines()
    gain = "+6.50 ± 4.95 (2)" if on else "+0.00 ± 0.00 (3)"  # off: auto is off on every seed off ran
    assert row.endswith(f"| +6.50 ± 4.95 (2) | 44.0 / 75.0, {'on' if on else 'off'} | {gain} |")
    assert mean.endswith(f"| +6.50 (1 task) | | {'+6.50' if on else '+0.00'} (1 task) |")
    records[-1]["dev_acc"] = 0.5  # an auto run that does not match the mode it picked
    with pytest.raises(ValueError, match="differs from the"):
        dev_table(records)


def _tiny_suite_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the suite's model loader at a tiny random BERT (with a pooler) saved under ``tmp_path``."""
    from benchmarks.accuracy import loop
    from conftest import make_tiny_model

    make_tiny_model("bert", task="base").save_pretrained(tmp_path / "base")
    monkeypatch.setenv("BITFIT_ACC_MODEL", str(tmp_path / "base"))
    monkeypatch.setattr(loop, "_BASE_STATE", {})
    monkeypatch.setattr(loop, "_TEMPLATES", {})


def _toy_split(n: int = 16) -> Any:
    from benchmarks.accuracy.loop import Encoded

    enc = Encoded.__new__(Encoded)
    enc.ids = [[2, 5 + i % 7, 6 + i % 3, 3] for i in range(n)]
    enc.labels, enc.pad_id = [i % 2 for i in range(n)], 0
    return enc


def test_search_knobs_dropout_and_pooler_weight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Schedule.dropout`` sets every dropout rate; ``Schedule.pooler_lr`` trains the pooler weight, nothing else."""
    import torch
    from benchmarks.accuracy.loop import Schedule, build_model, train

    _tiny_suite_model(tmp_path, monkeypatch)
    s = SETTINGS["smoke"]
    before = build_model("bitfit", 2, 0).state_dict()
    sched = Schedule(steps=3, head_lr_factor=10.0, scheduler="linear", dropout=0.0, pooler_lr=1e-2)
    model, steps, _, _ = train("bitfit", 1e-2, 0, _toy_split(), 2, s, torch.device("cpu"), sched)
    assert steps == 3
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.endswith("pooler.dense.base_layer.weight") or k.endswith("pooler.dense.weight") for k in changed)
    frozen = [k for k in changed if k.endswith("weight") and ".pooler." not in k and "classifier" not in k]
    assert frozen == [], frozen
    plain, _, _, _ = train("bitfit", 1e-2, 0, _toy_split(), 2, s, torch.device("cpu"), replace(sched, pooler_lr=None))
    assert not any(".pooler." in k and k.endswith("weight") and not torch.equal(v, before[k])
                   for k, v in plain.state_dict().items())  # fmt: skip


def test_suite_loop_keeps_the_last_step_unless_the_schedule_restores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``restore_best=False`` ends with the last step's weights (as if dev were never evaluated); True, or early
    stopping, restores the best evaluation."""
    import torch
    from benchmarks.accuracy.loop import Schedule, accuracy, train

    _tiny_suite_model(tmp_path, monkeypatch)
    s, cpu, data = SETTINGS["smoke"], torch.device("cpu"), _toy_split()
    data.ids = [[2, 5 + 4 * label + i % 3, 3] for i, label in enumerate(data.labels)]  # the label is in the text
    base = Schedule(steps=12, scheduler="linear", eval_every=1)  # full FT: the tiny model learns this in a few steps

    def trained(sched: Schedule) -> tuple[dict[str, torch.Tensor], list[float], float]:
        model, _, _, curve = train("full", 3e-3, 0, data, 2, s, cpu, sched, data)
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return weights, curve, accuracy(model, data, cpu, 8)

    unseen, _, _ = trained(replace(base, eval_every=None))
    last, curve, _ = trained(replace(base, restore_best=False))
    best, _, best_acc = trained(base)
    assert all(torch.equal(last[n], unseen[n]) for n in unseen)
    assert best_acc == max(curve) and len(set(curve)) > 1
    assert any(not torch.equal(best[n], last[n]) for n in last) == (curve.index(max(curve)) != len(curve) - 1)


def test_search_knobs_ema_and_cls_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Schedule.ema`` evaluates the average each epoch; ``cls_init`` runs the product's init; ``bitfit_cls``
    refuses a schedule without it."""
    import torch
    from benchmarks.accuracy.loop import Schedule, train

    _tiny_suite_model(tmp_path, monkeypatch)
    s, cpu = SETTINGS["smoke"], torch.device("cpu")
    sched = Schedule(steps=3, head_lr_factor=10.0, scheduler="linear", eval_every=1, ema=0.9, cls_init=True)
    model, steps, _, curve = train(CLS_METHOD, 1e-2, 0, _toy_split(), 2, s, cpu, sched, _toy_split())
    assert steps == 3 and len(curve) == 3
    query = model.get_base_model().bert.encoder.layer[-1].attention.self.query
    assert query.delta_of("default").abs().max() > 0
    with pytest.raises(ValueError, match="bitfit_cls needs a schedule with cls_init=True"):
        train(CLS_METHOD, 1e-2, 0, _toy_split(), 2, s, cpu, replace(sched, cls_init=False))


def test_suite_defaults_row_takes_the_method_the_probe_picks() -> None:
    """The "defaults" row is ``bitfit_cls`` where the recorded probe turns the init on (trec) and ``bitfit`` where
    it keeps it off (sms), with the same rule as ``train(cls_attention_init="auto")``."""
    from benchmarks.accuracy.run import SETTINGS
    from benchmarks.accuracy.settings import AUTO_METHOD, CLS_METHOD

    s = SETTINGS["reduced"]
    main = {(t, 400): on for t, on in [("trec", True), ("sms", False), ("movie", True), ("bbc", False)]}
    sweep = {(t, n): True for t in ("trec", "movie") for n in (100, 200)}  # the sweep's sizes: on for both tasks
    assert report.auto_decisions(s) == main | sweep

    def rec(task: str, method: str, test: float, phase: str = "selected") -> dict[str, Any]:
        return dict(task=task, method=method, lr=1e-2, size=400, phase=phase, test_acc=test, dev_acc=0.9,
                    schedule={"steps": 400}, trainable=10, total=100)  # fmt: skip

    results = [rec(t, m, acc) for t, m, acc in [("trec", "full", 0.9), ("trec", "bitfit", 0.8),
               ("trec", CLS_METHOD, 0.85), ("sms", "full", 0.99), ("sms", "bitfit", 0.98), ("sms", CLS_METHOD, 0.5)]]
    cells = report.main_table(results, s)
    assert cells[("trec", AUTO_METHOD)] == cells[("trec", CLS_METHOD)]
    assert cells[("sms", AUTO_METHOD)] == cells[("sms", "bitfit")]
    table = report.markdown_main(results, s)
    assert "| BitFit, defaults (--cls-init auto) − Full FT | -5.0 | -1.0 | -3.0 |" in table
    rows = report.markdown_before_after(results, results, s).splitlines()
    assert rows[0].endswith("| BitFit defaults after | gap |") and rows[1].count("---") == 9
    assert rows[2] == "| trec | 90.0 ± 0.0 | 80.0 ± 0.0 | -10.0 | 90.0 ± 0.0 | 80.0 ± 0.0 | -10.0 | 85.0 ± 0.0 | -5.0 |"


def test_epoch_selection_rules_and_cross_selection() -> None:
    """Each rule picks the epoch it names; cross-selection scores a pick on the dev half it did not see."""
    from benchmarks.accuracy import epoch_selection as es

    def epoch(correct: list[int], loss: float) -> dict[str, list[float]]:
        return {"correct": correct, "loss": [loss] * len(correct)}

    # 4 dev examples (even rows 0, 2; odd rows 1, 3), 4 epochs
    dev = [epoch([1, 0, 0, 0], 0.5), epoch([1, 1, 1, 0], 0.9), epoch([1, 0, 1, 1], 0.4), epoch([0, 1, 1, 1], 0.7)]
    every = range(4)
    picks = {name: rule(dev, every) for name, rule in es.RULES.items()}
    assert picks == {"first best": 1, "last best": 3, "best, loss ties": 2, "last epoch": 3, "lowest loss": 2}
    # first best: on even rows epochs 1 and 2 tie (2/2) -> 1, scored on odd rows 50 %; on odd rows epoch 3 (2/2)
    # -> scored on even rows 50 %
    assert es.cross_selected(es.first_best, dev) == 50.0
    assert es.cross_selected(es.last_epoch, dev) == 75.0  # epoch 3: odd rows 100 %, even rows 50 %
    records = [dict(task="trec", seed=s, per_epoch={"dev": dev, "test": [[1, 0], [1, 1], [0, 0], [1, 0]]})
               for s in (0, 1)]  # fmt: skip
    res = es.analyse(records)
    assert res["trec"]["last epoch"]["test"] == [50.0, 50.0] and res["trec"]["first best"]["epoch"] == [2, 2]
    table = es.markdown(records)
    assert "| trec | 2 | 50.00 | " in table and "| mean | | | " in table


def test_suite_sweep_has_a_defaults_row_picked_by_the_probe_at_each_size() -> None:
    """The sweep's "defaults" rows take ``bitfit_cls`` or ``bitfit`` at each training-set size as the probe
    recorded at that size decides (on for trec at 100 / 200 / 400), and get their own gap row to full FT."""
    from benchmarks.accuracy.run import SETTINGS
    from benchmarks.accuracy.settings import CLS_METHOD

    s = SETTINGS["reduced"]

    def rec(method: str, n: int, seed: int, test: float) -> dict[str, Any]:
        phase = ("selected" if seed == 0 else "seed") if n == 400 else "sweep_seed"
        return dict(task="trec", method=method, lr=1e-2, size=n, n_train=n, seed=seed, phase=phase, test_acc=test,
                    dev_acc=0.9, schedule={"steps": n}, trainable=10, total=100)  # fmt: skip

    accs = {"full": 0.80, "bitfit": 0.70, CLS_METHOD: 0.78}
    results = [rec(m, n, seed, acc + n / 10_000) for m, acc in accs.items() for n in (100, 200, 400) for seed in (0, 1)]
    rows = {line.split(" | ")[1]: line for line in report.markdown_sweep(results, s).splitlines() if "trec" in line}
    assert rows["BitFit, defaults (--cls-init auto)"].endswith("| 79.0 ± 0.0 | 80.0 ± 0.0 | 82.0 ± 0.0 |")
    assert rows["BitFit, defaults (--cls-init auto) − Full FT"].endswith("| -2.0 | -2.0 | -2.0 |")
    assert rows["BitFit (all biases) − Full FT"].endswith("| -10.0 | -10.0 | -10.0 |")
