"""``bitfit-peft train``: fine-tune a model with BitFit (defaults: packaged MiniLM on the SMS Spam demo)."""

from __future__ import annotations

import json
import os
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from bitfit_peft.cli import SwitchCommand, app
from bitfit_peft.cli._errors import MODEL, check_source, fail
from bitfit_peft.training.lr_finder import AUTO_LR_GRID
from bitfit_peft.training.recipe import DEMO_DEFAULTS, RECIPE
from bitfit_peft.utils import human_bytes


class ClsInit(str, Enum):
    """``--cls-init``: uniform first-token attention at the start (``train(cls_attention_init=...)``)."""

    on = "on"
    off = "off"
    auto = "auto"


CLS_INIT_VALUES = {ClsInit.on: True, ClsInit.off: False, ClsInit.auto: "auto"}


class Task(str, Enum):
    """Training task."""

    seq_cls = "seq-cls"
    regression = "regression"
    token_cls = "token-cls"
    causal_lm = "causal-lm"


_DATA = "Data"
_MODEL = "Model and adapter"
_OPT = "Optimisation"
_OUT = "Output"


def _fmt_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


_HELP = (
    "Fine-tune a model with BitFit (bias-only fine-tuning) and save the adapter.\n\n"
    "With no arguments it fine-tunes the packaged MiniLM-L6 on the packaged SMS Spam demo (under 2 minutes on "
    "2 CPU cores), prints accuracy before/after, trainable parameters, adapter file size and wall time, and "
    "saves the adapter to ./bitfit-demo-adapter.\n\n"
    "Example: bitfit-peft train --model bert-base-uncased --data reviews.csv --text-column review "
    "--label-column stars --bias-terms query,intermediate\n\n"
    "Errors (missing model directory, a folder without config.json, an unreachable Hub id, a bad value, a data "
    "problem) are one line and exit with code 2."
)


def _check_bias_terms(bias_terms: str) -> None:
    """Validate ``--bias-terms`` the way ``BitFitConfig`` will, before any data or model is loaded."""
    from bitfit_peft.tuner.config import BitFitConfig

    terms = [t.strip() for t in bias_terms.split(",") if t.strip()]
    try:
        BitFitConfig(bias_terms="all" if terms in ([], ["all"]) else terms)
    except ValueError as err:
        fail(f"Invalid value for '--bias-terms': {err}")


def _check_optimisation(
    learning_rate: str | None, grid: str, warmup_ratio: float | None, scheduler: str | None, epochs: float | None
) -> tuple[float | str | None, tuple[float, ...]]:
    """Parse ``--lr`` (a number or 'auto') and ``--auto-lr-grid``; validate the schedule before anything loads."""
    from bitfit_peft.training.recipe import RECIPE, check_schedule

    lr: float | str | None = learning_rate
    if learning_rate is not None and learning_rate != "auto":
        try:
            lr = float(learning_rate)
        except ValueError:
            fail(f"Invalid value for '--lr': {learning_rate!r} is neither a number nor 'auto'; e.g. --lr 1e-2")
    try:
        values = tuple(float(v) for v in grid.split(",") if v.strip())
    except ValueError:
        fail(f"Invalid value for '--auto-lr-grid': {grid!r}; pass comma-separated numbers, e.g. 1e-3,1e-2")
    try:
        check_schedule(
            RECIPE.learning_rate if lr in (None, "auto") else lr,
            RECIPE.warmup_ratio if warmup_ratio is None else warmup_ratio,
            scheduler or RECIPE.lr_scheduler_type,
            RECIPE.num_epochs if epochs is None else epochs,
            values if lr == "auto" else None,
        )
    except ValueError as err:
        flag = next((f for k, f in _FLAGS.items() if str(err).startswith(k)), "--lr")
        fail(f"Invalid value for '{flag}': {err}")
    return lr, values


#: start of a :func:`check_schedule` message -> the flag it is about
_FLAGS = {
    "the auto learning-rate grid": "--auto-lr-grid",
    "auto learning-rate grid": "--auto-lr-grid",
    "warmup_ratio": "--warmup-ratio",
    "unknown lr_scheduler_type": "--lr-scheduler",
    "num_epochs": "--epochs",
}


@app.command("train", help=_HELP, cls=SwitchCommand)
def train_command(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Base model: Hub id or local path. Default: the packaged MiniLM-L6.",
            rich_help_panel=_MODEL,
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Training data: a local .csv/.tsv/.json/.jsonl/.parquet file or a Hub "
            "dataset id. Default: the packaged SMS Spam demo (with a small subset, "
            f"{DEMO_DEFAULTS['num_epochs']:g} epochs, {DEMO_DEFAULTS['max_length']} tokens).",
            rich_help_panel=_DATA,
        ),
    ] = None,
    task: Annotated[
        Task,
        typer.Option(
            "--task",
            "-t",
            help="seq-cls (single sentences or pairs), regression, token-cls (per-word tags) or causal-lm.",
            rich_help_panel=_DATA,
        ),
    ] = Task.seq_cls,
    text_column: Annotated[
        str, typer.Option(help="Column holding the text (token-cls: the words).", rich_help_panel=_DATA)
    ] = "text",
    text_pair_column: Annotated[
        str | None,
        typer.Option(
            help="Second-sentence column for sentence-pair tasks (seq-cls / regression).", rich_help_panel=_DATA
        ),
    ] = None,
    label_column: Annotated[
        str,
        typer.Option(
            help="Column holding the label (token-cls: one tag per word). Ignored for causal-lm.", rich_help_panel=_DATA
        ),
    ] = "label",
    dev_data: Annotated[
        str | None,
        typer.Option(
            help="Separate dev set (file or Hub id). Default: a seeded hold-out of --data.", rich_help_panel=_DATA
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="Hub dataset split to train on.", rich_help_panel=_DATA)] = "train",
    dev_split: Annotated[
        str | None, typer.Option(help="Hub dataset split to evaluate on (e.g. validation).", rich_help_panel=_DATA)
    ] = None,
    data_config: Annotated[
        str | None, typer.Option(help="Hub dataset configuration name (e.g. sst2 for glue).", rich_help_panel=_DATA)
    ] = None,
    dev_fraction: Annotated[
        float, typer.Option(help="Fraction held out for dev when no dev set is given.", rich_help_panel=_DATA)
    ] = 0.1,
    max_train_samples: Annotated[
        int | None, typer.Option(help="Cap on training examples (after the split).", rich_help_panel=_DATA)
    ] = None,
    max_eval_samples: Annotated[
        int | None, typer.Option(help="Cap on dev examples (after the split).", rich_help_panel=_DATA)
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Max tokens per example. Default 128 (demo: 64).", rich_help_panel=_DATA)
    ] = None,
    bias_terms: Annotated[
        str,
        typer.Option(
            help="'all', or comma-separated bias groups: query,key,value,attention_output,"
            "intermediate,output,layernorm (e.g. 'query,intermediate' = the paper's subset).",
            rich_help_panel=_MODEL,
        ),
    ] = "all",
    add_missing_bias: Annotated[
        bool,
        typer.Option(
            "--add-missing-bias",
            help="Give targeted layers without a bias (Llama, T5, ...) a zero-initialised trainable bias.",
            rich_help_panel=_MODEL,
        ),
    ] = False,
    learning_rate: Annotated[
        str | None,
        typer.Option(
            "--lr",
            "--learning-rate",
            help="Learning rate of the bias deltas, or 'auto': a short range test over --auto-lr-grid on the "
            f"training data, chosen by dev loss. Default {RECIPE.learning_rate:g}.",
            rich_help_panel=_OPT,
        ),
    ] = None,
    auto_lr_grid: Annotated[
        str,
        typer.Option(help="Comma-separated candidate rates of --lr auto.", rich_help_panel=_OPT),
    ] = ",".join(f"{v:g}" for v in AUTO_LR_GRID),
    head_learning_rate: Annotated[
        float | None,
        typer.Option(
            "--head-lr", help=f"Learning rate of the task head. Default: {RECIPE.head_lr_factor:g}x --lr.",
            rich_help_panel=_OPT,
        ),
    ] = None,
    weight_decay: Annotated[
        float, typer.Option(help="Weight decay of the head's weight matrix (never of biases).", rich_help_panel=_OPT)
    ] = 0.0,
    warmup_ratio: Annotated[
        float | None,
        typer.Option(
            help=f"Fraction of steps for linear warm-up. Default {RECIPE.warmup_ratio:g}.", rich_help_panel=_OPT
        ),
    ] = None,
    lr_scheduler: Annotated[
        str | None,
        typer.Option(
            help="transformers scheduler name (linear, cosine, constant_with_warmup, ...). "
            f"Default {RECIPE.lr_scheduler_type}.",
            rich_help_panel=_OPT,
        ),
    ] = None,
    epochs: Annotated[
        float | None,
        typer.Option(
            "--epochs",
            help=f"Planned epochs (the schedule's length). Default {RECIPE.num_epochs:g} (the demo: "
            f"{DEMO_DEFAULTS['num_epochs']:g}); early stopping, if on, may end it sooner.",
            rich_help_panel=_OPT,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Training batch size.", rich_help_panel=_OPT)] = 32,
    eval_batch_size: Annotated[
        int | None, typer.Option(help="Evaluation batch size. Default 2x --batch-size.", rich_help_panel=_OPT)
    ] = None,
    early_stopping_patience: Annotated[
        int,
        typer.Option(
            help="Stop after this many epochs without dev improvement (0: never); the best epoch is then kept.",
            rich_help_panel=_OPT,
        ),
    ] = RECIPE.early_stopping_patience,
    best_epoch: Annotated[
        bool | None,
        typer.Option(
            "--best-epoch/--last-epoch",
            help="Keep the epoch with the best dev metric, or the last one. Default: "
            f"{'best' if RECIPE.restore_best_epoch else 'last'} (best with --early-stopping-patience).",
            rich_help_panel=_OPT,
        ),
    ] = None,
    cls_init: Annotated[
        ClsInit,
        typer.Option(
            "--cls-init",
            help="Start with the first token attending uniformly (last layer's query bias; BERT-style encoders, "
            "seq-cls / regression). Helps mean-pooling checkpoints such as all-MiniLM on hard tasks. auto: only "
            "where linear probes of the frozen model say the first token serves the task badly (seq-cls).",
            rich_help_panel=_OPT,
        ),
    ] = next(k for k, v in CLS_INIT_VALUES.items() if v == RECIPE.cls_attention_init),
    seed: Annotated[int, typer.Option(help="Seed for the split, head init and data order.", rich_help_panel=_OPT)] = 42,
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Where the adapter is saved.", rich_help_panel=_OUT)
    ] = Path("bitfit-demo-adapter"),
    resume_from_checkpoint: Annotated[
        str | None,
        typer.Option(
            help="Resume from a checkpoint dir, or 'latest' for the newest one in OUTPUT_DIR/checkpoints.",
            rich_help_panel=_OUT,
        ),
    ] = None,
    keep_checkpoints: Annotated[
        bool,
        typer.Option(
            "--keep-checkpoints", help="Keep OUTPUT_DIR/checkpoints after a successful run.", rich_help_panel=_OUT
        ),
    ] = False,
    eval_before: Annotated[
        bool, typer.Option(help="Evaluate before training, to report the accuracy gain.", rich_help_panel=_OUT)
    ] = True,
    push_to_hub: Annotated[
        bool,
        typer.Option(
            "--push-to-hub", help="Upload the adapter and tokenizer to the Hub (needs a login).", rich_help_panel=_OUT
        ),
    ] = False,
    hub_model_id: Annotated[
        str | None,
        typer.Option(help="Hub repo id for --push-to-hub. Default: OUTPUT_DIR's name.", rich_help_panel=_OUT),
    ] = None,
    hub_private: Annotated[
        bool, typer.Option("--hub-private", help="Create the Hub repo as private.", rich_help_panel=_OUT)
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON instead of a table.", rich_help_panel=_OUT)
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars or per-epoch logs.", rich_help_panel=_OUT)
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show library warnings and load reports.", rich_help_panel=_OUT)
    ] = False,
) -> None:
    """Fine-tune with BitFit (see ``_HELP``)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(quiet=int(os.environ.get("RANK", "0")) != 0)  # several ranks: rank 0 prints
    if not verbose:
        _quiet_libraries()

    from bitfit_peft.errors import BitFitError
    from bitfit_peft.training import DataError, train

    _check_bias_terms(bias_terms)
    lr, grid = _check_optimisation(learning_rate, auto_lr_grid, warmup_ratio, lr_scheduler, epochs)
    if best_epoch is False and early_stopping_patience:
        fail("Invalid value for '--last-epoch': early stopping keeps the best epoch; drop one of the two flags")
    if model is not None:
        check_source(model, MODEL)
    resume: str | bool | None = True if resume_from_checkpoint == "latest" else resume_from_checkpoint
    if not as_json:
        console.print(
            f"[bold]BitFit[/bold] training: model=[cyan]{model or 'packaged MiniLM-L6'}[/cyan] "
            f"data=[cyan]{data or 'packaged SMS Spam demo'}[/cyan] task=[cyan]{task.value}[/cyan]"
        )
    try:
        result = train(
            model,
            data,
            task=task.value,
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
            dev_data=dev_data,
            split=split,
            dev_split=dev_split,
            data_config=data_config,
            dev_fraction=dev_fraction,
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            output_dir=output_dir,
            bias_terms=bias_terms,
            add_missing_bias=add_missing_bias,
            learning_rate=lr,
            head_learning_rate=head_learning_rate,
            weight_decay=weight_decay,
            warmup_ratio=warmup_ratio,
            lr_scheduler_type=lr_scheduler,
            auto_lr_grid=grid,
            num_epochs=epochs,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            max_length=max_length,
            early_stopping_patience=early_stopping_patience or None,
            cls_attention_init=CLS_INIT_VALUES[cls_init],
            restore_best_epoch=best_epoch,
            seed=seed,
            resume_from_checkpoint=resume,
            keep_checkpoints=keep_checkpoints,
            eval_before=eval_before,
            push_to_hub=push_to_hub,
            hub_model_id=hub_model_id,
            hub_private=hub_private,
            quiet=quiet or as_json,
        )
    except (DataError, BitFitError) as err:
        fail(err)

    if as_json:
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    table = Table(title="BitFit result", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    name = result.metric_name
    table.add_row(f"{name} before", _fmt_metric(result.metrics_before.get(name)))
    table.add_row(f"{name} after", _fmt_metric(result.metrics_after.get(name)))
    if result.majority_accuracy is not None:
        table.add_row("majority-class accuracy", _fmt_metric(result.majority_accuracy))
    share = 100 * result.trainable_params / max(result.total_params, 1)
    table.add_row(
        "trainable parameters",
        f"{result.trainable_params:,} of {result.total_params:,} ({share:.3f}%): "
        f"{result.bias_params:,} bias + {result.head_params:,} head",
    )
    table.add_row("adapter file size", human_bytes(result.adapter_size_bytes))
    table.add_row("examples (train / dev)", f"{result.num_train:,} / {result.num_dev:,}")
    search = result.extra.get("lr_search")
    if search:
        tried = ", ".join(f"{k:g}: {v:.3f}" for k, v in search["dev_loss"].items())
        table.add_row("learning rate (auto)", f"{search['learning_rate']:g} (dev loss {tried})")
    probe = result.extra.get("cls_probe")
    if probe:
        table.add_row("[CLS] init (auto)", _describe_probe(probe))
    table.add_row("epochs run", f"{result.epochs_run:g}")
    table.add_row("wall time", f"{result.wall_time_s:.1f} s (training {result.train_time_s:.1f} s)")
    table.add_row("adapter saved to", result.output_dir)
    if result.hub_url:
        table.add_row("pushed to", result.hub_url)
    console.print(table)


def _describe_probe(probe: dict) -> str:
    """One line on what ``--cls-init auto`` decided and why."""
    decision = "on" if probe["enable"] else "off"
    if "reason" in probe:
        return f"{decision}: {probe['reason']}"
    return (f"{decision}: linear probe of the first token {probe['first_token']:.1f} %, mean-pooled "
            f"{probe['mean_pooled']:.1f} % on {probe['num_dev']} dev examples (on above a {probe['min_gap']:g}-point "
            f"gap, from {probe['min_dev']} dev examples)")  # fmt: skip
