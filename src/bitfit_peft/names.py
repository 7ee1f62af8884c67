"""Names shared by every part of the package: a leaf module (imports nothing of the package).

Example:
    >>> from bitfit_peft.names import is_bitfit
    >>> is_bitfit({"peft_type": "BITFIT"}), is_bitfit({"peft_type": "LORA"})
    (True, False)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"

PEFT_TYPE_NAME = "BITFIT"  #: the ``peft_type`` of a BitFit ``adapter_config.json``
PREFIX = "bitfit_"  #: the tuner prefix PEFT uses to tell adapter parameters from base ones
PEFT_PREFIX = "base_model.model."  #: what PeftModel puts before every module name in a state dict
DELTA_KEY = "bitfit_delta"  #: the layer's ParameterDict: model key ``<module>.bitfit_delta.<adapter>``
SUMMARY_FILE = "bitfit_training.json"  #: what ``bitfit-peft train`` writes beside the adapter
ADAPTER_FILE = "adapter_model.safetensors"  #: PEFT's ``SAFETENSORS_WEIGHTS_NAME``
CONFIG_FILE = "adapter_config.json"  #: PEFT's ``CONFIG_NAME``
#: ``quantize=`` schemes (``bitfit_peft.compat.quantized.SCHEMES`` builds each)
QUANT_SCHEMES: tuple[str, ...] = ("nf4", "fp4", "int8", "torchao-int8")
#: ``BitFitConfig.save_dtype`` values (``bitfit_peft.tuner.config.SAVE_DTYPES`` maps them to torch dtypes)
SAVE_DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
DEFAULT_TOLERANCE = 1e-4  #: mean |delta| below which ``bitfit-peft inspect`` calls a bias vector prunable


def is_bitfit(obj: Any) -> bool:
    """Whether ``obj`` is a BitFit config (object or ``adapter_config.json`` dict) or a model holding one."""
    if isinstance(obj, dict):
        return obj.get("peft_type") == PEFT_TYPE_NAME
    configs = getattr(obj, "peft_config", None)
    if isinstance(configs, dict):
        return any(is_bitfit(c) for c in configs.values())
    return getattr(obj, "peft_type", None) == PEFT_TYPE_NAME
