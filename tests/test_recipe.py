"""The default recipe: what the API and CLI use, ``--lr auto`` and early stopping on dev (tiny models)."""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from bitfit_peft.cli import app
from bitfit_peft.errors import BitFitError
from bitfit_peft.training import AUTO_LR_GRID, DEMO_DEFAULTS, RECIPE, OptionError, TrainArgs, train
from bitfit_peft.training.lr_finder import check_grid, find_learning_rate, probe_steps_for
from bitfit_peft.training.train import SUMMARY_FILE

FAST = dict(batch_size=8, max_length=24, quiet=True, seed=0, eval_before=False)
runner = CliRunner()


@pytest.fixture
def spam_csv(tmp_path: Path) -> Path:
    rng = random.Random(0)
    words = ["hi", "see", "you", "at", "home", "ok", "call", "me", "later", "lunch"]
    path = tmp_path / "spam.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(60):
            spam = i % 3 == 0
            w.writerow([("win free cash now " if spam else "") + " ".join(rng.choices(words, k=5)), int(spam)])
    return path


def _optimisation(out: Path) -> dict:
    return json.loads((out / SUMMARY_FILE).read_text())["optimisation"]


# ----------------------------------------------------------------------------------------------------- defaults


def test_train_args_run_the_recipe() -> None:
    """TrainArgs' defaults are the recipe's values (no copy to keep in step), resolved as the recipe says."""
    a = TrainArgs(data="x.csv")
    assert (a.learning_rate, a.num_epochs, a.warmup_ratio) == (RECIPE.learning_rate, RECIPE.num_epochs,
                                                               RECIPE.warmup_ratio)  # fmt: skip
    assert a.lr_scheduler_type == RECIPE.lr_scheduler_type and a.cls_attention_init == RECIPE.cls_attention_init
    assert a.early_stopping_patience == RECIPE.early_stopping_patience and a.head_learning_rate is None
    assert a.head_lr_factor == RECIPE.head_lr_factor and a.keep_best_epoch is RECIPE.restore_best_epoch
    assert TrainArgs(early_stopping_patience=2).keep_best_epoch is True  # early stopping keeps the best epoch
    assert TrainArgs(learning_rate="auto", head_learning_rate=0.3).head_lr_factor == pytest.approx(
        0.3 / RECIPE.learning_rate)  # fmt: skip
    assert RECIPE.learning_rate in AUTO_LR_GRID  # the auto grid brackets the default ...
    assert min(AUTO_LR_GRID) < RECIPE.learning_rate < max(AUTO_LR_GRID)  # ... from both sides


def test_demo_defaults_fill_only_what_is_not_given() -> None:
    demo = TrainArgs.create()
    assert {k: getattr(demo, k) for k in DEMO_DEFAULTS} == DEMO_DEFAULTS
    assert TrainArgs.create(num_epochs=2).num_epochs == 2 and TrainArgs.create(num_epochs=2).max_length == 64
    assert TrainArgs.create(data="x.csv") == TrainArgs(data="x.csv")  # own data: the recipe, no caps
    with pytest.raises(TypeError, match="unknown training option.*'num_epoch'; did you mean 'num_epochs'"):
        TrainArgs.create(num_epoch=3)


def test_cli_runs_the_recipe(tmp_path: Path, tiny_bert_dir: Path, spam_csv: Path) -> None:
    """With no optimisation flags the Trainer gets the recipe's LR, head LR, scheduler, warm-up and patience."""
    out = tmp_path / "o"
    res = runner.invoke(app, ["train", "-m", str(tiny_bert_dir), "-d", str(spam_csv), "-o", str(out),
                              "--epochs", "1", "--batch-size", "8", "--max-length", "24", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    opt = _optimisation(out)
    assert opt["learning_rate"] == RECIPE.learning_rate
    assert opt["head_learning_rate"] == pytest.approx(RECIPE.head_lr_factor * RECIPE.learning_rate)
    assert opt["lr_scheduler_type"] == RECIPE.lr_scheduler_type and opt["warmup_ratio"] == RECIPE.warmup_ratio
    assert opt["early_stopping_patience"] == (RECIPE.early_stopping_patience or None) and opt["num_epochs"] == 1
    assert RECIPE.cls_attention_init == "auto"  # the probe ran and kept the init off on this tiny dev set
    probe = json.loads((out / SUMMARY_FILE).read_text())["result"]["extra"]["cls_probe"]
    assert probe["enable"] is False and probe["num_dev"] < probe["min_dev"] and opt["cls_attention_init"] is False
    assert opt["restore_best_epoch"] is RECIPE.restore_best_epoch is False  # the last epoch is kept
    res = runner.invoke(app, ["train", "-m", str(tiny_bert_dir), "-d", str(spam_csv), "-o", str(out), "--best-epoch",
                              "--overwrite",
                              "--epochs", "1", "--batch-size", "8", "--max-length", "24", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert _optimisation(out)["restore_best_epoch"] is True


def test_cli_says_what_cls_init_auto_decided(tmp_path: Path, tiny_bert_dir: Path, spam_csv: Path) -> None:
    res = runner.invoke(app, ["train", "-m", str(tiny_bert_dir), "-d", str(spam_csv), "-o", str(tmp_path / "o"),
                              "--epochs", "1", "--batch-size", "8", "--max-length", "24"],
                        env={"COLUMNS": "400"})  # fmt: skip
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if "[CLS] init (auto)" in x)
    assert "off: linear probe of the first token" in line and "dev examples (on above a 5-point gap" in line


def test_explicit_values_override_the_recipe(tmp_path: Path, tiny_bert_dir: Path, spam_csv: Path) -> None:
    out = tmp_path / "o"
    train(model=str(tiny_bert_dir), data=spam_csv, output_dir=out, num_epochs=1, learning_rate=2e-3,
          warmup_ratio=0.0, lr_scheduler_type="cosine", early_stopping_patience=0, **FAST)  # fmt: skip
    opt = _optimisation(out)
    assert opt["learning_rate"] == 2e-3 and opt["head_learning_rate"] == pytest.approx(RECIPE.head_lr_factor * 2e-3)
    assert opt["lr_scheduler_type"] == "cosine" and opt["warmup_ratio"] == 0.0
    assert opt["early_stopping_patience"] is None


def test_suite_bitfit_method_uses_the_recipe() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.accuracy.run import SETTINGS, recipe_schedule
    from benchmarks.accuracy.settings import CLS_METHOD

    s = SETTINGS["reduced"]
    sched = recipe_schedule(400, s)
    per_epoch = 400 // s.batch_size
    assert sched.steps == round(RECIPE.num_epochs * per_epoch) and sched.eval_every == per_epoch
    assert sched.head_lr_factor == RECIPE.head_lr_factor and sched.warmup_frac == RECIPE.warmup_ratio
    assert sched.scheduler == RECIPE.lr_scheduler_type and sched.patience == (RECIPE.early_stopping_patience or None)
    assert s.lr_grid["bitfit"] == (RECIPE.learning_rate,)
    # the suite reports --cls-init off (bitfit) and on (bitfit_cls) as rows of their own; auto picks one per task
    assert not sched.cls_init and s.recipe_overrides[CLS_METHOD] == {"cls_init": True}


# ----------------------------------------------------------------------------------------------------- --lr auto


def test_lr_auto_picks_from_grid_deterministically(tmp_path: Path, tiny_bert_dir: Path, spam_csv: Path) -> None:
    grid = (1e-4, 1e-2, 3e-1)
    runs = [
        train(model=str(tiny_bert_dir), data=spam_csv, output_dir=tmp_path / f"r{i}", num_epochs=1,
              learning_rate="auto", auto_lr_grid=grid, **FAST)  # fmt: skip
        for i in range(2)
    ]
    a, b = (r.extra["lr_search"] for r in runs)
    assert a["learning_rate"] in grid and set(a["dev_loss"]) == set(grid)
    assert a["learning_rate"] == min(grid, key=lambda v: a["dev_loss"][v])  # lowest dev loss wins
    assert a == {**b, "seconds": a["seconds"]}  # same seed: same losses, same pick
    assert a["probe_steps"] == probe_steps_for(runs[0].num_train, 8)
    assert _optimisation(tmp_path / "r0")["learning_rate"] == a["learning_rate"]  # the real run used the pick
    assert len({round(v, 6) for v in a["dev_loss"].values()}) == len(grid)  # the probes really differ


def test_lr_auto_that_picks_the_default_trains_exactly_like_it(tmp_path: Path, tiny_bert_dir: Path, spam_csv: Path):
    """The range test leaves the random state alone: picking 1e-2 gives the plain 1e-2 run, bit for bit."""
    kw = dict(num_epochs=1, **FAST)
    auto = train(model=str(tiny_bert_dir), data=spam_csv, output_dir=tmp_path / "a", learning_rate="auto",
                 auto_lr_grid=[1e-2], **kw)  # fmt: skip
    train(model=str(tiny_bert_dir), data=spam_csv, output_dir=tmp_path / "p", learning_rate=1e-2, **kw)
    assert auto.extra["lr_search"]["learning_rate"] == 1e-2
    a, p = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("a", "p"))
    assert a.keys() == p.keys() and all(torch.equal(a[k], p[k]) for k in a)


def test_range_test_restores_the_initial_adapter(tiny_bert_dir: Path, spam_csv: Path, tmp_path: Path) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

    from bitfit_peft import BitFitConfig
    from bitfit_peft.training import BitFitTrainer
    from bitfit_peft.training.data import encode, load_task_data
    from bitfit_peft.training.loading import collator

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    data = load_task_data(spam_csv, seed=0)
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2),
                           BitFitConfig(task_type="SEQ_CLS"))  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(str(tmp_path / "c"), per_device_train_batch_size=8, report_to="none",
                             remove_unused_columns=False, use_cpu=True)  # fmt: skip
    dev = encode(data.dev, tok, "seq-cls", 24)
    trainer = BitFitTrainer(model=model, args=args, train_dataset=encode(data.train, tok, "seq-cls", 24),
                            eval_dataset=dev, data_collator=collator("seq-cls", tok))  # fmt: skip
    found = find_learning_rate(trainer, (1e-3, 1e-1), probe_steps=3, head_lr_factor=3.0, seed=0)
    assert found.learning_rate in (1e-3, 1e-1) and found.probe_steps == 3
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--lr", "fast"], "'--lr': learning_rate must be a positive number or 'auto', got 'fast'"),
        (["--lr", "-1"], "'--lr': learning_rate must be a positive number"),
        (["--lr", "auto", "--auto-lr-grid", "1e-3,x"], "'--auto-lr-grid': auto_lr_grid '1e-3,x' is not a list"),
        (["--lr", "auto", "--auto-lr-grid", "1e-3,-2"], "'--auto-lr-grid': auto learning-rate grid value -2.0"),
        (["--lr", "auto", "--auto-lr-grid", ","], "'--auto-lr-grid': the auto learning-rate grid is empty"),
        (["--lr-scheduler", "zigzag"], "'--lr-scheduler': unknown lr_scheduler_type 'zigzag'; choose one of"),
        (["--warmup-ratio", "1.5"], "'--warmup-ratio': warmup_ratio must be in [0, 1)"),
        (["--epochs", "0"], "'--epochs': num_epochs must be > 0"),
        (["--last-epoch", "--early-stopping-patience", "2"], "'--last-epoch': early stopping keeps the best epoch"),
    ],
)
def test_cli_refuses_bad_optimisation_values(tmp_path: Path, argv: list[str], match: str) -> None:
    res = runner.invoke(app, ["train", "-d", str(tmp_path / "never-read.csv"), *argv])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and line.startswith("error: ") and match in line, line


def test_api_refuses_bad_values(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="learning_rate must be a positive number or 'auto', got 'fast'") as err:
        train(model="never-loaded", data=tmp_path / "x.csv", learning_rate="fast")
    assert err.value.field == "learning_rate" and isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match="grid is empty"):
        check_grid([])
    with pytest.raises(ValueError, match="value nan is not a positive number"):
        check_grid([1e-3, float("nan")])


# ----------------------------------------------------------------------------------------------------- early stopping


def test_early_stopping_keeps_the_best_dev_checkpoint(tmp_path: Path, tiny_bert_dir: Path, spam_csv: Path) -> None:
    """The run stops ``patience`` evaluations after its best one and the saved adapter is that best checkpoint."""
    out = tmp_path / "o"
    result = train(model=str(tiny_bert_dir), data=spam_csv, output_dir=out, num_epochs=12, learning_rate=1e-1,
                   early_stopping_patience=1, keep_checkpoints=True, save_total_limit=20, **FAST)  # fmt: skip
    assert result.epochs_run < 12  # stopped early
    last = max((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    evals = [(h["epoch"], h["eval_accuracy"]) for h in state["log_history"] if "eval_accuracy" in h]
    best_epoch, best_acc = max(evals, key=lambda e: (e[1], -e[0]))  # first epoch with the best accuracy
    assert state["best_metric"] == best_acc and result.epochs_run == best_epoch + 1  # patience 1
    assert result.accuracy_after == best_acc
    final = load_file(str(out / "adapter_model.safetensors"))
    best = load_file(str(Path(result.best_checkpoint) / "adapter_model.safetensors"))
    assert final.keys() == best.keys() and all(torch.equal(final[k], best[k]) for k in final)
    if last != Path(result.best_checkpoint):  # a later, worse epoch exists: the saved adapter is not it
        later = load_file(str(last / "adapter_model.safetensors"))
        assert any(not torch.equal(final[k], later[k]) for k in final)


def test_best_epoch_or_last_epoch(tmp_path: Path, tiny_bert_dir: Path, spam_csv: Path) -> None:
    """``restore_best_epoch=True`` saves the best dev epoch's adapter, the default the last epoch's (both recorded)."""
    saved, best_epochs = {}, {}
    for restore in (True, None):
        out = tmp_path / str(restore)
        result = train(model=str(tiny_bert_dir), data=spam_csv, output_dir=out, num_epochs=6, learning_rate=1e-1,
                       restore_best_epoch=restore, keep_checkpoints=True, save_total_limit=20, **FAST)  # fmt: skip
        ckpts = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
        evals = [h["eval_accuracy"] for h in state["log_history"] if "eval_accuracy" in h]
        best_epochs[restore] = evals.index(max(evals))  # the first epoch with the best accuracy
        summary = json.loads((out / "bitfit_training.json").read_text())
        assert summary["optimisation"]["restore_best_epoch"] is (restore is True)
        expected = ckpts[best_epochs[restore]] if restore else ckpts[-1]
        assert (result.best_checkpoint is not None) is (restore is True)
        assert result.accuracy_after == evals[best_epochs[restore] if restore else -1]
        final = load_file(str(out / "adapter_model.safetensors"))
        ref = load_file(str(expected / "adapter_model.safetensors"))
        assert final.keys() == ref.keys() and all(torch.equal(final[k], ref[k]) for k in final)
        saved[restore] = final
    if best_epochs[True] != 5:  # the best epoch is not the last one: the two runs saved different adapters
        assert any(not torch.equal(saved[True][k], saved[None][k]) for k in saved[True])
    with pytest.raises(ValueError, match="early stopping keeps the best epoch"):
        train(model=str(tiny_bert_dir), data=spam_csv, output_dir=tmp_path / "x", restore_best_epoch=False,
              early_stopping_patience=2, **FAST)  # fmt: skip


def test_cls_init_flag_sets_the_query_delta(tmp_path: Path, tiny_bert_dir: Path, spam_csv: Path) -> None:
    """``--cls-init``: the saved last query delta is the init (an LR too small to move it), recorded in the summary."""
    deltas = {}
    for flag in (["--cls-init", "off"], ["--cls-init", "on"]):
        out = tmp_path / flag[1]
        res = runner.invoke(app, ["train", "-m", str(tiny_bert_dir), "-d", str(spam_csv), "-o", str(out), *flag,
                                  "--lr", "1e-12", "--epochs", "1", "--batch-size", "8", "--max-length", "24",
                                  "--json"])  # fmt: skip
        assert res.exit_code == 0, res.output
        saved = load_file(str(out / "adapter_model.safetensors"))
        deltas[flag[1] == "on"] = next(v for k, v in saved.items() if "layer.1.attention.self.query" in k)
    assert deltas[False].abs().max() < 1e-6 < deltas[True].abs().max()
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["optimisation"]["cls_attention_init"] is True
    assert summary["result"]["extra"]["cls_attention_init"].endswith("encoder.layer.1.attention.self.query")
    with pytest.raises(BitFitError, match="applies to seq-cls and regression"):
        train(model="never-loaded", data=spam_csv, task="token-cls", cls_attention_init=True)


@pytest.mark.parametrize("decision", [False, True])
def test_cls_init_auto_trains_exactly_like_its_decision(
    tmp_path: Path, tiny_bert_dir: Path, spam_csv: Path, monkeypatch: pytest.MonkeyPatch, decision: bool
) -> None:
    """``"auto"`` probes, then trains bit for bit like ``True`` / ``False`` would (the probe leaves the random state
    alone); the probe's figures and the resolved choice are recorded."""
    from bitfit_peft.training import cls_init

    monkeypatch.setattr(cls_init, "AUTO_MIN_GAP", -1e9 if decision else 1e9)  # the threshold decides
    monkeypatch.setattr(cls_init, "AUTO_MIN_DEV", 1)  # (this dev set is tiny)
    kw = dict(task="seq-cls", learning_rate=1e-2, num_epochs=1, batch_size=8, max_length=24, quiet=True,
              eval_before=False)  # fmt: skip
    kw.update(model=str(tiny_bert_dir), data=str(spam_csv))
    auto = train(output_dir=tmp_path / "auto", cls_attention_init="auto", **kw)
    train(output_dir=tmp_path / "fixed", cls_attention_init=decision, **kw)
    probe = auto.extra["cls_probe"]
    assert probe["enable"] is decision and 0 <= probe["first_token"] <= 100 and probe["num_train"] > 0
    assert ("cls_attention_init" in auto.extra) is decision
    a, f = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("auto", "fixed"))
    assert a.keys() == f.keys() and all(torch.equal(a[k], f[k]) for k in a)
    summary = json.loads((tmp_path / "auto" / SUMMARY_FILE).read_text())
    assert summary["optimisation"]["cls_attention_init"] is decision
    with pytest.raises(ValueError, match="cls_attention_init must be True, False or 'auto'"):
        train(output_dir=tmp_path / "x", cls_attention_init="yes", **kw)
