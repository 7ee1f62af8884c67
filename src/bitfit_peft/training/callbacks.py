"""Trainer callbacks for BitFit models trained with any ``transformers.Trainer`` (TRL's ``SFTTrainer``,
``DPOTrainer``, ``GRPOTrainer``... included).

:class:`BitFitCardCallback` gives every checkpoint the BitFit model card. TRL writes its own generic card
(``README.md``: no ``bitfit`` tag, no trainable share, no BitFit loading snippet) into ``output_dir`` at each
checkpoint, and PEFT's save writes its template card; for the final adapter, save with
:func:`bitfit_peft.save_pretrained` (``bitfit_peft.save_pretrained(trainer.model, out)``), which writes the BitFit
card and keeps the text of a card already there (TRL's).

Example:
    >>> from bitfit_peft.training.callbacks import BitFitCardCallback
    >>> type(BitFitCardCallback()).__mro__[1].__name__
    'TrainerCallback'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft.utils.constants import CONFIG_NAME
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from bitfit_peft.files.hub import write_model_card
from bitfit_peft.names import is_bitfit


class BitFitCardCallback(TrainerCallback):
    """Write the BitFit model card (:func:`bitfit_peft.files.hub.write_model_card`) into each checkpoint of a BitFit
    model (main process only; other adapters and full models are left alone)."""

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or model is None or not is_bitfit(model):
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if (folder / CONFIG_NAME).is_file():
            write_model_card(folder, model=model)
