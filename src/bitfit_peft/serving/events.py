"""Adapter lifecycle events of one engine: every load, unload, eviction and refused load, logged with its reason and
handed to listeners (a server's metrics).

The engine's registry emits them (``registry.events``); a listener is called on the thread that loaded, with the
event, the adapter name and details (``reason``, ``seconds``, ``source``). Log lines go to the
``bitfit_peft.serving.adapters`` logger, one per event, as ``key=value`` pairs (JSON with
:func:`bitfit_peft.serving.request_log.configure_logging`).

Example:
    >>> events = AdapterEvents()
    >>> seen = []
    >>> events.subscribe(lambda event, name, info: seen.append((event, name)))
    >>> events.emit("evict", "sst2", reason="least recently used")
    >>> seen
    [('evict', 'sst2')]
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["EVENTS", "AdapterEvents"]

logger = logging.getLogger("bitfit_peft.serving.adapters")
EVENTS = ("load", "unload", "evict", "load_failed")
Listener = Callable[[str, str, dict[str, Any]], None]


class AdapterEvents:
    """Listeners of one registry's adapter events (see the module docstring)."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, event: str, name: str, **info: Any) -> None:
        level = logging.WARNING if event == "load_failed" else logging.INFO
        fields = {"event": f"adapter_{event}", "adapter": name, **info}
        logger.log(level, " ".join(f"{k}={_value(v)}" for k, v in fields.items()), extra={"fields": fields})
        for listener in list(self._listeners):
            try:
                listener(event, name, info)
            except Exception:  # noqa: BLE001 - a broken listener must not fail a load
                logger.exception("adapter event listener failed")


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    text = str(value)
    return text if text and text.isprintable() and not any(c in text for c in " ='\"") else repr(text)
