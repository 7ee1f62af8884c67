"""Failure modes: wrong base, broken files and configs, pickles and NaN/Inf (killed saves: test_saving.py).

Every refusal must happen before any weight changes (the model is compared parameter by parameter, flag by
flag and module by module) and must say what is wrong in words, not as a deep torch traceback.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_model
from peft import PeftModel, get_peft_model
from peft.utils import set_peft_model_state_dict
from peft.utils.save_and_load import load_peft_weights
from safetensors import SafetensorError
from torch import nn

import bitfit_peft
from bitfit_peft import BitFitConfig, BitFitError

IDS = torch.tensor([[2, 10, 11, 12, 3], [2, 20, 21, 3, 0]])


# ---------------------------------------------------------------------------------------------- helpers
def _snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a failed load must leave untouched."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modules": [(n, type(m).__qualname__, m.training) for n, m in model.named_modules()],
        "adapters": sorted(model.peft_config) if isinstance(model, PeftModel) else [],
        "active": list(model.active_adapters) if isinstance(model, PeftModel) else [],
    }


def _assert_unchanged(model: nn.Module, before: dict[str, Any], flags: bool = True) -> None:
    after = _snapshot(model)
    assert after["modules"] == before["modules"], "module structure changed"
    assert after["adapters"] == before["adapters"] and after["active"] == before["active"]
    if flags:
        assert after["grad"] == before["grad"], "requires_grad flags changed"
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert after["state"][key].dtype == value.dtype, key
        assert torch.equal(after["state"][key], value), f"{key} changed"


def _clear(err: BaseException, *needles: str) -> None:
    """The message says what is wrong and the error was not raised from deep inside torch."""
    text = str(err)
    for needle in needles:
        assert needle.lower() in text.lower(), f"{needle!r} not in {text!r}"
    last = traceback.extract_tb(err.__traceback__)[-1].filename
    assert f"{os.sep}torch{os.sep}" not in last, f"raised from inside torch: {last}"


def _bert(seed: int = 0, **overrides: object) -> nn.Module:
    return make_tiny_model("bert", task="seq_cls", seed=seed, **overrides)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BitFit adapter (random deltas, head) trained on ``_bert(seed=0)``."""
    path = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    get_peft_model(_bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False)).save_pretrained(path)
    return path


def _copy(adapter_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(adapter_dir, dst)
    return dst


# ---------------------------------------------------------------------------------------------- wrong base
WRONG_BASES: dict[str, Callable[[], nn.Module]] = {
    "gpt2": lambda: make_tiny_model("gpt2", task="seq_cls"),
    "distilbert": lambda: make_tiny_model("distilbert", task="seq_cls"),
    "same-shapes-other-weights": lambda: _bert(seed=1),
    "fewer-layers": lambda: _bert(num_hidden_layers=1),
}


@pytest.mark.parametrize("kind", sorted(WRONG_BASES))
def test_wrong_base_is_refused_and_model_untouched(adapter_dir: Path, kind: str) -> None:
    base = WRONG_BASES[kind]()
    before = _snapshot(base)
    with pytest.raises(BitFitError) as err:
        PeftModel.from_pretrained(base, adapter_dir)
    _clear(err.value, "trained on a different base model", "allow_base_mismatch")
    _assert_unchanged(base, before)


@pytest.mark.parametrize("kind", ["same-shapes-other-weights", "fewer-layers"])
def test_wrong_base_via_load_adapter_leaves_peft_model_untouched(adapter_dir: Path, kind: str) -> None:
    model = get_peft_model(WRONG_BASES[kind](), BitFitConfig(task_type="SEQ_CLS"), adapter_name="task_a")
    before = _snapshot(model)
    with pytest.raises(BitFitError, match="different base model"):
        model.load_adapter(adapter_dir, adapter_name="task_b")
    _assert_unchanged(model, before)
    model(input_ids=IDS)  # still usable


def test_fewer_layers_with_override_is_a_shape_error_and_model_untouched(adapter_dir: Path) -> None:
    base = _bert(num_hidden_layers=1)
    before = _snapshot(base)
    config = bitfit_peft.allow_base_mismatch(BitFitConfig.from_pretrained(adapter_dir))
    with pytest.raises(BitFitError) as err:
        PeftModel.from_pretrained(base, adapter_dir, config=config)
    _clear(err.value, "does not fit this model", "neither a delta of a targeted module", "model is unchanged")
    _assert_unchanged(base, before, flags=False)  # flags: see test_failed_load_restores_requires_grad


def test_failed_load_restores_requires_grad(adapter_dir: Path) -> None:
    base = _bert(num_hidden_layers=1)
    before = _snapshot(base)
    config = bitfit_peft.allow_base_mismatch(BitFitConfig.from_pretrained(adapter_dir))
    with pytest.raises(BitFitError):
        PeftModel.from_pretrained(base, adapter_dir, config=config)
    _assert_unchanged(base, before)


def test_other_architecture_with_override_is_refused_and_model_untouched(adapter_dir: Path) -> None:
    base = make_tiny_model("gpt2", task="seq_cls")
    before = _snapshot(base)
    config = bitfit_peft.allow_base_mismatch(BitFitConfig.from_pretrained(adapter_dir))
    with pytest.raises(BitFitError):
        PeftModel.from_pretrained(base, adapter_dir, config=config)
    _assert_unchanged(base, before)


def test_allow_base_mismatch_applies_the_deltas(adapter_dir: Path) -> None:
    base = _bert(seed=1)  # same shapes, other weights: refused without the override (see above)
    config = bitfit_peft.allow_base_mismatch(BitFitConfig.from_pretrained(adapter_dir))
    model = PeftModel.from_pretrained(base, adapter_dir, config=config)
    saved = load_peft_weights(str(adapter_dir), device="cpu")
    reference = PeftModel.from_pretrained(_bert(seed=0), adapter_dir)
    ours = dict(model.named_parameters())
    for name, value in reference.named_parameters():
        if ".bitfit_delta." in name:
            assert torch.equal(ours[name], value), name
    assert saved  # the file was really read

    # load_adapter has no config argument: add the adapter with the override, then set its weights
    other = get_peft_model(_bert(seed=1), BitFitConfig(task_type="SEQ_CLS"), adapter_name="task_a")
    other.add_adapter("task_b", bitfit_peft.allow_base_mismatch(BitFitConfig.from_pretrained(adapter_dir)))
    set_peft_model_state_dict(other, saved, adapter_name="task_b")
    mine = dict(other.named_parameters())
    for name, value in reference.named_parameters():
        if name.endswith(".bitfit_delta.default"):
            assert torch.equal(mine[name.removesuffix("default") + "task_b"], value), name


# ---------------------------------------------------------------------------------------------- broken files
def _corruptions(data: bytes) -> dict[str, bytes]:
    header_len = int.from_bytes(data[:8], "little")
    flipped_header = bytearray(data)
    flipped_header[8 + header_len // 2] ^= 0xFF
    rng = random.Random(0)
    out = {
        "empty": b"",
        "4 bytes": data[:4],
        "header cut": data[: 8 + header_len // 2],
        "half": data[: len(data) // 2],
        "last byte missing": data[:-1],
        "random bytes": bytes(rng.getrandbits(8) for _ in range(len(data))),
        "text": b"this is not a safetensors file\n" * 8,
        "pickle": b"\x80\x04\x95" + data[3:64],
        "zip": b"PK\x03\x04" + data[4:],
        "huge header length": (2**40).to_bytes(8, "little") + data[8:],
        "flipped header byte": bytes(flipped_header),
    }
    for cut in sorted(rng.sample(range(1, len(data) - 1), 20)):  # more truncation points
        out[f"cut at {cut}"] = data[:cut]
    return out


def test_corrupt_safetensors_are_refused_clearly(adapter_dir: Path, tmp_path: Path) -> None:
    data = (adapter_dir / "adapter_model.safetensors").read_bytes()
    cases = _corruptions(data)
    for label, content in cases.items():
        path = tmp_path / label.replace(" ", "_")
        shutil.copytree(adapter_dir, path)
        (path / "adapter_model.safetensors").write_bytes(content)
        with pytest.raises((SafetensorError, BitFitError)) as err:
            PeftModel.from_pretrained(_bert(), path)
        text = str(err.value)
        assert any(w in text for w in ("corrupt or truncated", "deserializing header", "does not fit this model")), text
        _clear(err.value)
    assert len(cases) >= 30


@pytest.mark.parametrize("content", [b"garbage", b"\x80\x04K\x01."])
def test_failed_weight_read_leaves_base_untouched(adapter_dir: Path, tmp_path: Path, content: bytes) -> None:
    path = _copy(adapter_dir, tmp_path)
    if content.startswith(b"\x80"):  # a (harmless) pickle as adapter_model.bin
        (path / "adapter_model.safetensors").unlink()
        (path / "adapter_model.bin").write_bytes(content)
    else:
        (path / "adapter_model.safetensors").write_bytes(content)
    base = _bert()
    before = _snapshot(base)
    with pytest.raises(Exception):  # noqa: B017 - the point is what is left behind
        PeftModel.from_pretrained(base, path)
    _assert_unchanged(base, before)


def test_corrupt_safetensors_error_names_the_file(adapter_dir: Path, tmp_path: Path) -> None:
    path = _copy(adapter_dir, tmp_path)
    (path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises((SafetensorError, BitFitError)) as err:
        PeftModel.from_pretrained(_bert(), path)
    _clear(err.value, "adapter_model.safetensors", "corrupt")


CONFIG_CASES: dict[str, tuple[Callable[[dict], Any], type[BaseException], tuple[str, ...]]] = {
    # label: (edit, error type, words the message must contain)
    "bias_terms int": (lambda c: c.update(bias_terms=5), ValueError, ("bias_terms", "must be 'all' or a list")),
    "bias_terms unknown group": (lambda c: c.update(bias_terms=["nope"]), ValueError, ("unknown group", "nope")),
    "layers_to_transform negative": (lambda c: c.update(layers_to_transform=[-1]), ValueError, ("non-negative",)),
    "layers_to_transform out of range": (
        lambda c: c.update(layers_to_transform=[99]),
        BitFitError,
        ("no bias to tune", "layers_to_transform"),
    ),
    "layers_to_transform str": (lambda c: c.update(layers_to_transform="x"), ValueError, ("layers_to_transform",)),
    "add_missing_bias str": (lambda c: c.update(add_missing_bias="yes"), ValueError, ("must be a bool",)),
    "target_modules int": (lambda c: c.update(target_modules=3), ValueError, ("target_modules",)),
    "target_modules bad regex": (lambda c: c.update(target_modules="(("), ValueError, ("invalid regex",)),
    "base_fingerprint int": (lambda c: c.update(base_fingerprint=7), ValueError, ("base_fingerprint",)),
    "base_fingerprint other": (
        lambda c: c.update(base_fingerprint="sha256:" + "0" * 64),
        BitFitError,
        ("different base model",),
    ),
    "modules_to_save str": (lambda c: c.update(modules_to_save="classifier"), ValueError, ("modules_to_save",)),
    "task_type unknown": (lambda c: c.update(task_type="NOPE"), ValueError, ("invalid task type",)),
    "bias_terms missing (defaults to all) vs subset file": (
        lambda c: c.pop("bias_terms"),
        BitFitError,
        ("targeted modules differ",),  # other targets -> other fingerprint
    ),
}


@pytest.fixture(scope="module")
def subset_adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("subset")
    cfg = BitFitConfig(task_type="SEQ_CLS", bias_terms=["query", "intermediate"], init_weights=False)
    get_peft_model(_bert(), cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("label", sorted(CONFIG_CASES))
def test_bad_adapter_config_is_refused_clearly(subset_adapter_dir: Path, tmp_path: Path, label: str) -> None:
    edit, error, needles = CONFIG_CASES[label]
    path = _copy(subset_adapter_dir, tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    edit(config)
    (path / "adapter_config.json").write_text(json.dumps(config))
    base = _bert()
    before = _snapshot(base)
    with pytest.raises(error) as err:
        PeftModel.from_pretrained(base, path)
    _clear(err.value, *needles)
    _assert_unchanged(base, before)


def test_unknown_config_fields_are_ignored(subset_adapter_dir: Path, tmp_path: Path) -> None:
    path = _copy(subset_adapter_dir, tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["field_from_a_newer_version"] = 1
    (path / "adapter_config.json").write_text(json.dumps(config))
    PeftModel.from_pretrained(_bert(), path)


def test_invalid_json_is_a_value_error(subset_adapter_dir: Path, tmp_path: Path) -> None:
    path = _copy(subset_adapter_dir, tmp_path)
    (path / "adapter_config.json").write_text("{not json")
    base = _bert()
    before = _snapshot(base)
    with pytest.raises(ValueError, match="Expecting property name"):
        PeftModel.from_pretrained(base, path)
    _assert_unchanged(base, before)


@pytest.mark.parametrize("content", ['{"task_type": "SEQ_CLS"}', '{"peft_type": "BITFITX"}', "[1, 2]"])
def test_unknown_peft_type_fails_as_in_peft(subset_adapter_dir: Path, tmp_path: Path, content: str) -> None:
    """Not a BitFit config: PEFT's own error, exactly as for every other tuner (bitfit_peft does not reword it)."""
    path = _copy(subset_adapter_dir, tmp_path)
    (path / "adapter_config.json").write_text(content)
    base = _bert()
    before = _snapshot(base)
    with pytest.raises((KeyError, ValueError, TypeError)) as err:
        PeftModel.from_pretrained(base, path)
    assert not isinstance(err.value, BitFitError)
    _assert_unchanged(base, before)


# ---------------------------------------------------------------------------------------------- pickles
@pytest.fixture(scope="module")
def bin_adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bin")
    torch.manual_seed(0)
    model = get_peft_model(_bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    model.save_pretrained(path, safe_serialization=False)
    assert (path / "adapter_model.bin").is_file() and not (path / "adapter_model.safetensors").exists()
    return path


def test_malicious_pickle_is_not_executed(bin_adapter_dir: Path, tmp_path: Path) -> None:
    """PEFT loads ``.bin`` with ``torch.load(weights_only=True)``: code in the pickle never runs."""
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple:
            return (open, (str(marker), "w"))

    path = _copy(bin_adapter_dir, tmp_path)
    (path / "adapter_model.bin").write_bytes(pickle.dumps({"x": Exploit()}))
    with pytest.raises((pickle.UnpicklingError, BitFitError), match="Weights only load failed|is a pickle"):
        PeftModel.from_pretrained(_bert(), path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- NaN / Inf
def _poisoned(value: float, where: str = "last") -> PeftModel:
    torch.manual_seed(0)
    model = get_peft_model(_bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    deltas = [p for n, p in model.named_parameters() if ".bitfit_delta." in n]
    with torch.no_grad():
        (deltas[-1] if where == "last" else deltas[0])[0] = value
    return model


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_deltas_refused_on_safe_merge(value: float) -> None:
    model = _poisoned(value, where="first")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="NaN/Inf") as err:
        model.merge_adapter(safe_merge=True)
    _clear(err.value, "refusing to merge")
    for name, was in before["state"].items():
        torch.testing.assert_close(model.state_dict()[name], was, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_refusal_leaves_nothing_merged(how: str) -> None:
    model = _poisoned(float("nan"), where="last")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="NaN/Inf"):
        getattr(model, how)(safe_merge=True)
    assert before["modules"] == _snapshot(model)["modules"]
    assert not any(getattr(m, "merged", False) for m in model.modules() if isinstance(m, bitfit_peft.BitFitLayer))


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_refuses_overflow_into_a_half_precision_base(how: str) -> None:
    """Finite fp32 deltas that overflow an fp16 base bias are refused, naming the dtype; nothing changes."""
    torch.manual_seed(0)
    model = get_peft_model(_bert().half(), BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    deltas = [p for n, p in model.named_parameters() if ".bitfit_delta." in n]
    with torch.no_grad():
        deltas[-1][0] = 7e4  # finite in fp32, beyond fp16's 65,504
    before = _snapshot(model)
    with pytest.raises(ValueError) as err:
        getattr(model, how)(safe_merge=True)
    _clear(err.value, "overflows its torch.float16 bias", "nothing was merged")
    assert before["modules"] == _snapshot(model)["modules"]
    for name, was in before["state"].items():
        assert torch.equal(model.state_dict()[name], was), name
    merged = getattr(model, how)()  # the unsafe path merges as asked (documented)
    assert merged is None or isinstance(merged, nn.Module)


def test_safe_merge_refuses_a_non_finite_base_unless_allowed() -> None:
    torch.manual_seed(0)
    base = _bert()
    with torch.no_grad():
        base.bert.encoder.layer[0].attention.self.query.bias[0] = float("nan")
    model = get_peft_model(base, BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    with pytest.raises(ValueError) as err:
        model.merge_and_unload(safe_merge=True)
    _clear(err.value, "already holds NaN/Inf", "allow_nonfinite_base=True")
    assert not any(getattr(m, "merged", False) for m in model.modules() if isinstance(m, bitfit_peft.BitFitLayer))
    merged = model.merge_and_unload(safe_merge=True, allow_nonfinite_base=True)
    assert torch.isnan(merged.bert.encoder.layer[0].attention.self.query.bias[0])


def test_non_finite_deltas_warned_on_save(tmp_path: Path) -> None:
    model = _poisoned(float("nan"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path)
    messages = [str(w.message) for w in caught]
    assert any("NaN/Inf" in m and "broken" in m for m in messages), messages
