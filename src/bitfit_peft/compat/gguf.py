"""GGUF base models: ``--model`` / ``load_base_model`` accept a ``.gguf`` file, dequantized by transformers.

A GGUF base is named by its file: a local path (``models/SmolLM2-135M-Instruct.Q4_1.gguf``) or a Hub repo id plus the
file name (``HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q8_0.gguf``). transformers loads it with
``gguf_file=`` (needs the ``gguf`` package) and dequantizes it to a plain float model (``GgufConfig(dequantize=True)``:
not flagged as quantized, so training, merging and ``save_pretrained`` work as for any model). The adapter config
then records the folder / repo as ``base_model_name_or_path`` (transformers' ``name_or_path``), and
``AutoPeftModelForCausalLM.from_pretrained(adapter, gguf_file=<file name>)`` loads the base again.

Example:
    >>> split_gguf("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/model.Q8_0.gguf")
    ('HuggingFaceTB/SmolLM2-135M-Instruct-GGUF', 'model.Q8_0.gguf')
    >>> split_gguf("bert-base-uncased")
    ('bert-base-uncased', None)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bitfit_peft.errors import BitFitError

GGUF_SUFFIX = ".gguf"


class GgufNameError(BitFitError):
    """A ``.gguf`` model name that names neither a local file nor ``<repo id>/<file>.gguf``."""


def split_gguf(name: str) -> tuple[str, str | None]:
    """``(folder or repo id, gguf file name)`` of a model name ending in ``.gguf``; ``(name, None)`` otherwise."""
    if not str(name).lower().endswith(GGUF_SUFFIX):
        return name, None
    path = Path(name)
    if path.is_file():
        return str(path.parent), path.name
    parts = str(name).split("/")
    if len(parts) < 3 or any(not p for p in parts) or str(name).startswith((".", "~")):
        raise GgufNameError(
            f"GGUF model {name!r} is neither a local file nor '<owner>/<repo>/<file>.gguf' on the Hub; "
            "check the path (e.g. --model models/SmolLM2-135M-Instruct.Q4_1.gguf)"
        )
    return "/".join(parts[:-1]), parts[-1]


def gguf_load_kwargs(gguf_file: str | None) -> dict[str, Any]:
    """``from_pretrained`` keywords that load ``gguf_file`` as a plain (dequantized) model; ``{}`` for None."""
    if gguf_file is None:
        return {}
    from transformers import GgufConfig  # deferred: only GGUF loads need it (transformers imports gguf lazily)

    return {"gguf_file": gguf_file, "quantization_config": GgufConfig(dequantize=True)}


def gguf_tokenizer_kwargs(gguf_file: str | None) -> dict[str, Any]:
    """``AutoTokenizer.from_pretrained`` keywords for a tokenizer stored in ``gguf_file``; ``{}`` for None."""
    return {} if gguf_file is None else {"gguf_file": gguf_file}
