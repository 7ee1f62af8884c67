"""Step-level interleaving: short requests run between the transformer blocks of a long model call.

A ``generate`` call holds the engine for as many model steps as it makes new tokens, and a forward over long inputs
for every block of the model, so one tenant's costliest allowed request (4 beams x 4 sequences x 512 tokens) would
hold every other tenant back for the whole of it. The dynamic batcher (``batching.py``) therefore installs a *step
hook* on the thread that runs a batch (:func:`step_hook`); the engine calls :func:`between_steps` before every
transformer block runs (:func:`install_boundaries`, a forward pre-hook on each block, so at every decoding step
too), and the hook runs the much cheaper batches that wait (each nested call may interleave even cheaper ones in
turn), then the long call resumes where it was. The engine puts the long call's model state aside around the inner
calls (``BitFitModel.call_set_aside``) and forks the random stream, so the long call's result is exactly what it
would be alone.

Example:
    >>> from contextlib import nullcontext
    >>> ran = []
    >>> def hook(set_aside):  # the batcher's: run what waits, with the long call's state set aside
    ...     with set_aside():
    ...         ran.append("short request")
    >>> with step_hook(hook):
    ...     between_steps(nullcontext)  # what the engine does before each transformer block
    >>> between_steps(nullcontext)  # no hook on this thread: nothing runs
    >>> ran
    ['short request']
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from torch import nn

__all__ = ["SetAside", "StepHook", "between_steps", "blocks", "install_boundaries", "step_hook"]

#: a context manager factory: the calling model's state put aside (and its random stream forked) while inner calls run
SetAside = Callable[[], AbstractContextManager]
#: called between two transformer blocks with the engine's :data:`SetAside`; runs waiting work inside it, or returns
StepHook = Callable[[SetAside], None]

_local = threading.local()


@contextmanager
def step_hook(hook: StepHook) -> Iterator[None]:
    """Call ``hook`` at every :func:`between_steps` of this thread while the block runs (nested blocks stack)."""
    previous = getattr(_local, "hook", None)
    _local.hook = hook
    try:
        yield
    finally:
        _local.hook = previous


def between_steps(set_aside: SetAside) -> None:
    """Called by the engine between two transformer blocks: runs this thread's step hook, if any."""
    hook = getattr(_local, "hook", None)
    if hook is not None:
        hook(set_aside)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: the members of each outermost ``ModuleList`` of two or more modules of
    one class (``encoder.layer``, ``transformer.h``, ``model.layers``, T5's encoder and decoder ``block``)."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        found.extend(module)
        inside.update(id(m) for child in module for m in child.modules())
    return found


def install_boundaries(model: nn.Module, set_aside: SetAside) -> list[Any]:
    """Call :func:`between_steps` (with ``set_aside``) before each of ``model``'s :func:`blocks` runs; returns the
    hook handles (``handle.remove()`` takes one away). Without a step hook on the thread a call costs one lookup."""

    def boundary(_module: nn.Module, _args: Any) -> None:
        between_steps(set_aside)

    return [block.register_forward_pre_hook(boundary) for block in blocks(model)]
