"""Issue 13.4: every ``bitfit-peft`` command names the real problem in ONE line (no traceback), exit code 2.

The real CLI runs in-process (``typer.testing.CliRunner``). Nothing reaches the network: the Hub is offline
(``HF_HUB_OFFLINE=1``) with an empty cache for every test.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import make_tiny_model, save_tiny_model
from peft import get_peft_model
from typer.testing import CliRunner

import bitfit_peft
from bitfit_peft.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()
ENV = {"COLUMNS": "80", "NO_COLOR": "1"}  # 80 columns: a long message must still be one line


@pytest.fixture(autouse=True)
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))  # no stale cache hit


def _run(*args: str):
    return runner.invoke(app, list(args), env=ENV)


def _one_line(res, *words: str) -> str:
    """The result failed with exit code 2 and printed exactly one line holding every word."""
    out = res.output.strip()
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in out
    assert len(out.splitlines()) == 1, out
    for word in words:
        assert word in out, (word, out)
    return out


def _last_line(res, *words: str) -> str:
    """Like :func:`_one_line`, for commands whose libraries print progress first: the error is the last line."""
    out = res.output.strip()
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in out
    last = out.splitlines()[-1]
    assert last.startswith("error: "), out
    for word in words:
        assert word in last, (word, out)
    return last


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-errors")
    save_tiny_model(root / "base", "bert", task="seq_cls", seed=0)
    save_tiny_model(root / "other-base", "bert", task="seq_cls", seed=1)  # other weights: fingerprint differs
    peft_model = get_peft_model(make_tiny_model("bert", task="seq_cls", seed=0),
                                bitfit_peft.BitFitConfig(task_type="SEQ_CLS"))  # fmt: skip
    peft_model.save_pretrained(root / "adapter")
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "notes.txt").write_text("nothing to load\n")
    with (root / "data.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(30):
            spam = i % 3 == 0
            writer.writerow([("win cash now " if spam else "") + f"see you at {i}", "spam" if spam else "ham"])
    return {p.name: p for p in root.iterdir()}


# ---------------------------------------------------------------------------------------------------- missing paths
def test_train_missing_model(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = _run("train", "--model", "./missing", "--data", str(files["data.csv"]), "-o", "out")
    assert _one_line(res) == "error: no such directory: ./missing"


def test_serve_missing_base(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = _run("serve", "--base", "./missing", "--adapter", f"sst2={files['adapter']}")
    assert _one_line(res) == "error: no such directory: ./missing"


def test_serve_missing_adapter(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = _run("serve", "--base", str(files["base"]), "--adapter", "sst2=./missing")
    assert _one_line(res) == "error: adapter 'sst2': no such directory: ./missing"


def test_inspect_missing_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert _one_line(_run("inspect", "./missing")) == "error: no such directory: ./missing"


def test_partly_existing_path_is_local(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``out/nope`` looks like a Hub id, but ``out`` exists here: it is a missing local directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    res = _run("train", "--model", "out/nope", "--data", str(files["data.csv"]), "-o", "o")
    assert _one_line(res) == "error: no such directory: out/nope"


# ---------------------------------------------------------------------------------------------------- Hub ids, offline
@pytest.mark.parametrize(
    "command",
    [
        ["train", "--model", "nobody-here/no-model"],
        ["serve", "--base", "nobody-here/no-model", "--adapter", "a=ADAPTER"],
        ["serve", "--base", "BASE", "--adapter", "a=nobody-here/no-model", "--allow-hub"],
        ["inspect", "nobody-here/no-model"],
    ],
    ids=["train-model", "serve-base", "serve-adapter", "inspect"],
)
def test_hub_id_offline(command: list[str], files: dict[str, Path]) -> None:
    args = [f"a={files['adapter']}" if a == "a=ADAPTER" else str(files["base"]) if a == "BASE" else a for a in command]
    if command[0] == "train":
        args += ["--data", str(files["data.csv"])]
    out = _one_line(_run(*args), "nobody-here/no-model", "offline", "Hugging Face Hub")
    assert "no such directory" not in out


def test_serve_hub_adapter_needs_allow_hub(files: dict[str, Path]) -> None:
    res = _run("serve", "--base", str(files["base"]), "--adapter", "a=nobody-here/no-model")
    _one_line(res, "adapter 'a'", "nobody-here/no-model", "--allow-hub")


# ---------------------------------------------------------------------------------------------------- not a model
def test_train_dir_without_config(files: dict[str, Path], tmp_path: Path) -> None:
    folder = str(files["not-a-model"])
    res = _run("train", "--model", folder, "--data", str(files["data.csv"]), "-o", str(tmp_path / "o"))
    assert _one_line(res) == f"error: {folder}: no config.json (not a transformers model directory)"


def test_serve_dir_without_adapter_config(files: dict[str, Path]) -> None:
    folder = str(files["not-a-model"])
    res = _run("serve", "--base", str(files["base"]), "--adapter", f"spam={folder}")
    assert _one_line(res) == f"error: adapter 'spam': {folder}: no adapter_config.json (not a PEFT adapter)"


# ---------------------------------------------------------------------------------------------------- bad values
def test_bad_bias_terms(files: dict[str, Path], tmp_path: Path) -> None:
    res = _run("train", "--model", str(files["base"]), "--data", str(files["data.csv"]), "-o", str(tmp_path / "o"),
               "--bias-terms", "query,bogus", "--epochs", "1", "--max-length", "16")  # fmt: skip
    _one_line(res, "--bias-terms", "unknown group(s) ['bogus']", "query")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------- base mismatch
def test_serve_base_mismatch_names_flag_and_user_name(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(kw))
    args = ["serve", "--base", str(files["other-base"]), "--adapter", f"sst2={files['adapter']}", "--device", "cpu"]
    last = _last_line(_run(*args), "'sst2'", "different base model", "(or pass --allow-base-mismatch)")
    assert "sst2__" not in last
    assert not served

    res = _run(*args, "--allow-base-mismatch")  # the flag the message names exists, and works
    assert res.exit_code == 0, res.output
    assert "loaded sst2" in res.output and len(served) == 1


def test_engine_allow_base_mismatch_every_adapter(files: dict[str, Path]) -> None:
    """``add_adapter(allow_base_mismatch=True)`` works for the first adapter (``PeftModel.from_pretrained``) and
    later ones (``load_adapter``); refusals name the user's adapter name, not the internal ``name__N``."""
    from bitfit_peft.serving import MultiTaskEngine

    engine = MultiTaskEngine(str(files["other-base"]), task_type="SEQ_CLS", device="cpu")
    for name in ("one", "two"):
        with pytest.raises(bitfit_peft.BitFitError, match=f"Adapter '{name}' was trained") as err:
            engine.add_adapter(name, files["adapter"])
        assert f"{name}__" not in str(err.value)
        assert engine.add_adapter(name, files["adapter"], allow_base_mismatch=True).delta_params > 0
    assert engine.tasks() == ["one", "two"]
    assert [p.task for p in engine.predict([("one", "hi"), ("two", "hi")])] == ["one", "two"]


# ---------------------------------------------------------------------------------------------------- --help
@pytest.mark.parametrize("command", [[], ["train"], ["serve"], ["inspect"]], ids=["root", "train", "serve", "inspect"])
def test_help_shows_switches(command: list[str]) -> None:
    import typer.main

    res = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    group = typer.main.get_command(app)
    cmd = group.commands[command[0]] if command else group  # type: ignore[attr-defined]
    flags = [p for p in cmd.params if getattr(p, "is_bool_flag", False)]
    for flag in flags:
        assert flag.opts[0] in res.output
    for line in res.output.splitlines():  # typer prints "<bool>" after a flag unless told otherwise
        assert "<bool>" not in line and "BOOLEAN" not in line, line
    if command == ["serve"]:
        assert "--allow-base-mismatch" in res.output
