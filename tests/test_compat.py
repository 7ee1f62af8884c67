"""The declared patches (``bitfit_peft.compat.patches``): their targets still exist as we wrap them, and other
tuners see no difference with or without ``import bitfit_peft``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap

import peft
import peft.peft_model as peft_model
import pytest
import transformers
from peft.utils import save_and_load
from transformers.integrations.peft import PeftAdapterMixin

import bitfit_peft
from bitfit_peft.compat import patches as _compat
from bitfit_peft.compat.moved_modules import MOVED

#: (owner, attribute, parameters our wrapper relies on, in order)
TARGETS = [
    (peft_model.PeftModel, "from_pretrained", ["cls", "model", "model_id", "adapter_name", "is_trainable", "config"]),
    (peft_model.PeftModel, "load_adapter", ["self", "model_id", "adapter_name", "is_trainable"]),
    (PeftAdapterMixin, "load_adapter", ["self", "peft_model_id", "adapter_name", "peft_config", "adapter_state_dict"]),
    (peft_model.PeftModel, "_update_offload", ["self", "offload_index", "adapters_weights"]),
    (save_and_load, "_reshard_dtensor_values_for_load", ["model", "state_dict"]),
    (PeftAdapterMixin, "enable_adapters", ["self"]),
    (peft_model.PeftModel, "save_pretrained", ["self", "save_directory"]),
]
# peft 0.21.0 (the GPU image) has no DTensor re-shard walk, so there is nothing to skip: _compat installs no wrapper
TARGETS = [t for t in TARGETS if hasattr(t[0], t[1])]


@pytest.mark.parametrize("owner,attr,params", TARGETS, ids=[t[1] for t in TARGETS])
def test_patch_target_exists_with_the_signature_we_wrap(owner: object, attr: str, params: list[str]) -> None:
    current = inspect.getattr_static(owner, attr)
    current = current.__func__ if isinstance(current, classmethod) else current
    assert getattr(current, _compat.MARK, False), f"{attr} is not wrapped (did the import order change?)"
    original = inspect.unwrap(current)
    assert original is not current
    names = list(inspect.signature(original).parameters)
    assert names[: len(params)] == params, f"{attr} changed its signature in this PEFT/transformers: {names}"


def test_registration_gives_a_real_enum_member() -> None:
    assert peft.PeftType("BITFIT") is peft.PeftType.BITFIT is bitfit_peft.PEFT_TYPE
    assert "BITFIT" in peft.PeftType.__members__


def test_install_is_idempotent() -> None:
    before = [inspect.getattr_static(owner, attr) for owner, attr, _ in TARGETS]
    _compat.install()
    assert [inspect.getattr_static(owner, attr) for owner, attr, _ in TARGETS] == before


def test_no_other_peft_or_transformers_function_is_replaced() -> None:
    """Only the declared targets carry our mark."""
    marked = []
    for module in (peft_model, save_and_load, transformers.integrations.peft, peft.config):
        for owner_name, owner in [(module.__name__, module), *inspect.getmembers(module, inspect.isclass)]:
            for attr, value in vars(owner).items():
                value = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
                if getattr(value, _compat.MARK, False) or getattr(value, "_bitfit", False):
                    marked.append((getattr(owner, "__name__", owner_name), attr))
    assert sorted(set(marked)) == sorted({(getattr(o, "__name__", ""), a) for o, a, _ in TARGETS}), marked


_LORA_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys, tempfile, torch
    if sys.argv[1] == "with":
        import bitfit_peft  # noqa: F401
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors import safe_open

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    out = {}
    with tempfile.TemporaryDirectory() as d:
        model = get_peft_model(net(), LoraConfig(target_modules=["0", "2"], init_lora_weights=False))
        model.save_pretrained(d)
        with safe_open(os.path.join(d, "adapter_model.safetensors"), "pt") as f:
            out["keys"] = sorted(f.keys())
            out["meta"] = f.metadata()
            out["values"] = {k: f.get_tensor(k).sum().item() for k in f.keys()}
        cfg = json.load(open(os.path.join(d, "adapter_config.json")))
        cfg.pop("peft_version", None)
        out["config"] = cfg
        out["files"] = sorted(os.listdir(d))
        out["modes"] = sorted(oct(os.stat(os.path.join(d, n)).st_mode) for n in os.listdir(d))
        loaded = PeftModel.from_pretrained(net(), d)
        out["output"] = loaded(torch.ones(1, 8)).sum().item()
        loaded.load_adapter(d, adapter_name="second")
        out["adapters"] = sorted(loaded.peft_config)
        errors = {}
        for label, call in {
            "missing dir": lambda: PeftModel.from_pretrained(net(), os.path.join(d, "missing")),
            "no weights": lambda: (os.remove(os.path.join(d, "adapter_model.safetensors")),
                                   PeftModel.from_pretrained(net(), d)),
            "duplicate": lambda: loaded.load_adapter(d, adapter_name="second"),
            "bad type": lambda: (json.dump({"peft_type": "NOPE"}, open(os.path.join(d, "adapter_config.json"), "w")),
                                 PeftModel.from_pretrained(net(), d)),
        }.items():
            try:
                call()
                errors[label] = None
            except Exception as err:  # noqa: BLE001
                errors[label] = f"{type(err).__module__}.{type(err).__name__}: {str(err)[:200]}"
        out["errors"] = errors
    print(json.dumps(out, sort_keys=True))
    """
)


def _lora_run(mode: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # PEFT saves target_modules from a set: same order in both runs
    proc = subprocess.run(
        [sys.executable, "-c", _LORA_SCRIPT, mode], capture_output=True, text=True, timeout=180, check=False, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_lora_save_load_and_errors_are_identical_with_and_without_bitfit() -> None:
    without, with_bitfit = _lora_run("without"), _lora_run("with")
    assert without["errors"]["missing dir"] and without["errors"]["bad type"]
    errors_a = {k: (v or "").split(":")[0] for k, v in without.pop("errors").items()}
    errors_b = {k: (v or "").split(":")[0] for k, v in with_bitfit.pop("errors").items()}
    assert errors_a == errors_b
    assert without == with_bitfit


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_old_module_paths_still_import_with_a_deprecation_warning(old: str, new: str) -> None:
    """0.1.x paths (``bitfit_peft.hub``, ``bitfit_peft.layer``, ...) give the new module itself, and warn."""
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"{re.escape(old)} moved to {re.escape(new)}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert importlib.util.find_spec(old.rsplit(".", 1)[0] + ".no_such_module") is None  # other names: not ours


def test_from_import_of_a_moved_name_is_the_same_object() -> None:
    sys.modules.pop("bitfit_peft.layer", None)
    with pytest.warns(DeprecationWarning):
        from bitfit_peft.layer import BitFitLayer as OldBitFitLayer
    assert OldBitFitLayer is bitfit_peft.BitFitLayer
