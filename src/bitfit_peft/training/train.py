"""Fine-tune a model with BitFit using :class:`transformers.Trainer`: :func:`train`.

:func:`train` runs one :class:`~bitfit_peft.training.args.TrainArgs`: it loads a base model and a dataset, wraps the
model with a BitFit adapter (bias deltas + task head), trains with BitFit's default recipe
(:data:`bitfit_peft.training.recipe.RECIPE`: bias learning rate 1e-2, head learning rate 10x, linear schedule with
10% warm-up, 16 epochs, evaluation and a checkpoint each epoch, the last epoch kept; early stopping on dev on request)
and saves only the adapter. ``learning_rate="auto"`` picks the learning rate with a short range test
(:mod:`bitfit_peft.training.lr_finder`). Trainer checkpoints hold only the adapter (+ head), so
``resume_from_checkpoint`` and restoring the best epoch stay cheap.

The run is a sequence of small steps, each usable on its own: :func:`load_data`, :func:`build_model`,
:func:`build_trainer`, :func:`prepare_adapter` (the ``[CLS]`` init), :func:`search_learning_rate`,
:func:`run_training`, :func:`save_adapter`, :func:`make_result`, :func:`write_summary`, :func:`push_adapter`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
from torch.utils.data import DataLoader
from transformers import EarlyStoppingCallback, TrainerCallback, TrainingArguments, set_seed

from bitfit_peft.files import hub as bitfit_hub
from bitfit_peft.files.atomic_save import save_pretrained
from bitfit_peft.files.model_card import TrainingFacts, gguf_parts, public_base_id
from bitfit_peft.files.paths import is_hub_id
from bitfit_peft.names import SUMMARY_FILE
from bitfit_peft.tasks import peft_task_type
from bitfit_peft.training.args import OptionError, TrainArgs
from bitfit_peft.training.cls_init import auto_cls_init, initialize_cls_attention
from bitfit_peft.training.data import EncodedDataset, TaskData, encode, load_task_data
from bitfit_peft.training.loading import (  # noqa: F401 - default_model_path and load_trained are part of this module's API
    collator,
    default_model_path,
    load_base_model,
    load_tokenizer,
    load_trained,
)
from bitfit_peft.training.lr_finder import find_learning_rate, probe_steps_for
from bitfit_peft.training.metrics import MAIN_METRIC, argmax_logits, clean_metrics, make_compute_metrics
from bitfit_peft.training.plan import EpochLog, TrainPlan, make_plan, quiet_log_printing
from bitfit_peft.training.result import TrainResult, count_params
from bitfit_peft.training.trainer import BitFitTrainer, bitfit_param_groups  # noqa: F401 - part of this API
from bitfit_peft.tuner.config import BitFitConfig
from bitfit_peft.utils import preserved_random_state

ADAPTER_FILE = SAFETENSORS_WEIGHTS_NAME
CHECKPOINT_DIR = "checkpoints"


# ----------------------------------------------------------------------------------------------------
# train(): the steps of one run
# ----------------------------------------------------------------------------------------------------


def train(
    args: TrainArgs | None = None,
    /,
    *,
    callbacks: Sequence[TrainerCallback] = (),
    on_plan: Callable[[TrainPlan], None] | None = None,
    **options: Any,
) -> TrainResult:
    """Fine-tune a model with BitFit as ``args`` say and save the adapter to ``args.output_dir``.

    Args:
        args: the run's options (:class:`~bitfit_peft.training.args.TrainArgs`; every field is also an option of
            ``bitfit-peft train``). None: ``TrainArgs.create(**options)``, so ``train(model=..., data=...,
            num_epochs=4)`` works; with no ``data`` that is the packaged SMS Spam demo with
            :data:`~.recipe.DEMO_DEFAULTS`.
        callbacks: extra ``transformers`` callbacks of the training run (logging, per-epoch probes, ...); an
            :class:`~bitfit_peft.training.plan.EpochLog` among them replaces the Trainer's printed log dicts.
        on_plan: called with the :class:`~bitfit_peft.training.plan.TrainPlan` (split sizes, labels, steps per
            epoch, the ``[CLS]``-init decision) right before training starts; also in ``result.extra["plan"]``.
        **options: :class:`~bitfit_peft.training.args.TrainArgs` fields; with ``args`` given, they replace its
            values (``dataclasses.replace``).

    Returns:
        A :class:`TrainResult` with dev metrics before/after, parameter counts, adapter size and timings
        (``extra["lr_search"]``: the range test of ``learning_rate="auto"``; ``extra["cls_probe"]``: the probe of
        ``cls_attention_init="auto"``).

    Raises:
        OptionError: a bad option value (before anything is loaded); DataError: a problem with the data.

    Example:
        >>> from bitfit_peft.training import train
        >>> result = train(quiet=True)  # doctest: +SKIP
        >>> result.accuracy_after > result.majority_accuracy  # doctest: +SKIP
        True
    """
    if args is not None and not isinstance(args, TrainArgs):
        raise TypeError(f"train() takes a TrainArgs or keyword options, not {args!r}; e.g. train(model=..., data=...)")
    args = TrainArgs.create(**options) if args is None else replace(args, **options)
    if args.model is None:
        args = replace(args, model=default_model_path())
    check_output_dir(args)
    start = time.perf_counter()
    task_data, tokenizer, train_ds, dev_ds = load_data(args)
    trainer = build_trainer(args, build_model(args, task_data, tokenizer), tokenizer, train_ds, dev_ds, callbacks)
    extra = prepare_adapter(args, trainer)
    plan = make_plan(args, task_data, trainer, extra)
    extra["plan"] = plan.to_dict()
    if on_plan is not None and trainer.is_world_process_zero():
        on_plan(plan)
    metrics = {"before": clean_metrics(trainer.evaluate()) if args.eval_before else {}}
    if args.auto_lr:  # from the same initial adapter as the real run, which starts from it again
        extra["lr_search"] = search_learning_rate(args, trainer)
    train_time = run_training(args, trainer)
    metrics["after"] = clean_metrics(trainer.evaluate())
    best = save_adapter(args, trainer)
    result = make_result(args, trainer, task_data, metrics, train_time, best, extra)
    result.wall_time_s = time.perf_counter() - start
    write_summary(args, trainer, task_data, result)
    if trainer.is_world_process_zero():  # the card, now with the data, labels and dev metrics of the run
        bitfit_hub.write_model_card(args.output_dir, base_model=base_id(args), training=card_facts(args, result))
    if args.push_to_hub and trainer.is_world_process_zero():
        result.hub_url = push_adapter(args, trainer, result)
    return result


def check_output_dir(args: TrainArgs) -> None:
    """Refuse to train into a non-empty ``output_dir`` (another run's adapter would be replaced) unless
    ``overwrite`` or resuming from its checkpoints."""
    out = args.output_dir
    if args.overwrite or args.resume_from_checkpoint is not None or not out.exists():
        return
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 decides (a later rank may see rank 0's first files);
        return  # the launcher stops the other ranks when it refuses
    if not out.is_dir():
        raise OptionError("output_dir", f"output_dir {out} exists and is not a directory; choose another one.")
    held = sorted(entry.name for entry in out.iterdir())
    if held:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise OptionError(
            "output_dir",
            f"output_dir {out} is not empty (it holds {shown}); pass overwrite=True (--overwrite) to replace it, "
            "or choose another output_dir.",
        )


def load_data(args: TrainArgs) -> tuple[TaskData, Any, EncodedDataset, EncodedDataset]:
    """The task's examples (split and capped), the tokenizer, and both sides encoded (dev sorted by length)."""
    set_seed(args.seed)
    task_data = load_task_data(
        args.data,
        task=args.task,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        dev_source=args.dev_data,
        split=args.split,
        dev_split=args.dev_split,
        config_name=args.data_config,
        dev_fraction=args.dev_fraction,
        seed=args.seed,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
    )
    tokenizer = load_tokenizer(args.model, args.task)
    train_ds = encode(task_data.train, tokenizer, args.task, args.max_length)
    dev_ds = encode(task_data.dev, tokenizer, args.task, args.max_length)
    # Evaluation order does not change the metrics; sorted by length, batches need far less padding.
    dev_ds = EncodedDataset(sorted(dev_ds.features, key=lambda f: len(f["input_ids"])))
    return task_data, tokenizer, train_ds, dev_ds


def build_model(args: TrainArgs, task_data: TaskData, tokenizer: Any) -> PeftModel:
    """The base model with the task's head (seeded), wrapped with a BitFit adapter ``args.adapter_name``."""
    set_seed(args.seed)  # head init
    base = load_base_model(args.model, args.task, task_data.label_names, args.quantize)
    if args.quantize is not None:  # PEFT's k-bit preparation (float norms, input grads), as for QLoRA
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    base.name_or_path = gguf_parts(base_id(args))[0] or base.name_or_path  # PEFT's base_model_name_or_path
    modules = args.target_modules
    config = BitFitConfig(
        task_type=peft_task_type(args.task),
        bias_terms=args.bias_terms if isinstance(args.bias_terms, str) else list(args.bias_terms),
        target_modules=list(modules) if isinstance(modules, tuple) else modules,
        save_dtype=args.save_dtype,
        add_missing_bias=args.add_missing_bias,
        # PEFT adds the head to modules_to_save only after targeting for TOKEN_CLS: name it up front so
        # the head is not wrapped as a bias target first.
        modules_to_save=["classifier", "score"] if args.task == "token-cls" else None,
    )
    return get_peft_model(base, config, adapter_name=args.adapter_name)


def training_arguments(args: TrainArgs) -> TrainingArguments:
    """The ``TrainingArguments`` of the run: a dev evaluation, a checkpoint and a log line each epoch."""
    metric = MAIN_METRIC[args.task]
    cpu_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(args.output_dir / CHECKPOINT_DIR),
        use_cpu=cpu_ranks,  # torchrun / accelerate launch on CPU: gloo DDP (else every rank trains alone)
        num_train_epochs=args.num_epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size or 2 * args.batch_size,
        learning_rate=args.start_learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=args.lr_scheduler_type,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        save_total_limit=args.save_total_limit,
        load_best_model_at_end=args.keep_best_epoch,
        metric_for_best_model=metric,
        greater_is_better=metric != "loss",
        seed=args.seed,
        data_seed=args.seed,
        label_names=["labels"],
        remove_unused_columns=False,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        bf16=args.bf16,
        fp16=args.fp16,
        report_to=[t.strip() for t in args.report_to.split(",") if t.strip()],
        disable_tqdm=args.quiet,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def build_trainer(
    args: TrainArgs,
    model: PeftModel,
    tokenizer: Any,
    train_ds: EncodedDataset,
    dev_ds: EncodedDataset,
    callbacks: Sequence[TrainerCallback] = (),
) -> BitFitTrainer:
    """A :class:`BitFitTrainer` for the run (bias deltas and head at their own learning rates)."""
    head_lr = args.head_learning_rate
    trainer = BitFitTrainer(
        model=model,
        args=training_arguments(args),
        train_dataset=train_ds,
        eval_dataset=dev_ds,
        data_collator=collator(args.task, tokenizer),
        processing_class=tokenizer,
        compute_metrics=make_compute_metrics(args.task),
        preprocess_logits_for_metrics=argmax_logits if args.task in ("token-cls", "causal-lm") else None,
        head_learning_rate=args.head_lr_factor * args.start_learning_rate if head_lr is None else head_lr,
        callbacks=list(callbacks) or None,
    )
    if args.quiet:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    elif any(isinstance(cb, EpochLog) for cb in callbacks):
        quiet_log_printing(trainer)
    return trainer


def prepare_adapter(args: TrainArgs, trainer: BitFitTrainer) -> dict[str, Any]:
    """Apply ``cls_attention_init`` (``"auto"``: ask the probe first); returns what was done, for ``result.extra``.

    Runs before the first evaluation and the range test, so that both start from the initialised adapter.
    """
    extra: dict[str, Any] = {}
    if args.cls_attention_init is False:
        return extra
    model, name = trainer.model, args.adapter_name
    # Plain loaders, not Trainer's: every rank of a multi-process run reads all of the data and decides alike.
    loader, dev_loader = (DataLoader(ds, batch_size=trainer.args.per_device_eval_batch_size,
                                     collate_fn=trainer.data_collator)
                          for ds in (trainer.train_dataset, trainer.eval_dataset))  # fmt: skip
    if args.cls_attention_init == "auto":  # leaves the random state as it was: an "off" decision trains like off
        with preserved_random_state():
            extra["cls_probe"] = auto_cls_init(model, args.task, loader, dev_loader, name)
        if not extra["cls_probe"]["enable"]:
            return extra
    extra["cls_attention_init"] = initialize_cls_attention(model, loader, name)
    return extra


def search_learning_rate(args: TrainArgs, trainer: BitFitTrainer) -> dict[str, Any]:
    """``learning_rate="auto"``: range-test ``args.auto_lr_grid`` and set the pick (and the head's rate) on
    ``trainer``; returns the search's record. The random state is left alone, so a pick equal to the default trains
    exactly as the default does."""
    factor = args.head_lr_factor
    steps = probe_steps_for(len(trainer.train_dataset), args.batch_size)
    with preserved_random_state():
        found = find_learning_rate(trainer, args.auto_lr_grid, probe_steps=steps, head_lr_factor=factor, seed=args.seed)
    trainer.args.learning_rate = found.learning_rate
    trainer.head_learning_rate = factor * found.learning_rate
    return asdict(found)


def run_training(args: TrainArgs, trainer: BitFitTrainer) -> float:
    """Train (with early stopping on request, from a checkpoint on request); returns the training time in seconds."""
    if args.early_stopping_patience:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=args.resume)
    return time.perf_counter() - start


def save_adapter(args: TrainArgs, trainer: BitFitTrainer) -> str | None:
    """Save the adapter and tokenizer to ``args.output_dir`` (rank 0) and drop the checkpoints unless kept;
    returns the restored best checkpoint if it is still there (None: the last epoch was kept, or it was removed)."""
    main = trainer.is_world_process_zero()  # several ranks (torchrun / accelerate launch): rank 0 writes
    if main:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        save_pretrained(trainer.model, args.output_dir)  # all-or-nothing, with the BitFit model card
        trainer.processing_class.save_pretrained(str(args.output_dir))
    trainer.accelerator.wait_for_everyone()
    best = trainer.state.best_model_checkpoint if args.keep_best_epoch else None
    checkpoints = args.output_dir / CHECKPOINT_DIR
    if main and not args.keep_checkpoints and checkpoints.is_dir():
        shutil.rmtree(checkpoints)
        best = None
    return best


def make_result(
    args: TrainArgs,
    trainer: BitFitTrainer,
    task_data: TaskData,
    metrics: dict[str, dict[str, float]],
    train_time: float,
    best_checkpoint: str | None,
    extra: dict[str, Any],
) -> TrainResult:
    """The :class:`TrainResult` of a finished run (``wall_time_s`` is left for the caller to set)."""
    trainable, total, bias_n, head_n = count_params(trainer.model)
    metric = MAIN_METRIC[args.task]
    adapter_file = args.output_dir / (args.adapter_name if args.adapter_name != "default" else "") / ADAPTER_FILE
    return TrainResult(
        task=args.task,
        metric_name=metric if metric != "loss" else "accuracy",
        metrics_before=metrics["before"],
        metrics_after=metrics["after"],
        majority_accuracy=task_data.majority_accuracy(),
        trainable_params=trainable,
        total_params=total,
        bias_params=bias_n,
        head_params=head_n,
        adapter_size_bytes=adapter_file.stat().st_size if adapter_file.is_file() else 0,
        output_dir=str(args.output_dir),
        wall_time_s=0.0,
        train_time_s=train_time,
        num_train=len(trainer.train_dataset),
        num_dev=len(trainer.eval_dataset),
        epochs_run=float(trainer.state.epoch or 0.0),
        best_checkpoint=best_checkpoint,
        label_names=task_data.label_names,
        extra=extra,
    )


def write_summary(args: TrainArgs, trainer: BitFitTrainer, task_data: TaskData, result: TrainResult) -> None:
    """Write ``bitfit_training.json`` (rank 0): what was trained on what, the settings the Trainer ran with
    (defaults resolved, ``--lr auto``'s pick) and the result. :func:`load_trained` reads it back."""
    if not trainer.is_world_process_zero():
        return
    scheduler = trainer.args.lr_scheduler_type
    summary = {
        "base_model": args.model,
        "quantize": args.quantize,  # what the base was trained in (the adapter loads onto any precision of it)
        "task": args.task,
        "label_names": task_data.label_names,
        "text_column": args.text_column,
        "text_pair_column": args.text_pair_column,
        "label_column": args.label_column,
        "max_length": args.max_length,
        "bias_terms": trainer.model.peft_config[args.adapter_name].bias_terms,
        "add_missing_bias": args.add_missing_bias,
        "data": str(task_data.source),
        "seed": args.seed,
        "optimisation": {
            "learning_rate": trainer.args.learning_rate,
            "head_learning_rate": trainer.head_learning_rate,
            "lr_scheduler_type": str(getattr(scheduler, "value", scheduler)),
            "warmup_ratio": args.warmup_ratio,
            "num_epochs": args.num_epochs,
            "early_stopping_patience": args.early_stopping_patience or None,
            "cls_attention_init": "cls_attention_init" in result.extra,
            "restore_best_epoch": args.keep_best_epoch,
            "batch_size": args.batch_size,
        },
        "result": result.to_dict(),
    }
    (args.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")


def push_adapter(args: TrainArgs, trainer: BitFitTrainer, result: TrainResult | None = None) -> str:
    """Upload the adapter and tokenizer to the Hub (``args.hub_model_id``, default: the output dir's name); its URL."""
    repo_id = args.hub_model_id or args.output_dir.resolve().name
    facts = card_facts(args, result) if result is not None else None
    url = bitfit_hub.push_to_hub(
        trainer.model, repo_id, private=args.hub_private, base_model=base_id(args), training=facts
    )
    trainer.processing_class.push_to_hub(repo_id, private=args.hub_private)
    return str(url)


def base_id(args: TrainArgs) -> str | None:
    """The base model's Hub id for the card and ``adapter_config.json`` (``<repo>/<file>.gguf`` for a GGUF base; a
    local GGUF file by its path, which the card shortens to ``<folder>/<file>``); None: only a local folder is known."""
    return public_base_id(args.model, args.base_model_id) or (args.model if gguf_parts(args.model)[1] else None)


def card_facts(args: TrainArgs, result: TrainResult) -> TrainingFacts:
    """What the model card says about the run: the data as the user names it (``data_name``, a Hub dataset id or
    the file's name, never a local path), dev metrics before/after and the majority baseline, sizes."""
    data = args.data_name or (args.data if is_hub_id(args.data) else Path(args.data).name if args.data else None)
    return TrainingFacts(
        data=data or "SMS Spam demo (packaged with bitfit-peft)",
        metric_name=result.metric_name,
        metrics_before=result.metrics_before,
        metrics_after=result.metrics_after,
        majority_accuracy=result.majority_accuracy,
        num_train=result.num_train,
        num_dev=result.num_dev,
        epochs=result.epochs_run,
        learning_rate=(result.extra.get("lr_search") or {}).get("learning_rate") or args.start_learning_rate,
        trainable_params=result.trainable_params,
        total_params=result.total_params,
    )
