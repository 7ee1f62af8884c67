"""The two narrow hooks PEFT has no extension point for (guarded, idempotent).

- ``peft.peft_model.safe_save_file``: BitFit state dicts are written stacked, stamped with the format version
  and base fingerprint, and atomically (temp file + ``os.replace``); other tuners' files pass through unchanged.
"""

from __future__ import annotations

import os

import peft.peft_model as _peft_model

from .delta_format import save_delta_file


def install() -> None:
    install_transformers_load_adapter()
    install_transactional_save()
    install_load_weights()
    install_load_rollback()
    install_peft_type_check()
    install_config_recover()
    install_offload_keys()
    install_skip_dtensor_reshard()
    from .hub import install as install_model_card

    install_model_card()  # BitFit model card on save_pretrained / push_to_hub (after the transactional save)
    if getattr(_peft_model.safe_save_file, "_bitfit", False):
        return
    original = _peft_model.safe_save_file

    def safe_save_file(tensors, filename, metadata=None):  # noqa: ANN001 - mirrors safetensors' signature
        if any(".bitfit_delta." in k for k in tensors):
            return save_delta_file(tensors, filename, metadata=metadata)
        return original(tensors, filename, metadata=metadata)

    safe_save_file._bitfit = True  # type: ignore[attr-defined]
    _peft_model.safe_save_file = safe_save_file


def _keys_for_transformers(weights: dict, config, adapter_name: str) -> dict:  # noqa: ANN001
    """File keys -> what transformers' ``load_adapter`` needs to reach our parameters.

    transformers renames ``<module>.bitfit_delta`` to ``<module>.bitfit_delta.<adapter>`` (the bank's parameter) by
    itself, so deltas lose their ``.delta`` suffix. Head (``modules_to_save``) keys get the wrapper's adapter path
    here, because only newer transformers releases (5.2x) map them (5.17 loaded no head and warned ``MISSING``).
    """
    from .delta_format import DELTA_SUFFIX

    heads = [str(t) for t in (getattr(config, "modules_to_save", None) or [])]
    out = {}
    for key, value in weights.items():
        if key.endswith(DELTA_SUFFIX):
            out[key.removesuffix(".delta")] = value
            continue
        module, _, leaf = key.rpartition(".")
        if ".modules_to_save." not in key and any(module == t or module.endswith("." + t) for t in heads):
            key = f"{module}.modules_to_save.{adapter_name}.{leaf}"
        out[key] = value
    return out


def install_transformers_load_adapter() -> None:
    """transformers' ``model.load_adapter(dir)`` reads adapter files itself: hand it the unstacked deltas."""
    from transformers.integrations.peft import PeftAdapterMixin

    original = PeftAdapterMixin.load_adapter
    if getattr(original, "_bitfit", False):
        return

    def load_adapter(
        self, peft_model_id=None, adapter_name=None, peft_config=None, adapter_state_dict=None, **kw
    ):
        if adapter_state_dict is None and peft_model_id is not None:
            from peft import PeftConfig
            from peft.utils.save_and_load import load_peft_weights

            from .delta_format import unpack

            hub_kwargs = {k: kw[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kw}
            config = peft_config or PeftConfig.from_pretrained(peft_model_id, **hub_kwargs)
            if getattr(config, "peft_type", None) == "BITFIT":
                weights = load_peft_weights(peft_model_id, device="cpu", **hub_kwargs)
                adapter_state_dict = _keys_for_transformers(unpack(weights), config, adapter_name or "default")
                peft_config = config
        return original(
            self,
            peft_model_id=peft_model_id,
            adapter_name=adapter_name,
            peft_config=peft_config,
            adapter_state_dict=adapter_state_dict,
            **kw,
        )

    load_adapter._bitfit = True  # type: ignore[attr-defined]
    load_adapter.__doc__ = original.__doc__
    PeftAdapterMixin.load_adapter = load_adapter


def _is_bitfit(peft_model) -> bool:  # noqa: ANN001
    configs = getattr(peft_model, "peft_config", {}) or {}
    return any(getattr(c, "peft_type", None) == "BITFIT" for c in configs.values())


def install_offload_keys() -> None:
    """Disk offload: PEFT's ``_update_offload`` names an offloaded adapter vector ``<file key>`` with the adapter
    name inserted before its last part (``...bitfit_delta.<adapter>.delta``, the LoRA layout); BitFit keeps all
    adapters of a layer in one bank, ``...bitfit_delta.<adapter>``. Re-key the offload index to the model's names
    (the tensor's name inside the offload file stays as written)."""
    original = _peft_model.PeftModel._update_offload
    if getattr(original, "_bitfit", False):
        return

    def _update_offload(self, offload_index, adapters_weights):  # noqa: ANN001
        result = original(self, offload_index, adapters_weights)
        if offload_index and _is_bitfit(self):
            for key in [k for k in offload_index if ".bitfit_delta." in k and k.endswith(".delta")]:
                offload_index[key.removesuffix(".delta")] = offload_index.pop(key)
        return result

    _update_offload._bitfit = True  # type: ignore[attr-defined]
    _peft_model.PeftModel._update_offload = _update_offload


def _may_hold_dtensors(model) -> bool:  # noqa: ANN001
    """Tensor parallel (transformers' ``_tp_size``) or FSDP2 (DTensor parameters) could be in play."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if (getattr(base, "_tp_size", None) or 1) > 1:
        return True
    first = next(iter(model.parameters()), None)
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(first, DTensor)


def install_skip_dtensor_reshard() -> None:
    """PEFT re-shards loaded tensors for DTensor models by building ``dict(model.named_parameters())`` on every load,
    whether or not the model holds DTensors; with hundreds of resident adapters that walk dominates a hot load.
    Skip it for BitFit models that cannot hold DTensors."""
    from peft.utils import save_and_load

    original = getattr(save_and_load, "_reshard_dtensor_values_for_load", None)
    if original is None or getattr(original, "_bitfit", False):  # absent before peft 0.21.1
        return

    def _reshard_dtensor_values_for_load(model, state_dict):  # noqa: ANN001
        if _is_bitfit(model) and not _may_hold_dtensors(model):
            return state_dict
        return original(model, state_dict)

    _reshard_dtensor_values_for_load._bitfit = True  # type: ignore[attr-defined]
    save_and_load._reshard_dtensor_values_for_load = _reshard_dtensor_values_for_load


def install_transactional_save() -> None:
    """``PeftModel.save_pretrained`` of a BitFit model saves all files as one unit (see ``atomic_save``)."""
    from .atomic_save import transactional_save

    original = _peft_model.PeftModel.save_pretrained
    if getattr(original, "_bitfit", False):
        return

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):  # noqa: ANN001
        if not _is_bitfit(self) or not is_main_process or os.path.isfile(save_directory):
            return original(self, save_directory, *args, is_main_process=is_main_process, **kwargs)
        transactional_save(
            save_directory,
            lambda staging: original(self, staging, *args, is_main_process=is_main_process, **kwargs),
        )

    save_pretrained._bitfit = True  # type: ignore[attr-defined]
    save_pretrained.__doc__ = original.__doc__
    _peft_model.PeftModel.save_pretrained = save_pretrained


def _bitfit_folder(model_id, subfolder: str | None) -> str | None:  # noqa: ANN001
    """The local folder of a BitFit adapter (None for other types and Hub ids that are not cached locally)."""
    import json

    folder = os.path.join(str(model_id), subfolder or "")
    try:
        with open(os.path.join(folder, "adapter_config.json")) as handle:
            return folder if json.load(handle).get("peft_type") == "BITFIT" else None
    except (OSError, ValueError, AttributeError):
        return None


def install_load_weights() -> None:
    from safetensors import SafetensorError

    from .atomic_save import recover
    from .delta_format import unpack
    from .model import BitFitError

    original = _peft_model.load_peft_weights
    if getattr(original, "_bitfit", False):
        return

    def load_peft_weights(model_id, device=None, **kwargs):  # noqa: ANN001
        folder = _bitfit_folder(model_id, kwargs.get("subfolder"))
        if folder is not None:
            recover(folder)
            has_safetensors = os.path.exists(os.path.join(folder, "adapter_model.safetensors"))
            if (
                not has_safetensors
                and os.path.exists(os.path.join(folder, "adapter_model.bin"))
                and os.environ.get("BITFIT_PEFT_ALLOW_PICKLE") != "1"
            ):
                raise BitFitError(
                    f"{folder}/adapter_model.bin is a pickle; bitfit-peft only loads safetensors by default. Re-save "
                    "the adapter with save_pretrained() (safetensors), or set BITFIT_PEFT_ALLOW_PICKLE=1 if you "
                    "trust its source (it is then read with torch.load(weights_only=True))."
                )
        try:
            weights = original(model_id, device=device, **kwargs)
        except SafetensorError as err:
            raise BitFitError(
                f"{folder or model_id}: adapter_model.safetensors is corrupt or truncated ({err}). Re-save the "
                "adapter, or re-download it with force_download=True."
            ) from err
        return unpack(weights) if any(".bitfit_delta." in k for k in weights) else weights

    load_peft_weights._bitfit = True  # type: ignore[attr-defined]
    _peft_model.load_peft_weights = load_peft_weights


def _training_state(model) -> tuple[list, list]:  # noqa: ANN001
    """The trainable parameters and every module's ``training`` flag, by object: no name building and no object
    per frozen parameter, since this runs before every adapter load and a model serving hundreds of adapters holds
    tens of thousands of frozen vectors (allocations there also wake Python's cyclic GC)."""
    modules = list(model.modules())
    trainable = [p for m in modules for p in m._parameters.values() if p is not None and p.requires_grad]
    return trainable, [(m, m.training) for m in modules]


def _restore_training_state(model, state) -> None:  # noqa: ANN001
    trainable, training = state
    for param in trainable:  # also those no longer reachable from the model (put back by the caller)
        param.requires_grad_(True)
    keep = {id(p) for p in trainable}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and param.requires_grad and id(param) not in keep:
                param.requires_grad_(False)
    for module, was_training in training:
        module.training = was_training


def _config_is_bitfit(model_id, kwargs) -> bool:  # noqa: ANN001
    config = kwargs.get("config")
    if config is not None:
        return getattr(config, "peft_type", None) == "BITFIT"
    try:
        from peft import PeftConfig

        return PeftConfig._get_peft_type(str(model_id), subfolder=kwargs.get("subfolder")) == "BITFIT"
    except Exception:
        return False


def install_load_rollback() -> None:
    from .layer import BitFitLayer
    from .model import BitFitError, _rollback, strip_wrappers

    peft_model_cls = _peft_model.PeftModel
    if getattr(peft_model_cls.load_adapter, "_bitfit_rollback", False):
        return
    original_from_pretrained = peft_model_cls.from_pretrained.__func__
    original_load_adapter = peft_model_cls.load_adapter

    def from_pretrained(cls, model, model_id, *args, **kwargs):  # noqa: ANN001
        if any(isinstance(m, BitFitLayer) for m in model.modules()):
            return original_from_pretrained(cls, model, model_id, *args, **kwargs)
        state = _training_state(model)
        try:
            return original_from_pretrained(cls, model, model_id, *args, **kwargs)
        except Exception as err:
            if not _config_is_bitfit(model_id, kwargs):
                raise
            strip_wrappers(model)
            _restore_training_state(model, state)
            if isinstance(err, BitFitError):
                raise
            raise BitFitError(
                f"Could not load the BitFit adapter from {model_id!r}: {type(err).__name__}: {err}. "
                "The model is unchanged."
            ) from err

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):  # noqa: ANN001
        if adapter_name in self.peft_config:
            return original_load_adapter(self, model_id, adapter_name, *args, **kwargs)
        state = _training_state(self)
        try:
            return original_load_adapter(self, model_id, adapter_name, *args, **kwargs)
        except Exception as err:
            config = self.peft_config.get(adapter_name)
            if config is not None and getattr(config, "peft_type", None) == "BITFIT" and len(self.peft_config) > 1:
                _rollback(self, adapter_name)
            elif config is None and not _config_is_bitfit(model_id, kwargs):
                raise
            _restore_training_state(self, state)
            if isinstance(err, BitFitError):
                raise
            raise BitFitError(
                f"Could not load BitFit adapter {adapter_name!r} from {model_id!r}: {type(err).__name__}: {err}. "
                "The model is unchanged."
            ) from err

    from_pretrained._bitfit_rollback = True  # type: ignore[attr-defined]
    load_adapter._bitfit_rollback = True  # type: ignore[attr-defined]
    load_adapter.__doc__ = original_load_adapter.__doc__
    peft_model_cls.from_pretrained = classmethod(from_pretrained)
    peft_model_cls.load_adapter = load_adapter


def install_peft_type_check() -> None:
    from peft.config import PeftConfig

    original = PeftConfig._get_peft_type.__func__
    if getattr(original, "_bitfit", False):
        return

    def _get_peft_type(cls, model_id, **hf_hub_download_kwargs):  # noqa: ANN001
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        try:
            peft_type = original(cls, model_id, **hf_hub_download_kwargs)
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"adapter_config.json at {model_id!r} has no 'peft_type' (or is not a JSON object): {err!r}. "
                "It is not a valid PEFT adapter config."
            ) from err
        if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
            raise ValueError(
                f"adapter_config.json at {model_id!r}: unknown peft_type {peft_type!r}. Known: "
                f"{sorted(map(str, PEFT_TYPE_TO_CONFIG_MAPPING))}. (BitFit adapters need `import bitfit_peft` first.)"
            )
        return peft_type

    _get_peft_type._bitfit = True  # type: ignore[attr-defined]
    PeftConfig._get_peft_type = classmethod(_get_peft_type)


def install_config_recover() -> None:
    from peft.config import PeftConfigMixin

    from .atomic_save import JOURNAL, recover

    original = PeftConfigMixin.from_pretrained.__func__
    if getattr(original, "_bitfit", False):
        return

    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):  # noqa: ANN001
        folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        if os.path.exists(os.path.join(folder, JOURNAL)) or os.path.exists(
            os.path.join(str(pretrained_model_name_or_path), JOURNAL)
        ):
            recover(pretrained_model_name_or_path)
            recover(folder)
        return original(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    from_pretrained._bitfit = True  # type: ignore[attr-defined]
    from_pretrained.__doc__ = original.__doc__
    PeftConfigMixin.from_pretrained = classmethod(from_pretrained)
