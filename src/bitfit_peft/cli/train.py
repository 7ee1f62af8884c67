"""``bitfit-peft train``: fine-tune a model with BitFit (defaults: packaged MiniLM on the SMS Spam demo).

The command's options are generated from :class:`~bitfit_peft.training.args.TrainArgs`: one option per field, with
the field's name (``--field-name``, or the field's ``flags``), default, help text and group, so the CLI cannot drift
from :func:`~bitfit_peft.training.train`. A boolean field is a switch (``--x/--no-x``), a field with ``choices`` takes
one of them, and a field that is neither a plain number, string nor path (``--lr 1e-2|auto``, ``--auto-lr-grid``,
``--bias-terms``) takes a string that the field's ``parse`` turns into its value. Only the options given on the
command line reach :meth:`TrainArgs.create <bitfit_peft.training.args.TrainArgs.create>`, so that without
``--data`` the demo's defaults apply to the rest, exactly as in ``train()``. ``--json`` and ``--verbose`` are the
command's own (how to report, not what to train).

A bad value is one line naming the flag, whether click rejects it (``--batch-size x``) or
:class:`~bitfit_peft.training.args.OptionError` does (its ``field`` maps to the flag).
"""

from __future__ import annotations

import inspect
import json
import os
import types
import typing
import warnings
from dataclasses import Field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape

from bitfit_peft.cli import SwitchCommand, app
from bitfit_peft.cli._errors import check_base, fail
from bitfit_peft.errors import BitFitError
from bitfit_peft.fmt import human_bytes
from bitfit_peft.training.args import GROUPS, OUTPUT, OptionError, TrainArgs, option_fields
from bitfit_peft.training.sources import DataError

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
_SCALARS = (bool, int, float, str, Path)


# ---------------------------------------------------------------------------------------------- fields -> options
def _members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def cli_type(f: Field) -> Any:
    """What the CLI parses a field's value as: one of its ``choices``, its own type for a plain (optional) scalar,
    else a string that the field's ``parse`` turns into the value."""
    if "choices" in f.metadata:
        return Literal[tuple(f.metadata["choices"])]  # type: ignore[misc]
    members = [h for h in _members(typing.get_type_hints(TrainArgs)[f.name]) if h is not type(None)]
    return members[0] if len(members) == 1 and members[0] in _SCALARS else str


def cli_default(f: Field) -> Any:
    """A field's default as the CLI shows and parses it (a choice's string, a tuple comma-separated)."""
    if "choices" in f.metadata and f.default is not None:  # None: the option is off unless given
        parse = f.metadata.get("parse", str)
        return next(c for c in f.metadata["choices"] if parse(c) == f.default)
    if isinstance(f.default, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in f.default)
    return f.default


def cli_flags(f: Field) -> tuple[str, ...]:
    """A field's option names: its ``flags``, else ``--field-name`` (a switch: ``--field-name/--no-field-name``)."""
    dashed = f.name.replace("_", "-")
    return tuple(f.metadata.get("flags", (f"--{dashed}/--no-{dashed}" if cli_type(f) is bool else f"--{dashed}",)))


def flag_of(field_name: str, value: Any = None) -> str:
    """The option a user types for ``field_name`` (of a switch, the side that sets ``value``)."""
    first = cli_flags(next(f for f in option_fields() if f.name == field_name))[0]
    on, _, off = first.partition("/")
    return off if off and value is False else on


def _parameter(f: Field) -> inspect.Parameter:
    kind, default = cli_type(f), cli_default(f)
    option = typer.Option(*cli_flags(f), help=f.metadata["help"], rich_help_panel=f.metadata["group"])
    annotation = kind if default is not None else kind | None
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, option])  # fmt: skip


#: the command's own options (how to report), after the TrainArgs ones
_OWN = [
    inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--json", help="Print the result as JSON instead of a table.", rich_help_panel=OUTPUT)]),
    inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--verbose", "-v", help="Show library warnings and load reports.", rich_help_panel=OUTPUT)]),
]  # fmt: skip


class TrainCommand(SwitchCommand):
    """A bad value that click itself rejects (not a number, not a choice) is one line naming the flag, too."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except typer.BadParameter as err:  # typer's validation prefixes "Value error, ": say it once
            fail(err.format_message().replace(": Value error, ", ": "))


def _fail(err: Exception, given: dict[str, Any]) -> typing.NoReturn:
    if isinstance(err, OptionError):
        fail(f"Invalid value for '{flag_of(err.field, given.get(err.field))}': {err}")
    fail(err)


# ---------------------------------------------------------------------------------------------- the command
def train_command(ctx: typer.Context, *, as_json: bool = False, verbose: bool = False, **values: Any) -> None:
    """Fine-tune with BitFit (see ``_HELP``); ``values``: one per :class:`TrainArgs` field."""
    given = {k: v for k, v in values.items() if ctx.get_parameter_source(k).name != "DEFAULT"}
    try:
        args = TrainArgs.create(**given)
    except OptionError as err:
        _fail(err, given)
    if args.model is not None:
        check_base(args.model)  # a folder / Hub id, or a .gguf file
    if not verbose:
        _quiet_libraries()

    console = Console(quiet=int(os.environ.get("RANK", "0")) != 0 or as_json)  # several ranks: rank 0 prints
    console.print(
        f"[bold]BitFit[/bold] training: model=[cyan]{escape(args.model or 'packaged MiniLM-L6')}[/cyan] "
        f"data=[cyan]{escape(args.data or 'packaged SMS Spam demo')}[/cyan] task=[cyan]{args.task}[/cyan]"
    )
    from bitfit_peft import training  # deferred: torch and transformers load only when a run starts
    from bitfit_peft.cli.epochs import EpochTable, print_plan, warn_if_no_better_than_majority  # deferred: as above
    from bitfit_peft.training.metrics import MAIN_METRIC  # deferred: as above
    from bitfit_peft.training.plan import EpochLog  # deferred: as above

    quiet = args.quiet or as_json
    epochs = [] if quiet else [EpochLog(EpochTable(console, MAIN_METRIC[args.task]))]
    try:
        result = training.train(replace(args, quiet=quiet), callbacks=epochs,
                                on_plan=None if quiet else lambda plan: print_plan(plan, console))  # fmt: skip
    except (DataError, BitFitError) as err:
        _fail(err, given)
    if as_json:
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(json.dumps(result.to_dict(), indent=2, default=str))  # "beats_majority": false warns
        return
    console.print(_result_table(result))
    warn_if_no_better_than_majority(result, console)


train_command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    + [_parameter(f) for f in option_fields()]
    + _OWN
)
app.command("train", help=_HELP, cls=TrainCommand)(train_command)


# ---------------------------------------------------------------------------------------------- reporting
def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def _fmt_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _result_table(result: Any) -> Any:
    """The result as a rich table (metrics before/after, sizes, what ``auto`` decided, timings, where it went)."""
    from rich.table import Table

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
    plan = result.extra.get("plan")
    if plan:
        table.add_row("\\[CLS] init" + (" (auto)" if "cls_probe" in result.extra else ""), escape(plan["cls_init"]))
    table.add_row("epochs run", f"{result.epochs_run:g}")
    table.add_row("wall time", f"{result.wall_time_s:.1f} s (training {result.train_time_s:.1f} s)")
    table.add_row("adapter saved to", result.output_dir)
    if result.hub_url:
        table.add_row("pushed to", result.hub_url)
    return table


# ---------------------------------------------------------------------------------------------- docs
def options_markdown() -> str:
    """The options table of ``docs/training.md`` (one row per :class:`TrainArgs` field, by group)."""
    lines = []
    for group in GROUPS:
        lines += ["", f"**{group}**", "", "| option | `TrainArgs` field | default | what |", "|---|---|---|---|"]
        for f in (f for f in option_fields() if f.metadata["group"] == group):
            flags = ", ".join(f"`{name}`" for decl in cli_flags(f) for name in decl.split("/"))
            default = cli_default(f)
            shown = "–" if default is None else f"`{default}`"
            lines.append(f"| {flags} | `{f.name}` | {shown} | {f.metadata['help'].replace('|', '/')} |")
    return "\n".join(lines[1:]) + "\n"
