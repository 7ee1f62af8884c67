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
    if getattr(_peft_model.safe_save_file, "_bitfit", False):
        return
    original = _peft_model.safe_save_file

    def safe_save_file(tensors, filename, metadata=None):  # noqa: ANN001 - mirrors safetensors' signature
        if any(".bitfit_delta." in k for k in tensors):
            return save_delta_file(tensors, filename, metadata=metadata)
        return original(tensors, filename, metadata=metadata)

    safe_save_file._bitfit = True  # type: ignore[attr-defined]
    _peft_model.safe_save_file = safe_save_file


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
                adapter_state_dict = unpack(weights)
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
