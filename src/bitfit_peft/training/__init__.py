"""BitFit training: dataset loading (:mod:`.data`) and a Trainer-based :func:`train` (:mod:`.train`)."""

from __future__ import annotations

from .data import DataError, TaskData, demo_data_path, load_task_data
from .train import DEFAULTS, DEMO_DEFAULTS, BitFitTrainer, TrainResult, bitfit_param_groups, load_trained, train

__all__ = [
    "DEFAULTS",
    "DEMO_DEFAULTS",
    "BitFitTrainer",
    "DataError",
    "TaskData",
    "TrainResult",
    "bitfit_param_groups",
    "demo_data_path",
    "load_task_data",
    "load_trained",
    "train",
]
