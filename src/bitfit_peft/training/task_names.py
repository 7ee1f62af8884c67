"""The tasks of :func:`bitfit_peft.training.train` and their spellings (light: the CLI's ``--help`` reads them).

Example:
    >>> normalize_task("SEQ_CLS"), normalize_task("clm")
    ('seq-cls', 'causal-lm')
"""

from __future__ import annotations

from bitfit_peft.training.sources import DataError

TASKS: tuple[str, ...] = ("seq-cls", "regression", "token-cls", "causal-lm")
#: tasks with one label per sequence (a sequence head; text pairs allowed)
SEQUENCE_TASKS: tuple[str, ...] = ("seq-cls", "regression")


def normalize_task(task: str) -> str:
    """Accept ``seq-cls``/``seq_cls``/``SEQ_CLS``-style spellings; return the canonical dashed name."""
    canon = task.strip().lower().replace("_", "-")
    aliases = {"sequence-classification": "seq-cls", "token-classification": "token-cls", "clm": "causal-lm"}
    canon = aliases.get(canon, canon)
    if canon not in TASKS:
        raise DataError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    return canon
