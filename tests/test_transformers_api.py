"""transformers' own adapter API (``PeftAdapterMixin``) with a BitFit config, LoRA as the control.

The journey of transformers' PEFT docs, with ``BitFitConfig`` swapped in for ``LoraConfig``: ``model.add_adapter``
(twice), ``set_adapter``, ``active_adapters``, ``disable_adapters`` / ``enable_adapters``, ``save_pretrained`` of the
transformers model and ``load_adapter`` into a fresh one. Every call goes through transformers' PEFT version check, so
these tests fail (``ValueError: The version of PEFT you are using is not compatible``) when the pins let in a
transformers whose ``MIN_PEFT_VERSION`` is above the newest peft they allow (transformers 5.24 wants peft 0.22).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import VOCAB_SIZE, make_tiny_model
from peft import LoraConfig, PeftConfig, get_peft_model
from torch import nn

import bitfit_peft  # noqa: F401 - registers PeftType.BITFIT
from bitfit_peft import BitFitConfig


def _bitfit() -> PeftConfig:
    return BitFitConfig(bias_terms=["query", "value", "intermediate"], init_weights=False)


def _lora() -> PeftConfig:
    return LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False)


CONFIGS: dict[str, Callable[[], PeftConfig]] = {"bitfit": _bitfit, "lora": _lora}
ADAPTER_KEY = {"bitfit": "bitfit_delta", "lora": "lora_"}
# The docs' journey adds a second adapter to a model that has one, which PEFT warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


@pytest.fixture(params=sorted(CONFIGS))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def _base() -> nn.Module:
    return make_tiny_model("bert", task="seq_cls")


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB_SIZE, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_batch()).logits


def _add(model: nn.Module, kind: str, name: str, seed: int) -> PeftConfig:
    config = CONFIGS[kind]()
    torch.manual_seed(seed)  # init_weights=False / init_lora_weights=False: random weights, drawn at injection
    model.add_adapter(config, adapter_name=name)
    return config


def _adapter_params(model: nn.Module, name: str, kind: str, strip: str = "") -> dict[str, torch.Tensor]:
    return {
        k.removeprefix(strip): p
        for k, p in model.named_parameters()
        if ADAPTER_KEY[kind] in k and (k.endswith(f".{name}") or f".{name}." in k)
    }


def _two_adapters(kind: str) -> tuple[nn.Module, torch.Tensor]:
    model = _base()
    base_logits = _logits(model)
    _add(model, kind, "task_a", seed=10)
    _add(model, kind, "task_b", seed=20)
    return model, base_logits


def test_installed_peft_satisfies_transformers_adapter_api() -> None:
    from importlib.metadata import version

    from packaging.version import Version
    from transformers.integrations.peft import MIN_PEFT_VERSION

    assert Version(version("peft")) >= Version(MIN_PEFT_VERSION), (
        f"transformers {version('transformers')} needs peft>={MIN_PEFT_VERSION} for model.add_adapter & co, "
        f"peft {version('peft')} is installed: fix the pins in pyproject.toml"
    )


def test_add_adapter_set_adapter_and_active_adapters(kind: str) -> None:
    model, base_logits = _two_adapters(kind)
    assert set(model.peft_config) == {"task_a", "task_b"}
    assert model.peft_config["task_a"].peft_type == ("BITFIT" if kind == "bitfit" else "LORA")
    assert _adapter_params(model, "task_a", kind) and _adapter_params(model, "task_b", kind)
    model.set_adapter("task_b")
    assert model.active_adapters() == ["task_b"]
    out_b = _logits(model)
    model.set_adapter("task_a")
    assert model.active_adapters() == ["task_a"]
    out_a = _logits(model)
    assert not torch.equal(out_a, base_logits) and not torch.equal(out_b, base_logits)
    assert not torch.equal(out_a, out_b)
    with pytest.raises(ValueError, match="already exists"):
        _add(model, kind, "task_a", seed=30)
    with pytest.raises(ValueError, match="not found"):
        model.set_adapter("missing")


def test_disable_adapters_is_the_base_and_enable_adapters_the_active_one(kind: str) -> None:
    model, base_logits = _two_adapters(kind)
    model.set_adapter("task_b")
    out_b = _logits(model)
    model.disable_adapters()
    assert torch.equal(_logits(model), base_logits)
    model.enable_adapters()
    assert model.active_adapters() == ["task_b"]
    assert torch.equal(_logits(model), out_b)


def test_outputs_equal_peft_model_for_the_same_weights(kind: str) -> None:
    model, _ = _two_adapters(kind)
    for name in ("task_a", "task_b"):
        model.set_adapter(name)
        peft_model = get_peft_model(_base(), CONFIGS[kind](), adapter_name=name).eval()
        ours = _adapter_params(model, name, kind)
        theirs = _adapter_params(peft_model, name, kind, strip="base_model.model.")
        assert set(theirs) == set(ours), "the adapter's parameters are not named alike"
        assert any(not torch.equal(theirs[k], ours[k]) for k in ours), "the PeftModel must start from other weights"
        with torch.no_grad():
            for key, value in ours.items():
                theirs[key].copy_(value)
        assert torch.equal(_logits(model), _logits(peft_model)), name


def test_save_pretrained_then_load_adapter_in_a_fresh_model(kind: str, tmp_path: Path) -> None:
    model, base_logits = _two_adapters(kind)
    model.set_adapter("task_a")
    out_a = _logits(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == ("BITFIT" if kind == "bitfit" else "LORA")
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "model.safetensors").exists(), "only the adapter is saved"

    fresh = _base()
    assert torch.equal(_logits(fresh), base_logits)
    fresh.load_adapter(str(tmp_path))
    assert fresh.active_adapters() == ["default"]
    assert torch.equal(_logits(fresh), out_a)

    named = _base()
    named.load_adapter(str(tmp_path), adapter_name="again")
    named.set_adapter("again")
    assert torch.equal(_logits(named), out_a)
    named.disable_adapters()
    assert torch.equal(_logits(named), base_logits)


def test_add_adapter_leaves_the_base_weights_alone(kind: str) -> None:
    model = _base()
    before = copy.deepcopy({k: v for k, v in model.state_dict().items()})
    _add(model, kind, "task_a", seed=10)
    after = model.state_dict()
    for key, value in before.items():
        match = [k for k in after if k == key or k.replace(".base_layer", "") == key]
        assert match and all(torch.equal(after[k], value) for k in match), key


# ---------------------------------------------------------------------------------------------- the task head (#33)
def _task_config(kind: str) -> PeftConfig:
    if kind == "bitfit":
        return BitFitConfig(task_type="SEQ_CLS", bias_terms=["query", "value"])
    return LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])


def _head_is_trained(model: nn.Module) -> bool:
    return any(p.requires_grad for n, p in model.named_parameters() if "classifier" in n)


def _train_steps(model: nn.Module, steps: int = 8) -> None:
    """A few optimizer steps on fixed labels, so that deltas and head (when trainable) move."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    labels = torch.tensor([0, 1, 1])
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**_batch(), labels=labels).loss.backward()
        optimizer.step()
    model.eval()


def test_add_adapter_trains_and_saves_the_task_head_as_get_peft_model_does(kind: str, tmp_path: Path) -> None:
    """get_peft_model(task_type="SEQ_CLS") trains and saves the classifier; so must transformers' add_adapter.

    LoRA (the control) shows the upstream behaviour: add_adapter ignores task_type, the head stays frozen."""
    assert _head_is_trained(get_peft_model(_base(), _task_config(kind)))
    model = _base()
    model.add_adapter(_task_config(kind))
    if kind == "lora":
        assert not _head_is_trained(model), "upstream fixed: add_adapter now keeps LoRA's head; update the docs"
        return
    assert _head_is_trained(model)
    _train_steps(model)
    trained = _logits(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "classifier" in saved["modules_to_save"] and saved["num_labels"] == 2
    fresh = _base()
    fresh.load_adapter(str(tmp_path))
    assert torch.allclose(_logits(fresh), trained, atol=1e-6), "the trained head was not saved"


def test_disable_then_enable_adapters_round_trips_the_head(kind: str) -> None:
    """disable_adapters() gives the base (its own head); enable_adapters() must bring the adapter's head back.

    LoRA (the control): transformers' enable_adapters skips ModulesToSaveWrapper, so the head stays the base's
    (upstream bug, not patched for other tuners)."""
    config = _task_config(kind)
    config.modules_to_save = ["classifier"]  # as add_adapter now gives BitFit, and LoRA users do by hand
    model = _base()
    base_logits = _logits(model)
    model.add_adapter(config)
    _train_steps(model)
    trained = _logits(model)
    model.disable_adapters()
    assert torch.equal(_logits(model), base_logits)
    model.enable_adapters()
    if kind == "lora":
        assert not torch.allclose(_logits(model), trained), "upstream fixed: enable_adapters restores LoRA's head"
        return
    assert torch.equal(_logits(model), trained)
