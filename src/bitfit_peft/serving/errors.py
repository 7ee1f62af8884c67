"""What the serving engine refuses, one class per answer a server gives (``server.py`` maps them to HTTP codes).

The engine raises them where it checks each input (names and paths in ``registry.py`` / ``adapter_files.py``,
requests in ``inference.py``); a server only translates them.
"""

from __future__ import annotations

__all__ = [
    "AdapterNameError",
    "AdapterNotFoundError",
    "AdapterPathError",
    "BadAdapterPathError",
    "DuplicateAdapterError",
    "EngineError",
    "UnknownTaskError",
]


class EngineError(ValueError):
    """A request or adapter the engine cannot serve; the message says why."""


class UnknownTaskError(EngineError, KeyError):
    """A request names a task (adapter) that is not loaded."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateAdapterError(EngineError):
    """An adapter of that name is already loaded."""


class AdapterNameError(EngineError):
    """A name that cannot be an adapter's (see :func:`~bitfit_peft.serving.registry.validate_adapter_name`)."""


class AdapterPathError(EngineError):
    """An adapter source the engine may not read: outside the allowed folders (or linking out of them), no allowed
    folders at all, or the Hub when it is disabled. Its subclasses say the path is missing or unusable."""


class AdapterNotFoundError(AdapterPathError):
    """Nothing to load at the path: no such folder, or a folder without ``adapter_config.json``."""


class BadAdapterPathError(AdapterPathError):
    """A path the OS cannot use as an adapter folder: a symlink loop, a NUL byte, a name too long, a file."""
