"""The checks of :class:`~bitfit_peft.training.args.TrainArgs`' values: each field's type (a CLI string parsed, a path
as str, a list as tuple) and the rules between fields, as one-line :class:`OptionError` naming the field and the fix.

Example:
    >>> from bitfit_peft.training.arg_checks import OptionError
    >>> OptionError("batch_size", "batch_size must be > 0, got 0").field
    'batch_size'
"""

from __future__ import annotations

import math
import os
import types
import typing
from dataclasses import Field
from pathlib import Path
from typing import Any

from bitfit_peft.errors import BitFitError
from bitfit_peft.names import QUANT_SCHEMES
from bitfit_peft.training.lr_finder import check_grid
from bitfit_peft.training.sources import DataError
from bitfit_peft.training.task_names import SEQUENCE_TASKS, normalize_task


class OptionError(BitFitError):
    """A bad value of a ``TrainArgs`` field; ``field`` names it, the message says what is wrong and the fix."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


# ------------------------------------------------------------------------------------------- coercion and checks
def coerce(f: Field, hint: Any, value: Any) -> Any:
    """``value`` as the field's type (a CLI string parsed, a path as str, a list as tuple), or :class:`OptionError`."""
    allowed = _members(hint)
    if isinstance(value, str) and "parse" in f.metadata:
        value = f.metadata["parse"](value)
    if isinstance(value, os.PathLike) and str in allowed:
        value = os.fspath(value)
    elif isinstance(value, str) and Path in allowed:
        value = Path(value)
    elif isinstance(value, list) and any(typing.get_origin(h) is tuple for h in allowed):
        value = tuple(value)
    elif isinstance(value, int) and not isinstance(value, bool) and float in allowed and int not in allowed:
        value = float(value)
    if not any(_conforms(value, h) for h in allowed):
        raise OptionError(f.name, f"{f.name} must be {' or '.join(_describe(h) for h in allowed)}, got {value!r}")
    return value


def _members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _conforms(value: Any, hint: Any) -> bool:
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(_conforms(v, item) for v in value)
    if hint in (int, float):
        return isinstance(value, hint) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a tuple of {_describe(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    names = {int: "an integer", float: "a number", str: "a string", bool: "True or False", Path: "a path"}
    return names.get(hint, "None" if hint is type(None) else getattr(hint, "__name__", str(hint)))


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise OptionError(name, message)


def check(a: Any) -> None:
    """The rules between values and fields: one-line :class:`OptionError` naming the field and the fix."""
    try:
        object.__setattr__(a, "task", normalize_task(a.task))
    except DataError as err:
        raise OptionError("task", str(err)) from None
    lr = a.learning_rate
    _require(lr == "auto" or (isinstance(lr, float) and math.isfinite(lr) and lr > 0), "learning_rate",
             f"learning_rate must be a positive number or 'auto', got {lr!r}; e.g. 1e-2")  # fmt: skip
    try:
        object.__setattr__(a, "auto_lr_grid", check_grid(a.auto_lr_grid))
    except ValueError as err:
        raise OptionError("auto_lr_grid", str(err)) from None
    _check_ranges(a)
    _check_targets(a)
    _require(a.cls_attention_init in (True, False, "auto"), "cls_attention_init",
             f"cls_attention_init must be True, False or 'auto', got {a.cls_attention_init!r}")  # fmt: skip
    _require(a.cls_attention_init is not True or a.task in SEQUENCE_TASKS, "cls_attention_init",
             f"cls_attention_init applies to seq-cls and regression tasks, not {a.task!r}; drop it")  # fmt: skip
    _require(a.restore_best_epoch is not False or not a.early_stopping_patience, "restore_best_epoch",
             "early stopping keeps the best epoch: drop early_stopping_patience or restore_best_epoch")  # fmt: skip
    _require(not (a.bf16 and a.fp16), "fp16", "bf16 and fp16 are both on; choose one mixed precision")
    _require(a.quantize is None or a.quantize in QUANT_SCHEMES, "quantize",
             f"quantize must be one of {', '.join(QUANT_SCHEMES)} (or None), got {a.quantize!r}")  # fmt: skip


def _check_ranges(a: Any) -> None:
    from transformers import SchedulerType  # here, not at the top: the CLI's --help imports this module

    _require(0.0 <= a.warmup_ratio < 1.0, "warmup_ratio", f"warmup_ratio must be in [0, 1), got {a.warmup_ratio}")
    _require(a.num_epochs > 0, "num_epochs", f"num_epochs must be > 0, got {a.num_epochs}")
    names = [t.value for t in SchedulerType]
    _require(a.lr_scheduler_type in names, "lr_scheduler_type",
             f"unknown lr_scheduler_type {a.lr_scheduler_type!r}; choose one of {', '.join(names)}")  # fmt: skip
    _require(0.0 < a.dev_fraction < 1.0, "dev_fraction", f"dev_fraction must be in (0, 1), got {a.dev_fraction}")
    positive: dict[str, Any] = {
        "head_learning_rate": a.head_learning_rate, "batch_size": a.batch_size, "eval_batch_size": a.eval_batch_size,
        "max_length": a.max_length, "max_train_samples": a.max_train_samples, "max_eval_samples": a.max_eval_samples,
        "save_total_limit": a.save_total_limit, "gradient_accumulation_steps": a.gradient_accumulation_steps,
    }  # fmt: skip
    for name, value in positive.items():
        _require(value is None or value > 0, name, f"{name} must be > 0, got {value}")
    for name in ("weight_decay", "early_stopping_patience"):
        _require(getattr(a, name) >= 0, name, f"{name} must be >= 0, got {getattr(a, name)}")


def _check_targets(a: Any) -> None:
    """The checks ``BitFitConfig`` will make of ``bias_terms`` / ``target_modules``, before anything is loaded."""
    from bitfit_peft.tuner.config import BitFitConfig  # deferred: peft and torch load when a run is checked

    terms, modules = a.bias_terms, a.target_modules
    _require(modules is None or terms == "all", "target_modules",
             "target_modules replaces bias_terms: pass one of --bias-terms and --target-modules")  # fmt: skip
    try:
        BitFitConfig(bias_terms=terms if isinstance(terms, str) else list(terms))
    except ValueError as err:
        message = str(err).replace("use target_modules", "use target_modules (--target-modules)")
        raise OptionError("bias_terms", message) from None
    try:
        BitFitConfig(target_modules=modules if modules is None or isinstance(modules, str) else list(modules))
    except ValueError as err:
        raise OptionError("target_modules", str(err)) from None
