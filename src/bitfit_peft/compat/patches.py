"""Every change bitfit-peft makes to PEFT or transformers code, in one place (installed on import, idempotent).

Each entry says what it replaces, why an out-of-tree tuner cannot do without it, and the versions it was tested
with (peft 0.21.0-0.21.2, transformers 5.17-5.24). ``tests/test_compat.py`` fails if a target moves or changes its
signature, and shows that LoRA's save, load and errors are identical with and without ``import bitfit_peft``.

| # | target | why |
|---|---|---|
| 1 | ``peft.utils.peft_types.PeftType`` members | ``register_peft_method`` refuses names that are not members yet |
| 2 | ``peft.PeftModel.from_pretrained`` / ``load_adapter`` | PEFT injects before it reads the weights, so a refused |
|   |                                                   | BitFit file would leave the model changed: roll back, and |
|   |                                                   | refuse files that resolve outside the adapter folder. On a |
|   |                                                   | base dispatched with cpu/disk modules and no dispatch |
|   |                                                   | arguments PEFT strips the offload hooks, then re-dispatches |
|   |                                                   | with "auto" (meta weights: fails): hide ``hf_device_map`` |
|   |                                                   | for the load (``offload.kept_dispatch``) so the base keeps |
|   |                                                   | its dispatch and the deltas stay in memory |
| 3 | ``transformers ... PeftAdapterMixin.load_adapter`` | it reads adapter files itself, past PEFT's load hook: the |
|   |                                                   | strict key check and (5.17) the head keys happen here |
| 4 | ``peft.PeftModel._update_offload`` | disk offload names adapter tensors in LoRA's layout (name before |
|   |                                    | the last key part); a ParameterDict tuner needs it after |
| 5 | ``peft.utils.save_and_load._reshard_dtensor_values_for_load`` | an O(parameters) walk on every load; skipped |
|   |                                    | for BitFit models that cannot hold DTensors (hot loads stay O(adapter)) |
| 6 | ``transformers ... PeftAdapterMixin.enable_adapters`` | ``disable_adapters`` disables the task heads |
|   |                                    | (``ModulesToSaveWrapper``) but ``enable_adapters`` re-enables only tuner |
|   |                                    | layers, so the head stayed the base's (upstream, LoRA too): re-enable them |
| 7 | ``peft.PeftModel.save_pretrained`` | PEFT writes ``README.md`` before the state dict, so a save the BitFit |
|   |                                    | tuner refuses (fp16 overflow) left a card: a refused save of a BitFit |
|   |                                    | model removes what it wrote and restores a card it changed |

Per-sample heads in mixed batches (``heads.route_heads``) set ``forward`` on the ``ModulesToSaveWrapper`` instances of
a BitFit model only (no class is changed). Every other tuner's behaviour is untouched: each wrapper passes through
unless the config or model at hand is BitFit.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft.peft_model as _peft_model
from peft import PeftConfig
from peft.utils import ModulesToSaveWrapper, save_and_load
from peft.utils.constants import CONFIG_NAME
from peft.utils.peft_types import PeftType
from safetensors import SafetensorError
from transformers.integrations.peft import PeftAdapterMixin

from bitfit_peft.compat import offload
from bitfit_peft.compat.task_head import fit_head, head_size_error
from bitfit_peft.compat.transformers_io import read_checked_state_dict
from bitfit_peft.errors import BitFitError
from bitfit_peft.files.delta_format import from_legacy
from bitfit_peft.files.validate import check_adapter_folder, check_plain_file, local_adapter_folder, read_config
from bitfit_peft.names import PEFT_TYPE_NAME, is_bitfit
from bitfit_peft.tasks import auto_model_class
from bitfit_peft.tuner.layer import BitFitLayer
from bitfit_peft.tuner.model import _rollback
from bitfit_peft.tuner.unwrap import strip_wrappers, unwrap_new, wrapper_ids

MARK = "_bitfit_compat"


def _wrap(owner: Any, attr: str, make: Callable[[Callable], Callable], kind: str = "function") -> None:
    """Replace ``owner.attr`` by ``make(original)`` once (marked, so a second import changes nothing)."""
    raw = owner.__dict__[attr] if attr in owner.__dict__ else getattr(owner, attr)
    original = raw.__func__ if isinstance(raw, classmethod) else raw
    if getattr(original, MARK, False):
        return
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, MARK, True)
    setattr(owner, attr, classmethod(wrapper) if kind == "classmethod" else wrapper)


# ---------------------------------------------------------------------------------------------- 1: PeftType
def extend_peft_type(name: str = PEFT_TYPE_NAME) -> PeftType:
    """Add ``name`` to :class:`PeftType` unless it is already there; return the member."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


# ---------------------------------------------------------------------------------------------- 2: rollback
def _training_state(model: Any) -> tuple[list, list]:
    """Trainable parameters and ``training`` flags, by object (no names, no object per frozen parameter)."""
    modules = list(model.modules())
    trainable = [p for m in modules for p in m._parameters.values() if p is not None and p.requires_grad]
    return trainable, [(m, m.training) for m in modules]


def _restore_training_state(model: Any, state: tuple[list, list]) -> None:
    trainable, training = state
    for param in trainable:
        param.requires_grad_(True)
    keep = {id(p) for p in trainable}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and param.requires_grad and id(param) not in keep:
                param.requires_grad_(False)
    for module, was_training in training:
        module.training = was_training


def _has_bitfit_layers(model: Any) -> bool:

    return any(isinstance(m, BitFitLayer) for m in model.modules())


def _check_local_folder(model_id: Any, kwargs: dict) -> None:
    """The file-level checks of a local adapter folder (``files.validate``): its config for every tuner (a hostile
    config is refused whatever it claims to be), its weights files too when it is a BitFit adapter."""
    folder = local_adapter_folder(model_id, kwargs.get("subfolder"))
    if folder is None or check_plain_file(folder, CONFIG_NAME) is None:
        return  # a Hub id (its files are checked when read), or no config: PEFT reports it as for any tuner
    config = read_config(folder / CONFIG_NAME, lenient=True)  # not JSON / not an object: PEFT's own error
    if config is not None and is_bitfit(config):
        check_adapter_folder(folder)


def _load_error(err: Exception, what: str, config: Any = None) -> BitFitError:
    if isinstance(err, BitFitError):  # a head of another size: which num_labels to pass
        return head_size_error(err, auto_model_class(getattr(config, "task_type", None)).__name__) or err
    problem = f"{type(err).__name__}: {err}"
    if isinstance(err, SafetensorError):
        problem = f"adapter_model.safetensors is corrupt or truncated ({err}); re-save or re-download it"
    elif isinstance(err, KeyError):  # PEFT maps each modules_to_save tensor by key before our strict check runs
        problem = f"the file lacks {err} (a modules_to_save tensor of the config)"
    message = f"Could not load {what}: {problem}. The model is unchanged."
    return BitFitError(message.replace("\n", " "))


def _bitfit_config(model_id: Any, args: tuple, kwargs: dict) -> Any:
    """The adapter config ``PeftModel.from_pretrained`` will use, when it is BitFit's (else None)."""
    config = kwargs.get("config", args[2] if len(args) > 2 else None)
    if config is None:
        hub_kwargs = {k: kwargs[k] for k in ("subfolder", "revision", "token", "cache_dir") if k in kwargs}
        try:
            config = PeftConfig.from_pretrained(str(model_id), **hub_kwargs)
        except Exception:  # PEFT reports it, as it would without bitfit_peft
            return None
    return config if is_bitfit(config) else None


def _from_pretrained(original: Callable) -> Callable:
    def from_pretrained(cls, model, model_id, *args, **kwargs):  # noqa: ANN001 - mirrors PEFT's signature
        _check_local_folder(model_id, kwargs)
        if _has_bitfit_layers(model):
            return original(cls, model, model_id, *args, **kwargs)
        state = _training_state(model)
        attributes = set(vars(model))
        keep = offload.keeps_dispatch(model, kwargs) and offload.source_is_bitfit(model_id, kwargs)
        config = _bitfit_config(model_id, args, kwargs)
        undo_head = fit_head(model, config)  # the adapter's head size and labels; raises before any change
        try:
            with offload.kept_dispatch(model) if keep else contextlib.nullcontext():
                return original(cls, model, model_id, *args, **kwargs)
        except Exception as err:
            if not (_has_bitfit_layers(model) or isinstance(err, BitFitError)):  # not a BitFit load: PEFT's error
                undo_head()
                raise

            strip_wrappers(model)
            undo_head()
            _restore_training_state(model, state)
            for name in set(vars(model)) - attributes:  # PEFT's traces on the base (``peft_config``...)
                delattr(model, name)
            raise _load_error(err, f"the BitFit adapter from {str(model_id)!r}", config) from err

    return from_pretrained


def _load_adapter(original: Callable) -> Callable:
    def load_adapter(self, model_id, adapter_name, *args, **kwargs):  # noqa: ANN001 - mirrors PEFT's signature
        _check_local_folder(model_id, kwargs)
        if adapter_name in self.peft_config:
            return original(self, model_id, adapter_name, *args, **kwargs)
        state = _training_state(self)

        wrapped = wrapper_ids(self)
        keep = is_bitfit(self) and offload.keeps_dispatch(self, kwargs)  # one PeftModel holds one tuner type
        try:
            with offload.kept_dispatch(self) if keep else contextlib.nullcontext():
                return original(self, model_id, adapter_name, *args, **kwargs)
        except Exception as err:
            config = self.peft_config.get(adapter_name)
            if not (is_bitfit(config) or (config is None and isinstance(err, BitFitError) and is_bitfit(self))):
                raise  # not a BitFit load (ours are rolled back already when the strict check refused)

            _rollback(self, adapter_name)
            unwrap_new(self, wrapped)  # modules this load wrapped (new targets) are put back as they were
            _restore_training_state(self, state)
            raise _load_error(err, f"BitFit adapter {adapter_name!r} from {str(model_id)!r}", config) from err

    return load_adapter


# ---------------------------------------------------------------------------------------------- 3: transformers
def _transformers_load_adapter(original: Callable) -> Callable:
    def load_adapter(self, peft_model_id=None, adapter_name=None, peft_config=None, adapter_state_dict=None, **kw):  # noqa: ANN001
        if adapter_state_dict is None and peft_model_id is not None:
            hub_kwargs = {k: kw[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kw}
            config = peft_config
            if config is None:
                try:
                    _check_local_folder(peft_model_id, hub_kwargs)
                    config = PeftConfig.from_pretrained(peft_model_id, **hub_kwargs)
                except BitFitError:
                    raise
                except Exception:  # transformers reports it, exactly as it would without bitfit_peft
                    config = None
            if is_bitfit(config):

                adapter_state_dict = read_checked_state_dict(self, peft_model_id, config, adapter_name, hub_kwargs)
                peft_config = config
        return original(
            self,
            peft_model_id=peft_model_id,
            adapter_name=adapter_name,
            peft_config=peft_config,
            adapter_state_dict=adapter_state_dict,
            **kw,
        )

    return load_adapter


# ---------------------------------------------------------------------------------------------- 6: heads
def _enable_adapters(original: Callable) -> Callable:
    def enable_adapters(self):  # noqa: ANN001 - mirrors transformers' signature
        original(self)
        if any(is_bitfit(c) for c in (getattr(self, "peft_config", None) or {}).values()):
            for module in self.modules():
                if isinstance(module, ModulesToSaveWrapper):
                    module.enable_adapters(True)

    return enable_adapters


# ---------------------------------------------------------------------------------------------- 4: offload keys
def _update_offload(original: Callable) -> Callable:
    def update_offload(self, offload_index, adapters_weights):  # noqa: ANN001 - mirrors PEFT's signature
        bitfit = any(is_bitfit(c) for c in self.peft_config.values())
        if bitfit:

            adapters_weights = from_legacy(adapters_weights)
        result = original(self, offload_index, adapters_weights)
        if offload_index and bitfit:
            for adapter in self.peft_config:
                marker = f".{adapter}.bitfit_delta"
                for key in [k for k in offload_index if k.endswith(marker)]:  # LoRA layout -> ParameterDict layout
                    offload_index[key.removesuffix(marker) + f".bitfit_delta.{adapter}"] = offload_index.pop(key)
        return result

    return update_offload


# ---------------------------------------------------------------------------------------------- 5: DTensor walk
def _may_hold_dtensors(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if (getattr(base, "_tp_size", None) or 1) > 1:
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(next(iter(model.parameters()), None), DTensor)


def _reshard(original: Callable) -> Callable:
    def reshard(model, state_dict):  # noqa: ANN001 - mirrors PEFT's signature
        configs = getattr(model, "peft_config", {}) or {}
        if any(is_bitfit(c) for c in configs.values()) and not _may_hold_dtensors(model):
            return state_dict
        return original(model, state_dict)

    return reshard


# ---------------------------------------------------------------------------------------------- 6: refused saves
def _save_pretrained(original: Callable) -> Callable:
    def save_pretrained(self, save_directory, *args, **kwargs):  # noqa: ANN001 - mirrors PEFT's signature
        if not is_bitfit(self) or not isinstance(save_directory, (str, os.PathLike)):
            return original(self, save_directory, *args, **kwargs)
        folder = os.fspath(save_directory)
        new_folder = not os.path.lexists(folder)
        card = os.path.join(folder, "README.md")
        old_card = None if new_folder or not os.path.isfile(card) else Path(card).read_bytes()
        before = set() if new_folder or not os.path.isdir(folder) else set(os.listdir(folder))
        try:
            return original(self, save_directory, *args, **kwargs)
        except Exception:
            if new_folder:
                shutil.rmtree(folder, ignore_errors=True)  # made by this save: nothing of it stays
            elif os.path.isdir(folder):
                for name in set(os.listdir(folder)) - before - {"README.md"}:
                    path = os.path.join(folder, name)
                    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
                if old_card is not None:
                    Path(card).write_bytes(old_card)
                elif "README.md" not in before and os.path.isfile(card):
                    os.unlink(card)
            raise

    return save_pretrained


def install() -> None:
    """Install every entry of the table above (idempotent)."""
    extend_peft_type()
    _wrap(_peft_model.PeftModel, "from_pretrained", _from_pretrained, kind="classmethod")
    _wrap(_peft_model.PeftModel, "load_adapter", _load_adapter)
    _wrap(PeftAdapterMixin, "load_adapter", _transformers_load_adapter)
    _wrap(_peft_model.PeftModel, "_update_offload", _update_offload)
    _wrap(PeftAdapterMixin, "enable_adapters", _enable_adapters)
    _wrap(_peft_model.PeftModel, "save_pretrained", _save_pretrained)
    if hasattr(save_and_load, "_reshard_dtensor_values_for_load"):  # absent before peft 0.21.1
        _wrap(save_and_load, "_reshard_dtensor_values_for_load", _reshard)
