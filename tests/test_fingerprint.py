"""Issue 34.4: the base fingerprint covers every targeted weight (not a fixed prefix) and the embeddings, its stored
numbers are bounded, and it still accepts dtype casts of the base (the accept/refuse table over real fine-tunes is
``benchmarks/fingerprint_table.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from peft import PeftModel, get_peft_model

from bitfit_peft import BitFitConfig, BitFitError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PREFIX = 16  #: what the format-2 fingerprint sampled of each weight


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fp") / "adapter"
    get_peft_model(make_tiny_model("bert", task="seq_cls", seed=0), BitFitConfig(task_type="SEQ_CLS")).save_pretrained(
        folder
    )
    return folder


def _base(seed: int = 0) -> torch.nn.Module:
    return make_tiny_model("bert", task="seq_cls", seed=seed)


def _refused(base: torch.nn.Module, folder: Path) -> bool:
    try:
        PeftModel.from_pretrained(base, folder)
    except BitFitError as err:
        assert "different base model" in str(err) or "base_fingerprint" in str(err), err
        return True
    return False


def _copy_prefix(src: torch.Tensor, dst: torch.Tensor) -> None:
    dst.view(-1)[:PREFIX] = src.reshape(-1)[:PREFIX]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_copies_are_accepted(adapter: Path, dtype: torch.dtype) -> None:
    assert not _refused(_base().to(dtype), adapter)


def test_the_last_layer_replaced_but_its_first_values_is_refused(adapter: Path) -> None:
    base, other = _base(), _base(seed=7)
    with torch.no_grad():
        for (name, param), (_, new) in zip(base.named_parameters(), other.named_parameters(), strict=True):
            if "layer.1." in name and name.endswith("weight") and param.dim() == 2:
                keep = param.detach().clone()
                param.copy_(new)
                _copy_prefix(keep, param)
    assert _refused(base, adapter)


def test_replaced_embeddings_are_refused(adapter: Path) -> None:
    base, other = _base(), _base(seed=7)
    with torch.no_grad():
        for attr in ("word_embeddings", "position_embeddings"):
            getattr(base.bert.embeddings, attr).weight.copy_(getattr(other.bert.embeddings, attr).weight)
    assert _refused(base, adapter)


def test_a_crafted_copy_of_biases_and_first_weight_values_is_refused(adapter: Path) -> None:
    real, crafted = _base(), _base(seed=7)
    with torch.no_grad():
        for (name, src), (_, dst) in zip(real.named_parameters(), crafted.named_parameters(), strict=True):
            if name.endswith("bias") or "embeddings" in name or "classifier" in name:
                dst.copy_(src)
            else:
                _copy_prefix(src, dst)
    assert _refused(crafted, adapter)


def test_a_random_base_is_refused(adapter: Path) -> None:
    assert _refused(_base(seed=3), adapter)


@pytest.mark.parametrize("value", [1e30, float("inf"), float("nan")])
def test_unbounded_stored_norms_are_refused_at_load(adapter: Path, tmp_path: Path, value: float) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("adapter_model.safetensors",):
        (folder / name).write_bytes((adapter / name).read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    for key in [k for k in config["base_fingerprint"] if k.endswith("_norm")]:
        config["base_fingerprint"][key] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(BitFitError, match="base_fingerprint"):
        PeftModel.from_pretrained(_base(seed=3), folder)  # any base of the right structure used to pass


def test_format_2_fingerprints_are_still_checked(tmp_path: Path) -> None:
    """An adapter saved before format 3 keeps loading onto its base and refusing another."""
    from bitfit_peft.files.fingerprint import compute
    from bitfit_peft.tuner.base_check import module_entries

    model = get_peft_model(_base(), BitFitConfig(task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    names = sorted(n for n, _ in model.base_model.bitfit_layers().items())
    config["base_fingerprint"] = compute(module_entries(model, names, version=2), version=2)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert not _refused(_base(), tmp_path)
    assert _refused(_base(seed=3), tmp_path)
