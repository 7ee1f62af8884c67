"""BitFit training: reading files and Hub datasets (:mod:`.sources`), validating them for a task (:mod:`.data`),
the options of a run (:class:`TrainArgs`, :mod:`.args`), the default recipe (:mod:`.recipe`),
``learning_rate="auto"`` (:mod:`.lr_finder`) and a Trainer-based :func:`train` (:mod:`.train`)."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

#: where each public name lives (loaded on first use: ``bitfit_peft.training.args`` stays light for the CLI)
_HOMES = {
    "OptionError": "args", "TrainArgs": "args",
    "BitFitCardCallback": "callbacks",
    "TaskData": "data", "demo_data_path": "data", "load_task_data": "data",
    "block_classes": "distributed", "fsdp_auto_wrap_policy": "distributed", "save_sharded_adapter": "distributed",
    "shard_bitfit_model": "distributed",
    "AUTO_LR_GRID": "lr_finder", "LRSearchResult": "lr_finder", "find_learning_rate": "lr_finder",
    "DEMO_DEFAULTS": "recipe", "RECIPE": "recipe", "Recipe": "recipe",
    "DataError": "sources",
    "BitFitTrainer": "train", "TrainResult": "train", "bitfit_param_groups": "train", "load_trained": "train",
    "train": "train",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'bitfit_peft.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"bitfit_peft.training.{_HOMES[name]}"), name)


class _Package(types.ModuleType):
    """``bitfit_peft.training.train`` is the function: importing the submodule of that name must not replace it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and isinstance(value, types.ModuleType):
            value = value.train
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "AUTO_LR_GRID",
    "BitFitCardCallback",
    "DEMO_DEFAULTS",
    "RECIPE",
    "BitFitTrainer",
    "DataError",
    "LRSearchResult",
    "OptionError",
    "Recipe",
    "TaskData",
    "TrainArgs",
    "TrainResult",
    "bitfit_param_groups",
    "block_classes",
    "demo_data_path",
    "find_learning_rate",
    "fsdp_auto_wrap_policy",
    "load_task_data",
    "load_trained",
    "save_sharded_adapter",
    "shard_bitfit_model",
    "train",
]
