"""BitFit training: reading files and Hub datasets (:mod:`.sources`), validating them for a task (:mod:`.data`),
the options of a run (:class:`TrainArgs`, :mod:`.args`), the default recipe (:mod:`.recipe`),
``learning_rate="auto"`` (:mod:`.lr_finder`) and a Trainer-based :func:`train` (:mod:`.train`)."""

from __future__ import annotations

from bitfit_peft.training.args import OptionError, TrainArgs
from bitfit_peft.training.callbacks import BitFitCardCallback
from bitfit_peft.training.data import TaskData, demo_data_path, load_task_data
from bitfit_peft.training.distributed import (
    block_classes,
    fsdp_auto_wrap_policy,
    save_sharded_adapter,
    shard_bitfit_model,
)
from bitfit_peft.training.lr_finder import AUTO_LR_GRID, LRSearchResult, find_learning_rate
from bitfit_peft.training.recipe import DEMO_DEFAULTS, RECIPE, Recipe
from bitfit_peft.training.sources import DataError
from bitfit_peft.training.train import (
    BitFitTrainer,
    TrainResult,
    bitfit_param_groups,
    load_trained,
    train,
)

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
