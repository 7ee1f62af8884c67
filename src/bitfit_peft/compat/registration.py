"""Register BitFit as a PEFT tuner type.

PEFT 0.21 only registers methods whose name is already a :class:`peft.PeftType` member and has no plugin entry
points, so the enum gains a ``BITFIT`` member first (``_compat`` entry 1), then the config/tuner pair is put into
PEFT's mappings. :func:`is_bitfit` is the one test for "is this BitFit?".
"""

from __future__ import annotations

import warnings

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils.peft_types import PeftType, register_peft_method

from bitfit_peft.compat.patches import extend_peft_type
from bitfit_peft.names import PEFT_TYPE_NAME, PREFIX, is_bitfit  # noqa: F401 (re-exported for callers of 0.1)
from bitfit_peft.tuner.config import BitFitConfig
from bitfit_peft.tuner.model import BitFitModel


def register() -> PeftType:
    """Make ``"peft_type": "BITFIT"`` resolvable by every PEFT and transformers loading path.

    Safe to call any number of times. If another package already registered a different tuner under the same
    name, ours replaces it with a warning (the user imported ``bitfit_peft`` explicitly).
    """
    peft_type = extend_peft_type()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is BitFitModel:
        return peft_type
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING or peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        warnings.warn(
            f"PEFT already has a tuner registered as {PEFT_TYPE_NAME!r} "
            f"({PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)}); bitfit_peft replaces it for this process.",
            stacklevel=2,
        )
        for mapping in (
            PEFT_TYPE_TO_CONFIG_MAPPING,
            PEFT_TYPE_TO_TUNER_MAPPING,
            PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
            PEFT_TYPE_TO_PREFIX_MAPPING,
        ):
            mapping.pop(peft_type, None)
    register_peft_method(
        name=PEFT_TYPE_NAME.lower(),
        config_cls=BitFitConfig,
        model_cls=BitFitModel,
        prefix=PREFIX,
        is_mixed_compatible=False,
    )
    return peft_type
