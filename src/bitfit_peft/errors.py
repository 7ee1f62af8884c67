"""The one exception type of bitfit-peft (its own module, so every other module can import it without a cycle)."""

from __future__ import annotations


class BitFitError(ValueError):
    """A BitFit configuration or checkpoint does not fit the model; the message says what to change."""
