"""What the serving engine refuses, one class per answer a server gives (see ``server.py`` for the HTTP codes)."""

from __future__ import annotations

__all__ = ["AdapterPathError", "DuplicateAdapterError", "EngineError", "UnknownTaskError"]


class EngineError(ValueError):
    """A request or adapter the engine cannot serve; the message says why."""


class UnknownTaskError(EngineError, KeyError):
    """A request names a task (adapter) that is not loaded."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateAdapterError(EngineError):
    """An adapter of that name is already loaded."""


class AdapterPathError(EngineError):
    """An adapter path that is malformed, missing, or leads (by a symlink) outside the allowed folders."""
