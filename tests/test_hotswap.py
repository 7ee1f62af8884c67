"""``bitfit_peft.hotswap_adapter``: in-place swaps (also under ``torch.compile``, with no recompilation), refusals
that leave every value as it was, mixed batches after a swap; and the compiled call plan's recompile guard."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import bitfit_peft
from bitfit_peft import BitFitConfig, BitFitError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _save(path: Path, seed: int, base_seed: int = 0, num_labels: int = 2, small: float = 1.0, **config: Any) -> Path:
    """A trained-looking adapter (random deltas and head) saved at ``path``; ``small`` scales attention deltas."""
    base = make_tiny_model("bert", task="seq_cls", seed=base_seed, num_labels=num_labels)
    model = get_peft_model(base, BitFitConfig(task_type="SEQ_CLS", **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bitfit_delta" in name or "modules_to_save" in name:
                scale = small if ".attention." in name else 1.0
                param.add_(torch.randn(param.shape, generator=generator) * 0.2 * scale)
    model.save_pretrained(path)
    return path


def _load(path: Path, adapter_name: str = "default") -> PeftModel:
    return PeftModel.from_pretrained(make_tiny_model("bert", task="seq_cls"), path, adapter_name=adapter_name).eval()


def _logits(model: Any, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits


def _adapter_tensors(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if f".{adapter_name}" in k}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": _save(root / "a", seed=1),
        "b": _save(root / "b", seed=2),
        "c": _save(root / "c", seed=3),
        "pruned": _save(root / "pruned", seed=4, small=1e-4, prune_tolerance=1e-3),
        "other_targets": _save(root / "other_targets", seed=5, bias_terms=["query"]),
        "other_head": _save(root / "other_head", seed=6, num_labels=3),
        "other_base": _save(root / "other_base", seed=7, base_seed=1),
    }


def test_swap_matches_a_fresh_load_and_updates_the_config(adapters: dict[str, Path]) -> None:
    model = _load(adapters["a"])
    params = {n: p for n, p in model.named_parameters() if ".default" in n}
    _logits(model)
    bitfit_peft.hotswap_adapter(model, str(adapters["b"]), "default", torch_device="cpu")
    fresh = _load(adapters["b"])
    torch.testing.assert_close(_logits(model), _logits(fresh), rtol=0, atol=0)
    assert _adapter_tensors(model).keys() == _adapter_tensors(fresh).keys()
    for key, value in _adapter_tensors(fresh).items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(p is dict(model.named_parameters())[n] for n, p in params.items())  # same Parameter objects
    assert model.peft_config["default"].base_fingerprint == fresh.peft_config["default"].base_fingerprint
    assert model.peft_config["default"].inference_mode  # the loaded adapter's runtime state is kept


def test_pruned_deltas_swap_in_as_zeros(adapters: dict[str, Path]) -> None:
    assert len(load_file(adapters["pruned"] / WEIGHTS)) < len(load_file(adapters["a"] / WEIGHTS))
    model = _load(adapters["a"])
    bitfit_peft.hotswap_adapter(model, str(adapters["pruned"]), "default")
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert not layer.bitfit_delta["default"].any()
    torch.testing.assert_close(_logits(model), _logits(_load(adapters["pruned"])), rtol=0, atol=0)


COMPILERS: dict[str, Callable[[PeftModel], Any]] = {
    "torch.compile(peft_model)": lambda m: torch.compile(m, backend="eager"),
    "get_base_model().compile()": lambda m: (m.get_base_model().compile(backend="eager"), m)[1],
}


@pytest.mark.parametrize("how", list(COMPILERS))
def test_compiled_swap_does_not_recompile(adapters: dict[str, Path], how: str) -> None:
    model = _load(adapters["a"])
    compiled = COMPILERS[how](model)
    with torch._dynamo.config.patch(error_on_recompile=True):
        before = _logits(compiled)
        _logits(compiled)
        bitfit_peft.hotswap_adapter(compiled, str(adapters["b"]), "default")
        after = _logits(compiled)
        bitfit_peft.hotswap_adapter(compiled, str(adapters["c"]), "default")
        again = _logits(compiled)
    torch.testing.assert_close(before, _logits(_load(adapters["a"])))
    torch.testing.assert_close(after, _logits(_load(adapters["b"])))
    torch.testing.assert_close(again, _logits(_load(adapters["c"])))


def test_second_call_of_compiled_peft_model_does_not_recompile(adapters: dict[str, Path]) -> None:
    """The call plan used to guard on the lazily built ``_structure_cache``, filled by the first compiled call."""
    model = _load(adapters["a"])
    compiled = torch.compile(model, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        first, second = _logits(compiled), _logits(compiled)
    torch.testing.assert_close(first, second)


def test_second_compiled_call_in_low_memory_mode_does_not_recompile(adapters: dict[str, Path]) -> None:
    """A bf16 frozen base with fp32 deltas: the eager bias-cast cache must not be read inside the compiled frame."""
    from bitfit_peft import cast_frozen_base

    model = _load(adapters["a"])
    cast_frozen_base(model, dtype=torch.bfloat16)
    compiled = torch.compile(model, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.autocast("cpu", dtype=torch.bfloat16):
        first, second = _logits(compiled), _logits(compiled)
    torch.testing.assert_close(first, second)


def _foreign_key(path: Path, tmp_path: Path) -> Path:
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    tensors = load_file(path / WEIGHTS)
    tensors["base_model.model.bert.pooler.dense.weight"] = torch.zeros(32, 32)
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    return out


REFUSALS = {
    "other_targets": "other targets",
    "other_head": "other head shapes",
    "foreign_key": "neither a delta of a targeted module",
    "other_base": "different base model",
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_refused_swap_changes_nothing(adapters: dict[str, Path], tmp_path: Path, kind: str) -> None:
    model = _load(adapters["a"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.peft_config["default"].to_dict()
    logits = _logits(model)
    path = _foreign_key(adapters["b"], tmp_path) if kind == "foreign_key" else adapters[kind]
    with pytest.raises(BitFitError, match=REFUSALS[kind]) as err:
        bitfit_peft.hotswap_adapter(model, str(path), "default")
    assert "\n" not in str(err.value) and "Nothing was changed" in str(err.value)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model.peft_config["default"].to_dict() == config
    torch.testing.assert_close(_logits(model), logits, rtol=0, atol=0)


def test_allow_base_mismatch_config_swaps_across_bases(adapters: dict[str, Path]) -> None:
    model = _load(adapters["a"])
    config = bitfit_peft.allow_base_mismatch(BitFitConfig.from_pretrained(adapters["other_base"]))
    bitfit_peft.hotswap_adapter(model, str(adapters["other_base"]), "default", config=config)
    saved = load_file(adapters["other_base"] / WEIGHTS)
    layer = model.base_model.model.bert.encoder.layer[1].output.dense
    assert torch.equal(
        layer.bitfit_delta["default"], saved["base_model.model.bert.encoder.layer.1.output.dense.bitfit_delta"]
    )


def test_refuses_a_non_bitfit_model_and_an_unknown_adapter(adapters: dict[str, Path]) -> None:
    with pytest.raises(BitFitError, match="PeftModel with a BitFit adapter"):
        bitfit_peft.hotswap_adapter(make_tiny_model("bert", task="seq_cls"), str(adapters["b"]), "default")
    with pytest.raises(BitFitError, match="No adapter 'other'"):
        bitfit_peft.hotswap_adapter(_load(adapters["a"]), str(adapters["b"]), "other")


@pytest.mark.parametrize("compiled", [False, True])
def test_mixed_batches_after_a_swap_use_the_new_values(adapters: dict[str, Path], compiled: bool) -> None:
    model = _load(adapters["a"], adapter_name="task_a")
    model.load_adapter(adapters["b"], adapter_name="task_b")
    call = torch.compile(model, backend="eager") if compiled else model
    mix = {"adapter_names": ["task_a", "task_b"]}
    with torch._dynamo.config.patch(error_on_recompile=True):
        old = _logits(call, **mix), _logits(call, **mix)  # the second call reuses the cached tables
        bitfit_peft.hotswap_adapter(call, str(adapters["c"]), "task_a")
        new = _logits(call, **mix)
    torch.testing.assert_close(old[0], old[1])
    torch.testing.assert_close(old[0][0], _logits(_load(adapters["a"]))[0])
    torch.testing.assert_close(new[0], _logits(_load(adapters["c"]))[0])
    torch.testing.assert_close(new[1], _logits(_load(adapters["b"]))[1])
