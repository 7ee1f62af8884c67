"""Issue 34.3: ``bitfit-peft train`` on hostile data answers in ONE line (exit 2, ``error: <file>: <problem>. <fix>``).

The real CLI runs in-process (``typer.testing.CliRunner``) on a tiny local BERT; the Hub is offline.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import save_tiny_model
from typer.testing import CliRunner

from bitfit_peft.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()
ENV = {"COLUMNS": "80", "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
ROWS = [("win cash now" if i % 3 == 0 else f"see you at {i}", "spam" if i % 3 == 0 else "ham") for i in range(30)]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data-errors")
    save_tiny_model(root / "base", "bert", task="seq_cls", seed=0)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    three = AutoModelForSequenceClassification.from_pretrained(root / "base", num_labels=3,
                                                               ignore_mismatched_sizes=True)
    three.save_pretrained(root / "base3")  # a checkpoint whose classifier has 3 outputs
    AutoTokenizer.from_pretrained(root / "base").save_pretrained(root / "base3")
    return root


def _train(base: Path, data: Path, tmp_path: Path, *extra: str, model: str = "base"):
    return runner.invoke(app, ["train", "--model", str(base / model), "--data", str(data), "-o", str(tmp_path / "o"),
                               "--epochs", "1", "--max-length", "16", *extra], env=ENV)


def _one_line(res, *words: str) -> str:
    out = res.output.strip()
    assert res.exit_code == 2, (res.exit_code, res.output[-2000:], res.exception)
    assert "Traceback" not in out
    last = out.splitlines()[-1]
    assert last.startswith("error: "), out[-2000:]
    assert len([line for line in out.splitlines() if line.startswith("error")]) == 1
    for word in words:
        assert word in last, (word, last)
    return last


def _csv(path: Path, rows: list[tuple[str, str]], encoding: str = "utf-8") -> Path:
    with path.open("w", newline="", encoding=encoding) as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def test_a_csv_field_over_the_csv_limit(base: Path, tmp_path: Path) -> None:
    data = _csv(tmp_path / "big.csv", [*ROWS, ("x" * 200_000, "ham")])
    _one_line(_train(base, data, tmp_path), str(data), "field")


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16", "random"])
def test_a_csv_that_is_not_utf8(base: Path, tmp_path: Path, encoding: str) -> None:
    data = tmp_path / "enc.csv"
    if encoding == "random":
        data.write_bytes(bytes(range(128, 256)) * 64)
    else:
        _csv(data, [*ROWS, ("café crème", "ham")], encoding=encoding)
    _one_line(_train(base, data, tmp_path), str(data), "UTF-8")


def test_json_nested_200k_deep(base: Path, tmp_path: Path) -> None:
    data = tmp_path / "deep.json"
    data.write_text("[" * 200_000 + "]" * 200_000)
    _one_line(_train(base, data, tmp_path), str(data), "nested")


def test_a_json_integer_of_100k_digits(base: Path, tmp_path: Path) -> None:
    data = tmp_path / "digits.json"
    data.write_text(json.dumps([{"text": t, "label": lab} for t, lab in ROWS])[:-1]
                    + ', {"text": "x", "label": ' + "9" * 100_000 + "}]")
    _one_line(_train(base, data, tmp_path), str(data), "digits")


def test_jsonl_with_lone_surrogates(base: Path, tmp_path: Path) -> None:
    data = tmp_path / "lone.jsonl"
    lines = [json.dumps({"text": t, "label": lab}) for t, lab in ROWS]
    lines.append('{"text": "bad \\ud800 text", "label": "ham"}')
    data.write_text("\n".join(lines) + "\n")
    _one_line(_train(base, data, tmp_path), str(data), "surrogate")


@pytest.mark.parametrize("target", ["nan", "1e400", "-inf"])
def test_non_finite_regression_targets_name_the_row(base: Path, tmp_path: Path, target: str) -> None:
    data = _csv(tmp_path / "reg.csv", [*[(t, str(i / 10)) for i, (t, _) in enumerate(ROWS)], ("odd", target)])
    last = _one_line(_train(base, data, tmp_path, "--task", "regression"), str(data), "row 30", "finite")
    assert not (tmp_path / "o").exists(), last


def test_a_base_whose_head_has_another_number_of_labels(base: Path, tmp_path: Path) -> None:
    data = _csv(tmp_path / "two.csv", ROWS)
    _one_line(_train(base, data, tmp_path, model="base3"), "base3", "3 labels", "the data has 2")
