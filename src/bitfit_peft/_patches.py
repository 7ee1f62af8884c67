"""The two narrow hooks PEFT has no extension point for (guarded, idempotent).

- ``peft.peft_model.safe_save_file``: BitFit state dicts are written stacked, stamped with the format version
  and base fingerprint, and atomically (temp file + ``os.replace``); other tuners' files pass through unchanged.
"""

from __future__ import annotations

import peft.peft_model as _peft_model

from .delta_format import save_delta_file


def install() -> None:
    if getattr(_peft_model.safe_save_file, "_bitfit", False):
        return
    original = _peft_model.safe_save_file

    def safe_save_file(tensors, filename, metadata=None):  # noqa: ANN001 - mirrors safetensors' signature
        if any(".bitfit_delta." in k for k in tensors):
            return save_delta_file(tensors, filename, metadata=metadata)
        return original(tensors, filename, metadata=metadata)

    safe_save_file._bitfit = True  # type: ignore[attr-defined]
    _peft_model.safe_save_file = safe_save_file
