"""Fine-tune a model with BitFit using :class:`transformers.Trainer`.

:func:`train` loads a base model and a dataset, wraps the model with a BitFit adapter (bias deltas + task
head), trains with BitFit's default recipe (:data:`bitfit_peft.training.recipe.RECIPE`: bias learning rate 1e-2,
head learning rate 10x, linear schedule with 10% warm-up, 16 epochs, evaluation and a checkpoint each epoch,
best-checkpoint restore; early stopping on dev on request) and saves only the adapter. ``learning_rate="auto"``
picks the learning rate with a short range test (:mod:`bitfit_peft.training.lr_finder`). Trainer checkpoints hold
only the adapter (+ head), so ``resume_from_checkpoint`` and ``load_best_model_at_end`` stay cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
from torch.utils.data import DataLoader
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from bitfit_peft.errors import BitFitError
from bitfit_peft.files import hub as bitfit_hub
from bitfit_peft.files.atomic_save import save_pretrained
from bitfit_peft.names import SUMMARY_FILE
from bitfit_peft.tasks import peft_task_type
from bitfit_peft.training.cls_init import auto_cls_init, initialize_cls_attention
from bitfit_peft.training.data import SEQUENCE_TASKS, EncodedDataset, TaskData, encode, load_task_data, normalize_task
from bitfit_peft.training.loading import (  # noqa: F401 - default_model_path and load_trained are part of this module's API
    collator,
    default_model_path,
    load_base_model,
    load_tokenizer,
    load_trained,
    split_terms,
)
from bitfit_peft.training.lr_finder import AUTO_LR_GRID, find_learning_rate, probe_steps_for
from bitfit_peft.training.metrics import MAIN_METRIC, argmax_logits, clean_metrics, make_compute_metrics
from bitfit_peft.training.recipe import DEMO_DEFAULTS, RECIPE, check_schedule
from bitfit_peft.training.result import TrainResult, count_params
from bitfit_peft.tuner.config import BitFitConfig
from bitfit_peft.utils import preserved_random_state

ADAPTER_FILE = SAFETENSORS_WEIGHTS_NAME
CHECKPOINT_DIR = "checkpoints"

#: Defaults of :func:`train` for arguments left as None (the dev-selected :data:`~.recipe.RECIPE`).
DEFAULTS: dict[str, Any] = {
    "learning_rate": RECIPE.learning_rate,
    "num_epochs": RECIPE.num_epochs,
    "warmup_ratio": RECIPE.warmup_ratio,
    "lr_scheduler_type": RECIPE.lr_scheduler_type,
    "early_stopping_patience": RECIPE.early_stopping_patience,
    "cls_attention_init": RECIPE.cls_attention_init,
    "restore_best_epoch": RECIPE.restore_best_epoch,
    "max_length": 128,
}
#: The head's learning rate defaults to this multiple of the bias learning rate (a new head is far from
#: trained; the bias deltas only nudge a trained model).
HEAD_LR_FACTOR = RECIPE.head_lr_factor


# ----------------------------------------------------------------------------------------------------
# Trainer with a separate head learning rate
# ----------------------------------------------------------------------------------------------------


def bitfit_param_groups(
    model: torch.nn.Module, lr: float, head_lr: float | None, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer groups: bias deltas at ``lr``, task heads (``modules_to_save``) at ``head_lr``.

    Weight decay applies to head weight matrices only, never to bias deltas.
    """
    deltas, head_decay, head_no_decay, other = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "modules_to_save" in name:
            (head_decay if p.ndim >= 2 else head_no_decay).append(p)
        elif "bitfit_delta" in name:
            deltas.append(p)
        else:
            other.append(p)
    head_lr = lr if head_lr is None else head_lr
    groups = [
        {"params": deltas, "lr": lr, "weight_decay": 0.0},
        {"params": head_decay, "lr": head_lr, "weight_decay": weight_decay},
        {"params": head_no_decay, "lr": head_lr, "weight_decay": 0.0},
        {"params": other, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class BitFitTrainer(Trainer):
    """:class:`transformers.Trainer` whose optimizer uses :func:`bitfit_param_groups`."""

    def __init__(self, *args: Any, head_learning_rate: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_learning_rate = head_learning_rate

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = bitfit_param_groups(
                opt_model, self.args.learning_rate, self.head_learning_rate, self.args.weight_decay
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


# ----------------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------
# train()
# ----------------------------------------------------------------------------------------------------


def train(
    model: str | None = None,
    data: str | Path | None = None,
    *,
    task: str = "seq-cls",
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str | None = "label",
    dev_data: str | Path | None = None,
    split: str = "train",
    dev_split: str | None = None,
    data_config: str | None = None,
    dev_fraction: float = 0.1,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    output_dir: str | Path = "bitfit-demo-adapter",
    bias_terms: str | Sequence[str] = "all",
    add_missing_bias: bool = False,
    learning_rate: float | str | None = None,
    head_learning_rate: float | None = None,
    weight_decay: float = 0.0,
    warmup_ratio: float | None = None,
    lr_scheduler_type: str | None = None,
    num_epochs: float | None = None,
    batch_size: int = 32,
    eval_batch_size: int | None = None,
    max_length: int | None = None,
    group_by_length: bool = False,
    early_stopping_patience: int | None = RECIPE.early_stopping_patience,
    cls_attention_init: bool | str | None = None,
    restore_best_epoch: bool | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    auto_lr_grid: Sequence[float] = AUTO_LR_GRID,
    seed: int = 42,
    adapter_name: str = "default",
    resume_from_checkpoint: str | bool | None = None,
    keep_checkpoints: bool = False,
    save_total_limit: int = 2,
    eval_before: bool = True,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    hub_private: bool = False,
    quiet: bool = False,
) -> TrainResult:
    """Fine-tune ``model`` on ``data`` with BitFit and save the adapter to ``output_dir``.

    Args:
        model: Hub id or local path of the base model; None: the packaged MiniLM-L6.
        data: local CSV/TSV/JSON/JSONL/Parquet file or Hub dataset id; None: the packaged SMS Spam demo
            (then ``DEMO_DEFAULTS`` fill in unset sample caps, epochs and max length).
        task: ``seq-cls``, ``regression``, ``token-cls`` or ``causal-lm``.
        text_column: column holding the text (token-cls: the words).
        text_pair_column: second-sentence column for sentence-pair tasks (seq-cls / regression).
        label_column: column holding the label (token-cls: one tag per word); unused for causal-lm.
        dev_data: a separate dev set (file or Hub id).
        split: Hub split to train on.
        dev_split: Hub split to evaluate on.
        data_config: Hub dataset configuration name.
        dev_fraction: held-out fraction when no dev set is given (a fixed split from ``seed``).
        max_train_samples: cap on training examples, applied after the split.
        max_eval_samples: cap on dev examples, applied after the split.
        output_dir: where the adapter, tokenizer and ``bitfit_training.json`` go. Trainer checkpoints go to
            ``output_dir/checkpoints`` (removed after success unless ``keep_checkpoints``).
        bias_terms: ``"all"`` or bias groups (a list or a comma-separated string): query, key, value,
            attention_output, intermediate, output, layernorm.
        add_missing_bias: give bias-free targeted layers (Llama, T5, ...) a zero-initialised delta.
        learning_rate: learning rate of the bias deltas (default 1e-2), or ``"auto"``: a short range test over
            ``auto_lr_grid`` on the training data, chosen by dev loss (see :mod:`.lr_finder`).
        head_learning_rate: learning rate of the task head (default ``10 * learning_rate``).
        weight_decay: weight decay of the head's weight matrices (bias deltas never decay).
        warmup_ratio: fraction of the steps used for linear warm-up (default 0.1).
        lr_scheduler_type: a ``transformers`` scheduler name (default ``"linear"``: warm-up, then linear decay).
        num_epochs: planned training epochs, the schedule's length (default :data:`~.recipe.RECIPE`'s 16, demo 4;
            early stopping, if on, may end it sooner).
        batch_size: training batch size.
        eval_batch_size: evaluation batch size (default ``2 * batch_size``).
        max_length: max tokens per example (default 128; demo 64).
        group_by_length: batch training examples of similar length (less padding, so faster), at the cost of
            less mixed batches: avoid it when length correlates with the label (as in the SMS Spam demo).
        early_stopping_patience: epochs without dev improvement before stopping (default 0: off, as in
            :data:`~.recipe.RECIPE`); None or 0 disables it. Early stopping restores the best epoch.
        cls_attention_init: before training, set the last layer's query-bias delta so that the first token
            attends uniformly (seq-cls / regression on BERT-style encoders; see :mod:`.cls_init`): helps
            mean-pooling checkpoints on tasks their ``[CLS]`` state serves badly. ``"auto"``: only where linear
            probes of the frozen model say the first token serves the task badly (seq-cls on a supported
            encoder; the probe's figures go to ``extra["cls_probe"]``); off everywhere else. Default: the
            recipe's, ``"auto"`` (:data:`~.recipe.RECIPE`); ``False`` trains as before the probe existed.
        restore_best_epoch: keep the epoch with the best dev metric (``True``) instead of the last one. Default:
            the recipe's, ``False`` (the last epoch; dev is still evaluated each epoch), ``True`` with early stopping.
        callbacks: extra ``transformers`` callbacks of the training run (logging, per-epoch probes, ...).
        auto_lr_grid: candidate learning rates of ``learning_rate="auto"``.
        seed: seed of the split, the head initialisation and the data order.
        adapter_name: PEFT adapter name (a non-default name is saved in a sub-folder).
        resume_from_checkpoint: a checkpoint dir, or True for the latest one in ``output_dir/checkpoints``.
        keep_checkpoints: keep ``output_dir/checkpoints`` after a successful run.
        save_total_limit: checkpoints kept while training (the best one is always kept).
        eval_before: evaluate the untrained adapter first (``metrics_before``).
        push_to_hub: upload the adapter and tokenizer with ``push_to_hub`` after saving.
        hub_model_id: Hub repo id (default: the output dir's name).
        hub_private: create the Hub repo as private.
        quiet: no progress bars or per-epoch logs.

    Returns:
        A :class:`TrainResult` with dev metrics before/after, parameter counts, adapter size and timings
        (``extra["lr_search"]`` holds the range test of ``learning_rate="auto"``).

    Example:
        >>> from bitfit_peft.training import train
        >>> result = train(quiet=True)  # doctest: +SKIP
        >>> result.accuracy_after > result.majority_accuracy  # doctest: +SKIP
        True
    """
    start = time.perf_counter()
    task = normalize_task(task)
    defaults = {**DEFAULTS, **DEMO_DEFAULTS} if data is None else DEFAULTS
    if max_train_samples is None:
        max_train_samples = defaults.get("max_train_samples")
    if max_eval_samples is None:
        max_eval_samples = defaults.get("max_eval_samples")
    num_epochs = defaults["num_epochs"] if num_epochs is None else num_epochs
    max_length = defaults["max_length"] if max_length is None else max_length
    warmup_ratio = defaults["warmup_ratio"] if warmup_ratio is None else warmup_ratio
    lr_scheduler_type = lr_scheduler_type or defaults["lr_scheduler_type"]
    auto_lr = learning_rate == "auto"
    learning_rate = defaults["learning_rate"] if learning_rate is None or auto_lr else learning_rate
    check_schedule(learning_rate, warmup_ratio, lr_scheduler_type, num_epochs, auto_lr_grid if auto_lr else None)
    cls_attention_init = defaults["cls_attention_init"] if cls_attention_init is None else cls_attention_init
    if cls_attention_init not in (True, False, "auto"):
        raise ValueError(f"cls_attention_init must be True, False or 'auto', got {cls_attention_init!r}")
    if cls_attention_init is True and task not in SEQUENCE_TASKS:
        raise BitFitError(f"cls_attention_init applies to seq-cls and regression tasks, not {task!r}; drop it")
    if restore_best_epoch is False and early_stopping_patience:
        raise ValueError("early stopping keeps the best epoch: drop early_stopping_patience or restore_best_epoch")
    if restore_best_epoch is None:
        restore_best_epoch = bool(early_stopping_patience) or defaults["restore_best_epoch"]
    model_path = model or default_model_path()
    output_dir = Path(output_dir)
    ckpt_dir = output_dir / CHECKPOINT_DIR

    set_seed(seed)
    task_data: TaskData = load_task_data(
        data,
        task=task,
        text_column=text_column,
        text_pair_column=text_pair_column,
        label_column=label_column,
        dev_source=dev_data,
        split=split,
        dev_split=dev_split,
        config_name=data_config,
        dev_fraction=dev_fraction,
        seed=seed,
        max_train_samples=max_train_samples,
        max_eval_samples=max_eval_samples,
    )
    tokenizer = load_tokenizer(model_path, task)
    train_ds = encode(task_data.train, tokenizer, task, max_length)
    dev_ds = encode(task_data.dev, tokenizer, task, max_length)
    # Evaluation order does not change the metrics; sorted by length, batches need far less padding.
    dev_ds = EncodedDataset(sorted(dev_ds.features, key=lambda f: len(f["input_ids"])))

    set_seed(seed)  # head init
    base = load_base_model(model_path, task, task_data.label_names)
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    peft_config = BitFitConfig(
        task_type=peft_task_type(task),
        bias_terms=split_terms(bias_terms),
        add_missing_bias=add_missing_bias,
        # PEFT adds the head to modules_to_save only after targeting for TOKEN_CLS: name it up front so
        # the head is not wrapped as a bias target first.
        modules_to_save=["classifier", "score"] if task == "token-cls" else None,
    )
    peft_model = get_peft_model(base, peft_config, adapter_name=adapter_name)
    trainable, total, bias_n, head_n = count_params(peft_model)

    metric = MAIN_METRIC[task]
    cpu_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        use_cpu=cpu_ranks,  # torchrun / accelerate launch on CPU: gloo DDP (else every rank trains alone)
        num_train_epochs=num_epochs,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=eval_batch_size or 2 * batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_steps=warmup_ratio,
        lr_scheduler_type=lr_scheduler_type,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        save_total_limit=save_total_limit,
        load_best_model_at_end=restore_best_epoch,
        metric_for_best_model=metric,
        greater_is_better=metric != "loss",
        seed=seed,
        data_seed=seed,
        label_names=["labels"],
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=quiet,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    per_token = task in ("token-cls", "causal-lm")
    trainer = BitFitTrainer(
        model=peft_model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=dev_ds,
        data_collator=collator(task, tokenizer),
        processing_class=tokenizer,
        compute_metrics=make_compute_metrics(task),
        preprocess_logits_for_metrics=argmax_logits if per_token else None,
        head_learning_rate=HEAD_LR_FACTOR * learning_rate if head_learning_rate is None else head_learning_rate,
        callbacks=list(callbacks) or None,
    )
    if quiet:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)

    extra: dict[str, Any] = {}
    # Plain loaders, not Trainer's: every rank of a multi-process run reads all of the data and decides alike.
    loader, dev_loader = (DataLoader(ds, batch_size=args.per_device_eval_batch_size, collate_fn=trainer.data_collator)
                          for ds in (train_ds, dev_ds))  # fmt: skip
    if cls_attention_init == "auto":  # leaves the random state as it was: an "off" decision trains like off
        with preserved_random_state():
            extra["cls_probe"] = auto_cls_init(peft_model, task, loader, dev_loader, adapter_name)
        cls_attention_init = extra["cls_probe"]["enable"]
    if cls_attention_init:  # before evaluation and the range test: both start from the initialised adapter
        extra["cls_attention_init"] = initialize_cls_attention(peft_model, loader, adapter_name)
    metrics_before = clean_metrics(trainer.evaluate()) if eval_before else {}
    if auto_lr:  # range test from the same initial adapter; the real run then starts from it again
        factor = HEAD_LR_FACTOR if head_learning_rate is None else head_learning_rate / learning_rate
        steps = probe_steps_for(len(train_ds), batch_size)
        with preserved_random_state():  # so a pick equal to the default trains exactly as the default does
            found = find_learning_rate(trainer, auto_lr_grid, probe_steps=steps, head_lr_factor=factor, seed=seed)
        trainer.args.learning_rate = learning_rate = found.learning_rate
        trainer.head_learning_rate = factor * learning_rate
        extra["lr_search"] = asdict(found)
    if early_stopping_patience:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=early_stopping_patience))
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    train_time = time.perf_counter() - t0
    metrics_after = clean_metrics(trainer.evaluate())

    main = trainer.is_world_process_zero()  # several ranks (torchrun / accelerate launch): rank 0 writes
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_pretrained(peft_model, output_dir)  # all-or-nothing, with the BitFit model card
        tokenizer.save_pretrained(str(output_dir))
    trainer.accelerator.wait_for_everyone()
    adapter_file = output_dir / (adapter_name if adapter_name != "default" else "") / ADAPTER_FILE
    best = trainer.state.best_model_checkpoint if restore_best_epoch else None  # None: the last epoch was kept
    if main and not keep_checkpoints and ckpt_dir.is_dir():
        shutil.rmtree(ckpt_dir)
        best = None
    result = TrainResult(
        task=task,
        metric_name=metric if metric != "loss" else "accuracy",
        metrics_before=metrics_before,
        metrics_after=metrics_after,
        majority_accuracy=task_data.majority_accuracy(),
        trainable_params=trainable,
        total_params=total,
        bias_params=bias_n,
        head_params=head_n,
        adapter_size_bytes=adapter_file.stat().st_size if adapter_file.is_file() else 0,
        output_dir=str(output_dir),
        wall_time_s=0.0,
        train_time_s=train_time,
        num_train=len(train_ds),
        num_dev=len(dev_ds),
        epochs_run=float(trainer.state.epoch or 0.0),
        best_checkpoint=best,
        label_names=task_data.label_names,
        extra=extra,
    )
    result.wall_time_s = time.perf_counter() - start
    summary = {
        "base_model": model_path,
        "task": task,
        "label_names": task_data.label_names,
        "text_column": text_column,
        "text_pair_column": text_pair_column,
        "label_column": label_column,
        "max_length": max_length,
        "bias_terms": peft_config.bias_terms,
        "add_missing_bias": add_missing_bias,
        "data": str(task_data.source),
        "seed": seed,
        "optimisation": {  # what the Trainer ran with (defaults resolved, --lr auto's pick)
            "learning_rate": trainer.args.learning_rate,
            "head_learning_rate": trainer.head_learning_rate,
            "lr_scheduler_type": str(getattr(trainer.args.lr_scheduler_type, "value", trainer.args.lr_scheduler_type)),
            "warmup_ratio": warmup_ratio,
            "num_epochs": num_epochs,
            "early_stopping_patience": early_stopping_patience or None,
            "cls_attention_init": cls_attention_init,
            "restore_best_epoch": restore_best_epoch,
            "batch_size": batch_size,
        },
        "result": result.to_dict(),
    }
    if main:
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if push_to_hub and main:
        repo_id = hub_model_id or output_dir.resolve().name
        result.hub_url = str(bitfit_hub.push_to_hub(peft_model, repo_id, private=hub_private))
        tokenizer.push_to_hub(repo_id, private=hub_private)
    return result
