"""What the OpenAI-compatible API adds to a Ray Serve replica: streamed completions (:class:`StreamingReplica`) and
engine metrics through ``ray.serve.metrics`` (:class:`ReplicaMetrics`; Ray exports them with its own metrics:
``ray_`` + the name below, on every node's metrics port, tagged with the deployment, replica and application).

The ingress serves ``GET /metrics`` of the app itself (requests, latency, tokens, time to first token, inter-token
latency, ``vllm:lora_requests_info`` as seen by the ingress); batches, residency and adapter events happen in the
replicas and are these series:

- ``bitfit_peft_batch_size`` (histogram, tag ``kind``), ``bitfit_peft_batch_tokens`` (histogram, tag ``kind``)
- ``bitfit_peft_resident_adapters`` (gauge)
- ``bitfit_peft_adapter_events`` (counter, tag ``event``: load, unload, evict, load_failed) and
  ``bitfit_peft_adapter_load_seconds`` (histogram, tag ``outcome``)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ray.serve import metrics

from bitfit_peft.serving.batching import QueueFullError, QueueTimeoutError
from bitfit_peft.serving.dispatch import AdapterRunError, with_costs
from bitfit_peft.serving.errors import EngineError
from bitfit_peft.serving.metrics import batch_tokens
from bitfit_peft.serving.openai_engine import stream_completion

__all__ = ["ReplicaMetrics", "StreamingReplica", "refusal"]

_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
_TOKENS = [8, 32, 128, 512, 2048, 8192]
_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


def refusal(err: BaseException) -> tuple[str, Exception]:
    """How a replica reports a failed request: ``("raise", error)``, raised again by the ingress and answered by the
    plain server's own error mapping (``server.install_error_handlers``: 404, 413, 422, 500...). An error that is not
    the engine's own is reported by its type only: its message or traceback may hold server paths."""
    if isinstance(err, (EngineError, QueueFullError, QueueTimeoutError)):  # 4xx / 500 naming the adapter; 429; 503
        return ("raise", err)
    return ("raise", AdapterRunError(f"A replica failed on this request ({type(err).__name__}); the other requests "
                                     "were answered. Retry, or ask the operator to check the replica logs."))


class ReplicaMetrics:
    """The series of one replica (see the module docstring)."""

    def __init__(self) -> None:
        self.batch_size = metrics.Histogram("bitfit_peft_batch_size", "Inputs per engine batch.", _SIZES,
                                            tag_keys=("kind",))
        self.batch_tokens = metrics.Histogram("bitfit_peft_batch_tokens", "Tokens per engine batch.", _TOKENS,
                                              tag_keys=("kind",))
        self.resident = metrics.Gauge("bitfit_peft_resident_adapters", "Adapters in memory.")
        self.events = metrics.Counter("bitfit_peft_adapter_events", "Adapter loads, unloads, evictions, failures.",
                                      tag_keys=("event",))
        self.load_seconds = metrics.Histogram("bitfit_peft_adapter_load_seconds", "Adapter load time.", _SECONDS,
                                              tag_keys=("outcome",))

    def batch(self, kind: str, size: int, results: list[Any]) -> None:
        self.batch_size.observe(size, tags={"kind": kind})
        tokens = batch_tokens(kind, results)
        if tokens is not None:
            self.batch_tokens.observe(tokens, tags={"kind": kind})

    def adapter_event(self, event: str, _name: str, info: dict[str, Any]) -> None:
        self.events.inc(tags={"event": event})
        if event in ("load", "load_failed") and info.get("seconds") is not None:
            self.load_seconds.observe(info["seconds"], tags={"outcome": "ok" if event == "load" else "failed"})


class StreamingReplica:
    """The ``stream`` method of ``ray_serve.AdapterReplica`` (it has ``engine``, ``_admitted`` and ``_submit``)."""

    engine: Any
    if TYPE_CHECKING:  # provided by AdapterReplica
        async def _admitted(self, kind: str, settings: tuple, payloads: list[tuple]) -> list[Any]: ...
        async def _submit(self, kind: str, settings: tuple, items: list[Any]) -> list[Any]: ...

    async def stream(self, settings: tuple, payloads: list[tuple]) -> AsyncIterator[tuple]:
        """``("delta", ...)`` events of an ``oai_stream`` request (``openai_engine.stream_completion``), its inputs
        batched with the other requests' by ``_submit``; an error is one :func:`refusal`."""
        try:
            costed = await self._admitted("oai_stream", settings, payloads)
        except EngineError as err:  # UnknownTaskError: 404; BudgetError: 413; the others: 422
            yield refusal(err)
            return

        async def submit(items: list[tuple]) -> list[Any]:
            return await self._submit("oai_stream", settings, with_costs(costed, items))

        try:
            async for event in stream_completion(submit, self.engine.tokenizer, payloads):
                yield event
        except Exception as err:  # noqa: BLE001 - reported to the ingress, which raises it again
            yield refusal(err)
