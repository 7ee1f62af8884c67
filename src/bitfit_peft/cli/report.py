"""``bitfit-peft inspect``: how much each bias of a BitFit adapter moved (the paper's Fig. 1).

Example:
    $ bitfit-peft inspect out/my-adapter --plot bias_change.png --tolerance 1e-4
    $ bitfit-peft inspect some-user/some-bitfit-adapter --base sentence-transformers/all-MiniLM-L6-v2

The adapter's files are read as they are (nothing is loaded onto ``--base``, which only supplies the original biases
for the relative change), so there is no base fingerprint check and no ``--allow-base-mismatch`` here. A missing
directory, a folder without ``adapter_model.safetensors`` or a Hub id that cannot be fetched is one line, exit code 2.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bitfit_peft.cli import SwitchCommand, app
from bitfit_peft.cli._errors import MODEL, check_source, fail, hub_problem
from bitfit_peft.files.paths import describe_missing, is_hub_id
from bitfit_peft.fmt import human_bytes
from bitfit_peft.names import ADAPTER_FILE, DEFAULT_TOLERANCE

if TYPE_CHECKING:
    from bitfit_peft.bias_report import BiasChangeReport

__all__ = ["inspect_command", "print_report", "register"]


def _fmt(x: float) -> str:
    return "·" if math.isnan(x) else f"{x:.2e}"


def print_report(report: BiasChangeReport, console: Console | None = None, max_listed: int = 10) -> None:
    """Print the layer x kind grid and the totals as rich tables."""
    console = console or Console()
    grid = Table(title=f"mean |Δb| per layer and bias kind — {report.source}", title_justify="left")
    grid.add_column("kind", style="bold")
    for layer in report.layers:
        grid.add_column("–" if layer is None else str(layer), justify="right")
    grid.add_column("kind mean", justify="right", style="cyan")
    values = report.grid()
    top = max((x for row in values for x in row if not math.isnan(x)), default=0.0) or 1.0
    for kind, row in zip(report.kinds, values, strict=True):
        vs = [v for v in report.vectors if v.kind == kind]
        n = sum(v.n_finite for v in vs)
        kind_mean = sum(v.abs_sum for v in vs) / n if n else math.nan
        cells = [_fmt(x) if math.isnan(x) or x < 0.5 * top else f"[bold]{_fmt(x)}[/bold]" for x in row]
        grid.add_row(kind, *cells, _fmt(kind_mean))
    console.print(grid)

    totals = Table(show_header=False, title="totals", title_justify="left")
    totals.add_column("what", style="bold")
    totals.add_column("value")
    totals.add_row("adapter", report.adapter_name)
    if report.task_type:
        totals.add_row("task", report.task_type)
    if report.labels:
        shown = ", ".join(escape(label) for label in report.labels[:max_listed])
        more = f" (+{len(report.labels) - max_listed} more)" if len(report.labels) > max_listed else ""
        totals.add_row("labels", f"{len(report.labels)}: {shown}{more}")
    totals.add_row("bias vectors", str(report.n_vectors))
    totals.add_row("delta parameters", f"{report.n_params:,}")
    totals.add_row("delta size", f"{human_bytes(report.nbytes)} ({report.nbytes:,} bytes)")
    totals.add_row("mean |Δb| (all)", _fmt(report.mean_abs))
    nonfinite = report.n_nan + report.n_inf
    style = "red" if nonfinite else "green"
    totals.add_row("NaN / Inf entries", f"[{style}]{report.n_nan} / {report.n_inf}[/{style}]")
    pr = report.prunable
    totals.add_row(
        f"prunable at tol {report.tolerance:g}",
        f"{len(pr)} vector(s), {human_bytes(report.prunable_bytes)}",
    )
    console.print(totals)
    if nonfinite:
        console.print(f"[red]non-finite deltas in:[/red] {', '.join(report.nonfinite_vectors[:max_listed])}")
    if pr:
        names = ", ".join(v.name for v in pr[:max_listed])
        more = f" (+{len(pr) - max_listed} more)" if len(pr) > max_listed else ""
        console.print(f"prunable (mean |Δb| < {report.tolerance:g}): {names}{more}")
        console.print(f"(BitFitConfig(prune_tolerance={report.tolerance:g}) leaves these out when saving)")


def _hub_errors() -> tuple[type[BaseException], ...]:
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    return (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, httpx.TransportError)


@app.command("inspect", cls=SwitchCommand)
def inspect_command(
    adapter: str = typer.Argument(..., help="Adapter directory or Hugging Face Hub id."),
    base: str | None = typer.Option(
        None, "--base", help="Base model (path or Hub id): adds relative change |Δb|/|b0| per vector."
    ),
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG heatmap (rows: kinds, cols: layers)."),
    tolerance: float = typer.Option(
        DEFAULT_TOLERANCE, "--tolerance", min=0.0, help="A vector is prunable when its mean |Δb| < this."
    ),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the full report as JSON."),
) -> None:
    """Show the average absolute change of every bias (per layer and kind) of a BitFit adapter."""
    local = Path(adapter).expanduser()
    if not (local.is_file() and local.name.endswith(".safetensors")):
        problem = describe_missing(adapter, ADAPTER_FILE, "a BitFit adapter")
        if problem:
            fail(problem)
    if base is not None:
        check_source(base, MODEL)
    try:
        from bitfit_peft.bias_report import bias_change_report  # deferred: torch loads when a report is made

        report = bias_change_report(adapter, base=base, tolerance=tolerance, revision=revision)
    except _hub_errors() as err:
        fail(hub_problem(adapter, err, revision=revision) if is_hub_id(adapter) else err)
    except (FileNotFoundError, ValueError) as err:
        fail(err)
    console = Console()
    print_report(report, console)
    if plot is not None:
        from bitfit_peft.bias_report import plot_bias_heatmap  # deferred: as above

        out = plot_bias_heatmap(report, plot)
        console.print(f"heatmap written to {out}")
    if json_path is not None:
        report.to_json(json_path)
        console.print(f"report written to {json_path}")


def register(other_app: typer.Typer) -> None:
    """Add the ``inspect`` command to another typer app (it is already on ``bitfit_peft.cli.app``)."""
    other_app.command("inspect", cls=SwitchCommand)(inspect_command)
