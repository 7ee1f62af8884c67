"""``bitfit-peft train`` as a tool people trust (issue 33, requirement 4): a plan before training, a table per epoch,
a loud warning when the result does not beat the majority class, the Trainer options a user looks for, ``--help``
that reads whole at 80 columns, and (requirement 2) a model card that names data, labels and metrics without a local
path.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from bitfit_peft.cli import app
from bitfit_peft.training.args import OptionError, TrainArgs, option_fields

FAST = ["--batch-size", "8", "--max-length", "24", "--seed", "0"]


def _csv(path: Path, informative: bool = True, n: int = 48) -> Path:
    rng = random.Random(0)
    words = ["hi", "see", "you", "at", "home", "ok", "call", "me", "later", "lunch"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        for i in range(n):
            spam = i % 4 == 0
            text = ("win free cash now " if spam else "") + " ".join(rng.choices(words, k=5))
            writer.writerow({"text": text if informative else "same words", "label": "spam" if spam else "ham"})
    return path


def _run(*argv: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["train", *argv], env={"COLUMNS": "120"})
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output  # progress bars: stderr


def test_plan_before_training_and_one_table_row_per_epoch(tmp_path: Path, tiny_bert_dir: Path) -> None:
    code, out = _run("--model", str(tiny_bert_dir), "--data", str(_csv(tmp_path / "d.csv")), "--epochs", "2",
                     "-o", str(tmp_path / "out"), *FAST)  # fmt: skip
    assert code == 0, out
    plan = out.index("Plan")
    assert re.search(r"examples \(train / dev\)\s*│\s*43 / 5", out)
    assert re.search(r"labels found \(2\)\s*│\s*ham \(\d+\), spam \(\d+\)", out)
    assert re.search(r"steps\s*│\s*6 per epoch x 2 epochs = 12", out)
    assert re.search(r"\[CLS\] init\s*│\s*(on|off): ", out)
    header = out.index("train loss")
    assert plan < header < out.index("BitFit result"), "the plan comes before training, the table during it"
    rows = re.findall(r"^\s*([012])\s+(-|\d\.\d{4})\s+(\d\.\d{4})\s+(\d\.\d{4})\s*$", out, flags=re.M)
    assert [r[0] for r in rows] == ["0", "1", "2"], out
    assert "{'loss'" not in out and "'eval_loss'" not in out, "no raw Trainer dicts"


def test_a_result_no_better_than_the_majority_class_is_a_loud_warning(tmp_path: Path, tiny_bert_dir: Path) -> None:
    data = _csv(tmp_path / "d.csv", informative=False)  # every text alike: the model can only guess one class
    code, out = _run("--model", str(tiny_bert_dir), "--data", str(data), "--epochs", "1", "-o", str(tmp_path / "o"),
                     *FAST)  # fmt: skip
    assert code == 0, out
    assert "WARNING: no better than the majority class" in out and "does not beat" in out
    code, out = _run("--model", str(tiny_bert_dir), "--data", str(data), "--epochs", "1", "-o", str(tmp_path / "j"),
                     "--json", *FAST)  # fmt: skip
    assert json.loads(out)["beats_majority"] is False


def test_trainer_options_reach_the_run(tmp_path: Path, tiny_bert_dir: Path) -> None:
    from bitfit_peft.training.train import train, training_arguments

    args = TrainArgs(gradient_accumulation_steps=2, gradient_checkpointing=True, report_to="none",
                     target_modules="query,value", save_dtype="bfloat16")  # fmt: skip
    targs = training_arguments(args)
    assert targs.gradient_accumulation_steps == 2 and targs.gradient_checkpointing and targs.report_to == []
    assert args.target_modules == ("query", "value")
    assert TrainArgs(target_modules=r".*\.attention\..*").target_modules == r".*\.attention\..*"
    with pytest.raises(OptionError, match="bf16 and fp16"):
        TrainArgs(bf16=True, fp16=True)
    with pytest.raises(OptionError, match="one of --bias-terms and --target-modules"):
        TrainArgs(bias_terms="query", target_modules="value")

    out = tmp_path / "out"
    result = train(model=str(tiny_bert_dir), data=_csv(tmp_path / "d.csv"), output_dir=out, num_epochs=1,
                   batch_size=8, max_length=24, quiet=True, gradient_accumulation_steps=2,
                   gradient_checkpointing=True, target_modules="query,value", save_dtype="bfloat16")  # fmt: skip
    assert result.extra["plan"]["effective_batch_size"] == 16 and result.extra["plan"]["steps_per_epoch"] == 3
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["query", "value"] and saved["save_dtype"] == "bfloat16"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        deltas = [k for k in f.keys() if "bitfit_delta" in k]  # noqa: SIM118
        assert deltas and all(".query." in k or ".value." in k for k in deltas)
        assert {str(f.get_tensor(k).dtype) for k in deltas} == {"torch.bfloat16"}


def test_help_reads_whole_at_80_columns() -> None:
    env = {**os.environ, "COLUMNS": "80"}
    run = [sys.executable, "-m", "bitfit_peft.cli"]
    out = subprocess.run([*run, "train", "--help"], capture_output=True, text=True, env=env, check=True).stdout
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "…" not in out
    for f in option_fields():
        for decl in f.metadata.get("flags", (f"--{f.name.replace('_', '-')}",)):
            for flag in decl.split("/"):
                assert re.search(rf"(^|[\s,]){re.escape(flag)}([\s,=]|$)", out, flags=re.M), flag
    for flag in ("--bf16", "--fp16", "--gradient-accumulation-steps", "--gradient-checkpointing", "--report-to",
                 "--target-modules", "--save-dtype"):  # fmt: skip
        assert flag in out
    serve = subprocess.run([*run, "serve", "--help"], capture_output=True, text=True, env=env, check=True).stdout
    assert "peft[ray]" in serve, "Rich markup ate [ray]"


def test_bias_terms_error_points_at_the_cli_option(tmp_path: Path) -> None:
    code, out = _run("--bias-terms", "attention", "-o", str(tmp_path / "o"))
    assert code == 2 and "--target-modules" in out and len(out.strip().splitlines()) == 1, out


def test_the_card_names_data_labels_and_metrics_without_local_paths(tmp_path: Path, tiny_bert_dir: Path) -> None:
    out = tmp_path / "out"
    code, log = _run("--model", str(tiny_bert_dir), "--data", str(_csv(tmp_path / "mine.csv")), "--epochs", "1",
                     "-o", str(out), "--data-name", "my spam corpus", *FAST)  # fmt: skip
    assert code == 0, log
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and str(tiny_bert_dir) not in card, "a local path in the card"
    assert "my spam corpus" in card and "| 0 | ham |" in card and "| 1 | spam |" in card
    assert "### Dev results" in card and "majority-class accuracy" in card and "% of" in card
    assert f"`{tiny_bert_dir.name}` (a local model)" in card and "local folder" in card


def test_the_cli_imports_neither_torch_nor_transformers() -> None:
    """``bitfit-peft --help`` starts at once: the CLI modules load torch, peft and transformers only for a run."""
    code = "import sys, bitfit_peft.cli; print(sorted({'torch', 'peft', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_import_bitfit_peft_still_registers_with_peft_when_peft_comes_later() -> None:
    code = ("import bitfit_peft, sys; assert 'torch' not in sys.modules; from peft import PeftConfig, PeftType; "
            "print(PeftType.BITFIT.value, type(bitfit_peft.BitFitConfig()).__name__)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["BITFIT", "BitFitConfig"], out
