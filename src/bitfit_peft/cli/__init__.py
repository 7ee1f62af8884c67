"""The ``bitfit-peft`` command line.

``app`` is the root typer app. Each subcommand lives in its own module, which imports ``app`` from here and
registers itself with ``@app.command(..., cls=SwitchCommand)``; the imports at the bottom of this file load them.

Errors: a problem the command can name (a missing model or adapter directory, a folder that is not a model, a Hub id
that cannot be fetched, a bad option value) is ONE line ``error: ...`` on stderr and exit code 2, the code typer
gives usage errors (see :mod:`bitfit_peft.cli._errors`). Exit code 1 with a traceback means a bug.

``--help`` shows boolean options as switches (``--flag`` or ``--flag/--no-flag``), without a value type. It is
click's plain layout, grouped by panel (``rich_help_panel``): it wraps to any width without cutting option names
and prints help texts as written (Rich markup would eat ``[ray]``).
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from bitfit_peft.names import __version__


def _as_switches(params: list[Any]) -> list[Any]:
    """Boolean flags show no value type in ``--help`` (typer prints ``<bool>``, which reads like a value)."""
    for param in params:
        if getattr(param, "is_bool_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


def _format_by_panel(command: Any, ctx: Any, formatter: Any) -> None:
    """Arguments, then the options of each help panel (typer's ``rich_help_panel``) in a section of its own."""
    sections: dict[str, list[tuple[str, str]]] = {}
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is not None:
            panel = "Arguments" if param.param_type_name == "argument" else getattr(param, "rich_help_panel", None)
            sections.setdefault(panel or "Options", []).append(record)
    for name, rows in sections.items():
        with formatter.section(name):
            formatter.write_dl(rows)


class SwitchCommand(TyperCommand):
    """A typer command whose ``--help`` shows boolean options as switches only, grouped by panel."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _as_switches(super().get_params(ctx))

    def format_options(self, ctx: Any, formatter: Any) -> None:
        _format_by_panel(self, ctx, formatter)


class SwitchGroup(TyperGroup):
    """The root group, with the same ``--help`` rule as :class:`SwitchCommand`."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _as_switches(super().get_params(ctx))


app = typer.Typer(
    name="bitfit-peft",
    help="BitFit (bias-only fine-tuning) as a Hugging Face PEFT tuner type.\n\n"
    "Run `bitfit-peft train` with no arguments to fine-tune the packaged MiniLM on the packaged SMS Spam demo.\n\n"
    "Errors (a missing model or adapter, a folder that is not one, an unreachable Hub id, a bad option value) are "
    "one line on stderr and exit with code 2.",
    cls=SwitchGroup,
    rich_markup_mode=None,  # click's plain help: never cuts option names at 80 columns, keeps "[ray]" as written
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bitfit-peft {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Root command: only global options; the work is done by subcommands."""


# Subcommand modules (each registers itself on `app`): add one import line per module.
from bitfit_peft.cli import report as _report_cmd  # noqa: E402, F401
from bitfit_peft.cli import serve as _serve_cmd  # noqa: E402, F401
from bitfit_peft.cli import train as _train_cmd  # noqa: E402, F401
