"""All-or-nothing adapter saves.

PEFT writes ``adapter_config.json`` and ``adapter_model.safetensors`` (and a README, and one subfolder per extra
adapter) as separate files, so a process killed mid-save could leave a new weights file beside an old config.
For BitFit models ``save_pretrained`` therefore writes everything into a staging folder inside the target,
records a small journal, then moves the files into place. If the process dies:

- before the journal exists: the old files are untouched (the staging folder is garbage, removed later);
- after it: the next load (or save) of that folder finishes the moves first (roll forward).

Either way a reader sees the complete old adapter or the complete new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

JOURNAL = ".bitfit-commit.json"
STAGING_PREFIX = ".bitfit-staging-"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _write_journal(directory: Path, staging: Path, files: list[str]) -> None:
    tmp = directory / (JOURNAL + ".tmp")
    tmp.write_text(json.dumps({"staging": staging.name, "files": files}))
    _fsync_file(tmp)
    os.replace(tmp, directory / JOURNAL)


def recover(directory: str | os.PathLike) -> None:
    """Finish an interrupted save in ``directory`` (if any) and remove stale staging folders."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    journal = directory / JOURNAL
    if journal.exists():
        try:
            record = json.loads(journal.read_text())
            staging = directory / record["staging"]
            files = list(record["files"])
        except (ValueError, KeyError, TypeError):
            journal.unlink()  # written atomically, so a bad journal is not ours: ignore it
        else:
            for rel in files:
                src = staging / rel
                if src.exists():
                    (directory / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, directory / rel)
            journal.unlink()
    for stale in directory.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    (directory / (JOURNAL + ".tmp")).unlink(missing_ok=True)


def transactional_save(directory: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(staging_dir)`` then move its files into ``directory`` as one unit."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    recover(directory)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
    try:
        card = directory / "README.md"
        if card.exists():  # PEFT updates an existing model card in place: give it the current one
            shutil.copy2(card, staging / "README.md")
        write(str(staging))
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        for rel in files:
            _fsync_file(staging / rel)
        _write_journal(directory, staging, files)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    recover(directory)
