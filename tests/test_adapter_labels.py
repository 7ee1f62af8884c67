"""An adapter folder describes its task (issue 33, requirement 1): ``num_labels``, ``id2label`` and ``task_type``
are in ``adapter_config.json``; loading onto a base with another head size builds the adapter's head (or says
which ``num_labels`` to pass); ``AutoPeftModelFor*`` loads any label count; the server and ``inspect`` read the names.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from peft import AutoPeftModelForSequenceClassification, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification
from typer.testing import CliRunner

from bitfit_peft import BitFitConfig, BitFitError
from bitfit_peft.serving.adapter_files import read_task_metadata

NAMES = ["anger", "joy", "fear", "love", "surprise"]
IDS = torch.tensor([[2, 10, 11, 12, 3], [2, 20, 21, 3, 0]])


def _five_label_adapter(out: Path, base: torch.nn.Module | None = None) -> torch.Tensor:
    """Save a 5-label adapter (random deltas, perturbed head) to ``out``; returns its logits on ``IDS``."""
    if base is None:
        base = make_tiny_model("bert", task="seq_cls", num_labels=5, id2label=dict(enumerate(NAMES)))
    torch.manual_seed(3)
    model = get_peft_model(base, BitFitConfig(task_type="SEQ_CLS", init_weights=False)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param))
        logits = model(input_ids=IDS).logits
    model.save_pretrained(out)
    return logits


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_adapter_config_carries_task_size_and_label_names(tmp_path: Path) -> None:
    _five_label_adapter(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["num_labels"] == 5
    assert saved["id2label"] == {str(i): n for i, n in enumerate(NAMES)}
    config = BitFitConfig.from_pretrained(str(tmp_path))  # still a config PEFT loads
    assert config.num_labels == 5 and config.id2label["4"] == "surprise"


def test_from_pretrained_onto_a_two_label_base_builds_the_adapters_head(tmp_path: Path) -> None:
    expected = _five_label_adapter(tmp_path)
    base = make_tiny_model("bert", task="seq_cls")  # num_labels=2, as AutoModelFor...from_pretrained(base) gives
    loaded = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=1e-6)
    assert loaded.config.num_labels == 5 and loaded.config.id2label[1] == "joy"


def test_auto_peft_model_loads_any_label_count(tmp_path: Path) -> None:
    base_dir = tmp_path / "base"
    make_tiny_model("bert", task="base").save_pretrained(base_dir)  # an encoder: loads with 2 labels by default
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=5, id2label=dict(enumerate(NAMES)))
    expected = _five_label_adapter(tmp_path / "adapter", base)
    auto = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(_logits(auto), expected, rtol=0, atol=1e-6)
    assert auto.config.id2label[4] == "surprise"


def test_an_adapter_without_label_count_says_which_num_labels_to_pass(tmp_path: Path) -> None:
    _five_label_adapter(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    del saved["num_labels"], saved["id2label"]  # as saved before this release
    config_file.write_text(json.dumps(saved))
    base = make_tiny_model("bert", task="seq_cls")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(BitFitError, match=r"num_labels=5\b") as info:
        PeftModel.from_pretrained(base, str(tmp_path))
    assert "\n" not in str(info.value)
    assert "AutoModelForSequenceClassification.from_pretrained(base, num_labels=5)" in str(info.value)
    assert base.config.num_labels == 2 and all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_a_head_the_adapter_does_not_carry_is_refused_with_the_fix() -> None:
    from bitfit_peft.compat.task_head import fit_head

    base = make_tiny_model("bert", task="seq_cls")
    config = BitFitConfig(task_type="SEQ_CLS", num_labels=5, modules_to_save=["pooler"])  # the head is not saved
    with pytest.raises(BitFitError, match=r"pass|num_labels=5") as info:
        fit_head(base, config)
    assert "num_labels=5" in str(info.value) and base.classifier.out_features == 2


def test_server_and_inspect_show_the_label_names(tmp_path: Path) -> None:
    _five_label_adapter(tmp_path)
    assert read_task_metadata(tmp_path)["labels"] == NAMES  # what the server's registry reads
    from bitfit_peft.cli import app

    result = CliRunner().invoke(app, ["inspect", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "anger, joy, fear, love, surprise" in result.output and "SEQ_CLS" in result.output



def test_a_head_of_another_input_size_is_refused_as_a_shape_mismatch(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _five_label_adapter(tmp_path)
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = next(k for k in state if k.endswith("classifier.weight"))
    state[key] = torch.zeros(5, state[key].shape[1] + 1)
    save_file(state, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    base = make_tiny_model("bert", task="seq_cls")
    with pytest.raises(BitFitError, match=r"shape mismatch.*file \(5, 33\)") as info:
        PeftModel.from_pretrained(base, str(tmp_path))
    assert "num_labels" not in str(info.value) and base.classifier.out_features == 2 and base.config.num_labels == 2
