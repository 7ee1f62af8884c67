"""The serving engine's limits: how much work one request, one batch and one adapter may cost.

Tenants of one server do not trust each other, so every request has a **cost** computed before any work, counted
in tokens rather than characters (``docs/security.md#limits``):

- predict: the tokens of each input after truncation to ``max_length`` (:func:`predict_cost`);
- generate: ``(prompt tokens + max_new_tokens) x num_beams x num_return_sequences`` per prompt
  (:func:`generate_cost`), the sequences the model extends and the tokens it produces.

A request over its per-request budget is refused (HTTP 413, naming the limit and the budget); the dynamic batcher
fills a batch only up to the per-batch budget (counted as ``inputs x longest cost``, the padded batch), so one
batch, the longest the engine lock is ever held for inference, is bounded. Adapters are bounded too: a head may
have at most ``max_labels`` outputs and ``max_head_bytes`` bytes, checked from the file's header before anything
is read or committed.

Example:
    >>> limits = Limits()
    >>> generate_cost([12, 30], max_new_tokens=32, num_beams=2, num_return_sequences=1)
    212
    >>> limits.check_request("predict", [500, 500])
    >>> limits.check_request("predict", [512] * 40)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    bitfit_peft.serving.limits.BudgetError: ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bitfit_peft.serving.errors import EngineError

__all__ = ["CHARS_PER_TOKEN", "BudgetError", "Limits", "generate_cost", "predict_cost"]

#: texts are cut to ``max_length x CHARS_PER_TOKEN`` characters before tokenizing (a token rarely spans more), so
#: tokenizing a hostile 20,000-character text costs what a ``max_length`` one does
CHARS_PER_TOKEN = 8


class BudgetError(EngineError):
    """A request whose cost exceeds a budget (HTTP 413): the message names the limit and the budget."""


@dataclass(frozen=True)
class Limits:
    """Budgets of one engine (defaults measured on the packaged MiniLM, ``docs/security.md#limits``).

    Args:
        max_request_tokens: predict: most tokens (after truncation) one request may hold.
        max_batch_tokens: predict: most padded tokens (inputs x longest) one forward may hold.
        max_request_generate_cost: generate: most cost (:func:`generate_cost`) one request may have.
        max_batch_generate_cost: generate: most padded cost one ``generate`` call may have.
        max_labels: most outputs of an adapter's classifier head.
        max_head_bytes: most bytes of an adapter's head tensors.
        load_timeout_s: a load on demand (``adapter_roots``) that takes longer is refused.
        queue_timeout_s: a request waiting longer than this for its batch is answered 503 + ``Retry-After``.
        max_inputs_per_request: most inputs (texts, prompts) one request may hold (HTTP 413 beyond; the OpenAI
            routes: 400).
        max_new_tokens_limit: most ``max_new_tokens`` (``max_tokens``) one generation may ask for (HTTP 413 beyond).
    """

    max_request_tokens: int = 16_384
    max_batch_tokens: int = 512
    max_request_generate_cost: int = 16_384
    max_batch_generate_cost: int = 32_768
    max_labels: int = 4_096
    max_head_bytes: int = 64 << 20
    load_timeout_s: float = 10.0
    queue_timeout_s: float = 30.0
    max_inputs_per_request: int = 256
    max_new_tokens_limit: int = 512

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise EngineError(f"Limit {key} must be a positive number, got {value!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def batch_budget(self, kind: str) -> int:
        """The per-batch budget of ``kind`` (``"predict"`` or ``"generate"``)."""
        return self.max_batch_tokens if kind == "predict" else self.max_batch_generate_cost

    def check_request(self, kind: str, costs: Sequence[int]) -> None:
        """Refuse (:class:`BudgetError`) a request whose items cost ``costs`` in total beyond its budget, or (generate)
        one of whose items alone exceeds a batch's; a predict input is bounded by ``max_length`` and may always run
        alone in a batch."""
        if kind == "predict":
            limit, budget, unit = "max_request_tokens", self.max_request_tokens, "tokens"
        else:
            limit, budget, unit = "max_request_generate_cost", self.max_request_generate_cost, "cost units"
        total = sum(costs)
        if total > budget:
            raise BudgetError(f"This request costs {total:,} {unit} (after truncation), over the server's {limit} "
                              f"budget of {budget:,}; send fewer or shorter inputs (or fewer beams/tokens).")
        largest, batch = max(costs, default=0), self.batch_budget(kind)
        if kind != "predict" and largest > batch:
            raise BudgetError(f"One prompt of this request costs {largest:,} {unit}, over the server's "
                              f"max_batch_generate_cost budget of {batch:,} per batch; ask for fewer beams/tokens.")


def predict_cost(input_ids: Sequence[int]) -> int:
    """The cost of one predict input: its tokens after truncation."""
    return len(input_ids)


def generate_cost(prompt_tokens: Sequence[int], max_new_tokens: int, num_beams: int = 1,
                  num_return_sequences: int = 1) -> int:
    """The cost of prompts of ``prompt_tokens`` tokens: ``(tokens + max_new_tokens) x beams x sequences`` each."""
    fan_out = max(1, int(num_beams)) * max(1, int(num_return_sequences))
    return sum((int(n) + int(max_new_tokens)) * fan_out for n in prompt_tokens)
