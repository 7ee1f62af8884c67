"""Formatting helpers with no heavy import (the CLI uses them before torch loads)."""

from __future__ import annotations


def human_bytes(n: int | None) -> str:
    """``1536 -> '1.5 KiB'``; ``None -> 'unknown'``.

    Example:
        >>> human_bytes(1536)
        '1.5 KiB'
    """
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover
