"""How every ``bitfit-peft`` command reports a problem it can name: ONE line, no traceback, exit code 2.

``error: <what is wrong>`` goes to stderr on a single line (never wrapped, whatever the terminal width), and the
command exits with code 2, the code typer / click give usage errors (a bad option value): 2 means "nothing was done,
fix the arguments or the files they point at". A crash (a bug) still exits with 1 and a traceback.

The checks here run before anything slow (loading data or a model), so a typo fails at once:

* a model or adapter argument that is meant as a local path (see :func:`bitfit_peft.files.paths.looks_local`) but does
  not exist: ``no such directory: ./missing``;
* a directory without the file that makes it a model / adapter: ``some_dir: no config.json (not a transformers
  model directory)``;
* a Hub id that cannot be fetched: ``user/repo: cannot fetch it from the Hugging Face Hub: offline ...``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from bitfit_peft.compat.gguf import GgufNameError, split_gguf
from bitfit_peft.files.paths import describe_missing

__all__ = [
    "ADAPTER",
    "EXIT_CODE",
    "MISMATCH_HINT",
    "MODEL",
    "check_base",
    "check_source",
    "fail",
    "hub_problem",
    "one_line",
    "with_flag_hint",
]

#: exit code of every reported error (typer's code for usage errors)
EXIT_CODE = 2
#: (file a folder must hold, what such a folder is), for :func:`check_source`
MODEL = ("config.json", "a transformers model directory")
ADAPTER = ("adapter_config.json", "a PEFT adapter")
#: appended to the base-mismatch error when the command has the flag
MISMATCH_HINT = " (or pass --allow-base-mismatch)"


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(message).split())


def fail(message: object) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit with :data:`EXIT_CODE`."""
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    console.print(f"[bold red]error:[/bold red] {escape(one_line(message))}")
    raise typer.Exit(EXIT_CODE)


def with_flag_hint(err: BaseException) -> str:
    """The message of ``err``, plus " (or pass --allow-base-mismatch)" when it asks for ``allow_base_mismatch``."""
    text = one_line(err)
    if "allow_base_mismatch" not in text or MISMATCH_HINT in text:
        return text
    return text[:-1] + MISMATCH_HINT + "." if text.endswith(".") else text + MISMATCH_HINT


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(f.strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def hub_problem(repo_id: str, err: BaseException, filename: str | None = None, what: str = "",
                revision: str | None = None) -> str:
    """One line naming ``repo_id`` and why fetching it from the Hub failed (offline, unreachable, missing...)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    unreachable: tuple[type[BaseException], ...] = (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError)
    try:
        import httpx

        unreachable += (httpx.TransportError,)
    except ImportError:  # pragma: no cover - huggingface_hub >= 1.0 depends on httpx
        pass
    if isinstance(err, unreachable):
        why = "offline (HF_HUB_OFFLINE is set)" if _offline() else "the Hub is unreachable (no network?)"
        return f"{repo_id}: cannot fetch it from the Hugging Face Hub: {why}, and it is not in the local cache"
    if isinstance(err, GatedRepoError):
        return f"{repo_id}: a gated repository on the Hugging Face Hub; accept its terms on the Hub and log in"
    if isinstance(err, RepositoryNotFoundError):
        return f"{repo_id}: no such repository on the Hugging Face Hub (or it is private: log in first)"
    if isinstance(err, RevisionNotFoundError):
        return f"{repo_id}: no revision {revision!r} on the Hugging Face Hub"
    if isinstance(err, RemoteEntryNotFoundError) and filename:
        return f"{repo_id}: no {filename} on the Hugging Face Hub" + (f" (not {what})" if what else "")
    return f"{repo_id}: cannot fetch it from the Hugging Face Hub: {one_line(err)}"


def check_source(
    source: str,
    kind: tuple[str, str] = MODEL,
    *,
    label: str = "",
    revision: str | None = None,
    allow_hub: bool = True,
) -> None:
    """Exit with one line unless ``source`` is a local folder holding ``kind``'s file, or a fetchable Hub id.

    ``kind``: :data:`MODEL` or :data:`ADAPTER`; ``label`` prefixes the message (``adapter 'sst2'``); with
    ``allow_hub=False`` a Hub id is refused (the command's ``--allow-hub`` enables it). For a Hub id, only
    ``kind``'s small file is downloaded (into the usual cache, where the real load finds it).
    """
    required, what = kind
    prefix = f"{label}: " if label else ""
    problem = describe_missing(source, required, what)
    if problem:
        fail(prefix + problem)
    if Path(source).expanduser().is_dir():
        return
    if not allow_hub:
        fail(f"{prefix}{source}: no such directory, and loading Hub ids is disabled (pass --allow-hub to fetch it)")
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(source, required, revision=revision)
    except Exception as err:  # noqa: BLE001 - every Hub failure becomes one line naming the id
        fail(prefix + hub_problem(source, err, required, what, revision))


def check_base(name: str) -> None:
    """:func:`check_source` for a base model; a name ending in ``.gguf`` must be a local GGUF file or
    ``<repo id>/<file>.gguf`` on the Hub (:mod:`bitfit_peft.compat.gguf`)."""
    try:
        folder, gguf_file = split_gguf(name)
    except GgufNameError as err:
        fail(err)
    if gguf_file is None:
        check_source(name, MODEL)
    elif not Path(folder, gguf_file).is_file():
        check_source(folder, (gguf_file, "a GGUF model repository"))
