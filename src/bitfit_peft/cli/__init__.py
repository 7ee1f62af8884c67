"""The ``bitfit-peft`` command line.

``app`` is the root typer app. Each subcommand lives in its own module, which imports ``app`` from here and
registers itself with ``@app.command(...)``; the imports at the bottom of this file load them.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="bitfit-peft",
    help="BitFit (bias-only fine-tuning) as a Hugging Face PEFT tuner type.\n\n"
    "Run `bitfit-peft train` with no arguments to fine-tune the packaged MiniLM on the packaged SMS Spam demo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        from bitfit_peft import __version__

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
from bitfit_peft.cli import inspect as _inspect_cmd  # noqa: E402, F401
from bitfit_peft.cli import serve as _serve_cmd  # noqa: E402, F401
from bitfit_peft.cli import train as _train_cmd  # noqa: E402, F401
