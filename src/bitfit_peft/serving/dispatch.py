"""Running a server's dynamic batch on one engine: tokenized outside the lock, in residency rounds, failures isolated.

A dynamic batch mixes the requests of many tenants, so one tenant's broken adapter must not fail the others:

- **Encode first.** Raw payloads are tokenized (and costed) before the engine lock (``encoding.py``); a payload of
  the OpenAI-compatible API (it carries stop strings, a stream's sink) is costed the same way and kept whole
  (:class:`Costed`), run by ``openai_engine.KINDS``.
- **Residency rounds.** With ``max_resident=K`` a batch naming more than K adapters is run as consecutive rounds
  of at most K (pinned adapters and the base do not count), never refused (``residency.rounds``).
- **Isolation.** When a round fails, its adapters are split in two halves and each half re-run, down to the one
  adapter whose requests fail (:func:`run_engine_batch`): the rest of the batch is answered, at the cost of
  ``O(log adapters)`` extra forwards. A failure that is not the engine's own refusal is reported as
  :class:`AdapterRunError`, naming the adapter.

"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bitfit_peft.serving.batching import DynamicBatcher, Runner
from bitfit_peft.serving.encoding import Encoded
from bitfit_peft.serving.engine import MultiTaskEngine
from bitfit_peft.serving.errors import EngineError, UnknownTaskError
from bitfit_peft.serving.openai_engine import KINDS, Costed, render_prompt
from bitfit_peft.serving.residency import rounds
from bitfit_peft.tuner.routing import BASE_ADAPTER_NAME

__all__ = ["AdapterRunError", "Costed", "admit", "budget_kind", "encode_payloads", "engine_batcher",
           "run_engine_batch", "unknown_tasks", "with_costs"]


class AdapterRunError(EngineError):
    """An adapter failed while its requests ran (HTTP 500); the other requests of the batch were answered."""


def unknown_tasks(engine: MultiTaskEngine, tasks: Sequence[str]) -> UnknownTaskError | None:
    unknown = sorted({t for t in tasks if not engine.has_task(t)})
    if not unknown:
        return None
    return UnknownTaskError(f"Unknown task(s) {unknown[:20]}; loaded adapters: {sorted(engine.tasks())[:20]} "
                            f"(or {BASE_ADAPTER_NAME!r} for the bare base model).")


def budget_kind(kind: str) -> str:
    """The budget a batch kind is held to (``limits.py``): ``"predict"`` (tokens) or ``"generate"`` (cost units)."""
    return "predict" if kind in ("predict", "oai_pool") else "generate"


def encode_payloads(engine: MultiTaskEngine, kind: str, settings: tuple, payloads: Sequence[Any]) -> list[Any]:
    """Raw ``(task, text[, pair])`` / ``(task, prompt)`` payloads as :class:`Encoded`, the OpenAI API's as
    :class:`Costed` (no lock taken)."""
    if kind in KINDS:
        return _costed(engine, kind, settings, payloads)
    raw = [p for p in payloads if not isinstance(p, Encoded)]
    if not raw:
        return list(payloads)
    if kind == "predict":
        encoded = iter(engine.inference.encode(raw))
    else:
        encoded = iter(engine.inference.encode_prompts([(p[0], p[1]) for p in raw], dict(settings)))
    return [p if isinstance(p, Encoded) else next(encoded) for p in payloads]


def admit(engine: MultiTaskEngine, kind: str, settings: tuple, payloads: Sequence[Any]) -> list[Any]:
    """A request's payloads tokenized and costed (:func:`encode_payloads`, no lock), refused with
    :class:`~bitfit_peft.serving.limits.BudgetError` (413) when over the per-request budget: the step every server
    (plain, Ray replica, streams) takes before a request reaches the batcher."""
    items = encode_payloads(engine, kind, settings, payloads)
    engine.limits.check_request(budget_kind(kind), [it.cost for it in items])
    return items


def _costed(engine: MultiTaskEngine, kind: str, settings: tuple, payloads: Sequence[Any]) -> list[Costed]:
    if all(isinstance(p, Costed) for p in payloads):
        return list(payloads)
    if kind == "oai_pool":
        encoded = engine.inference.encode([(p[0], p[1]) for p in payloads])
    else:
        prompts = [(p[0], render_prompt(engine.tokenizer, p[1])) for p in payloads]
        encoded = engine.inference.encode_prompts(prompts, dict(settings))
    return [Costed(p[0], tuple(p), e) for p, e in zip(payloads, encoded, strict=True)]


def with_costs(costed: Sequence[Costed], payloads: Sequence[tuple]) -> list[Costed]:
    """``payloads`` (the requests of ``costed``, in order, e.g. with a stream's sinks added) with their costs."""
    return [Costed(c.task, tuple(p), c.encoded) for c, p in zip(costed, payloads, strict=True)]


def engine_batcher(engine: MultiTaskEngine, max_batch_size: int, max_wait_ms: float, max_queue: int,
                   runner: Runner | None = None) -> DynamicBatcher:
    """The dynamic batcher in front of ``engine`` (the plain server's and each Ray replica's): batches of any tasks
    within the engine's per-batch budgets, the queue deadline, and cheaper requests of resident adapters run
    between the blocks of a long batch (``interleave.py``). ``runner``: default :func:`run_engine_batch`."""
    limits = engine.limits
    return DynamicBatcher(runner or (lambda key, p: run_engine_batch(engine, *key, p)),  # type: ignore[misc]
                          max_batch_size, max_wait_ms, max_queue, task_of=lambda p: p.task, cost_of=lambda p: p.cost,
                          budget_of=lambda key: limits.batch_budget(budget_kind(key[0])),
                          queue_timeout_s=limits.queue_timeout_s,
                          interleave=lambda p: engine.registry.is_resident(p.task))


def run_engine_batch(engine: MultiTaskEngine, kind: str, settings: tuple, payloads: list[Any]) -> list[Any]:
    """One dynamic batch of any tasks: a result, or an exception instance failing just that input, per payload."""
    results: list[Any] = [None] * len(payloads)
    try:
        items = encode_payloads(engine, kind, settings, payloads)
    except EngineError as err:
        return [err] * len(payloads)
    residency = engine.registry.residency
    for idx in rounds([it.task for it in items], residency.capacity, residency.pinned):
        groups: dict[str, list[int]] = {}
        for i in idx:
            groups.setdefault(items[i].task, []).append(i)
        _run_isolated(engine, kind, settings, items, list(groups.values()), results)
    return results


def _run_isolated(engine: MultiTaskEngine, kind: str, settings: tuple, items: list[Any],
                  groups: list[list[int]], results: list[Any]) -> None:
    """Run ``groups`` (input indices, one list per adapter) together; on failure, halves again until it is one
    adapter, whose inputs then carry the error."""
    idx = [i for g in groups for i in g]
    live = [i for i in idx if engine.has_task(items[i].task)]
    for i in set(idx) - set(live):
        results[i] = UnknownTaskError(f"Adapter {items[i].task!r} was removed before this request ran.")
    if not live:
        return
    subset = [items[i] for i in live]
    try:
        if kind == "predict":
            outputs: list[Any] = engine.inference.predict_encoded(subset)
        elif kind in KINDS:  # the OpenAI-compatible API's kinds (openai_engine.py)
            outputs = list(KINDS[kind](engine, settings, subset))
        else:
            outputs = engine.inference.generate_encoded(subset, **dict(settings))
    except Exception as err:  # noqa: BLE001 - one tenant's failure must not fail the others
        groups = [g for g in groups if any(i in live for i in g)]
        if len(groups) > 1:
            half = len(groups) // 2
            _run_isolated(engine, kind, settings, items, groups[:half], results)
            _run_isolated(engine, kind, settings, items, groups[half:], results)
            return
        for i in live:
            results[i] = err if isinstance(err, EngineError) else AdapterRunError(
                f"Adapter {items[i].task!r} failed on this request ({type(err).__name__}); the other requests were "
                "answered. Remove or re-train the adapter.")
        return
    for i, out in zip(live, outputs, strict=True):
        results[i] = out
