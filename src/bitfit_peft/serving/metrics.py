"""Prometheus metrics of a server app (``GET /metrics``), with ``prometheus_client`` and one registry per app.

Series (``bitfit_peft:`` is the default ``prefix``; ``compat_prefix``, default ``vllm:``, names the series that
gateways written for vLLM read):

- ``{prefix}requests_total{endpoint, adapter, status}`` and ``{prefix}request_duration_seconds{endpoint, adapter}``
- ``{prefix}prompt_tokens_total{adapter}``, ``{prefix}generation_tokens_total{adapter}``
- ``{prefix}time_to_first_token_seconds{adapter}``, ``{prefix}inter_token_latency_seconds{adapter}`` (streams)
- ``{prefix}batch_size{kind}``, ``{prefix}batch_tokens{kind}`` (tokens a batch generated or read), histograms
- ``{prefix}queue_depth``, ``{prefix}resident_adapters`` (gauges, read at scrape time)
- ``{prefix}adapter_events_total{event}`` (load, unload, evict, load_failed) and
  ``{prefix}adapter_load_seconds{outcome}``
- ``{compat_prefix}lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}``: vLLM's gauge
  (value: the time it was read), which the Kubernetes Gateway API Inference Extension uses for adapter affinity;
  ``{compat_prefix}num_requests_running`` and ``{compat_prefix}num_requests_waiting``.

The ``adapter`` label takes the first ``max_adapter_labels`` (default 100) adapter names seen; later ones are
counted under ``adapter="other"``, so a server with thousands of adapters keeps a bounded number of series.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["OVERFLOW_LABEL", "EngineState", "ServerMetrics"]

OVERFLOW_LABEL = "other"
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_GAPS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class EngineState:
    """What the scrape-time gauges read (callables, so they see the engine as it is now)."""

    queue_depth: Callable[[], int] = lambda: 0
    resident: Callable[[], int] = lambda: 0
    running: Callable[[], Iterable[str]] = lambda: ()
    waiting: Callable[[], Iterable[str]] = lambda: ()
    max_lora: Callable[[], int] = lambda: 0


class _StateCollector(Collector):
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m, state = self.metrics, self.metrics.state
        running, waiting = sorted(set(state.running())), sorted(set(state.waiting()) - set(state.running()))
        yield _gauge(f"{m.prefix}queue_depth", "Inputs waiting to be batched.", state.queue_depth())
        yield _gauge(f"{m.prefix}resident_adapters", "Adapters in memory.", state.resident())
        yield _gauge(f"{m.compat_prefix}num_requests_running", "Inputs in the batch being computed.",
                     m.in_flight_inputs)
        yield _gauge(f"{m.compat_prefix}num_requests_waiting", "Inputs waiting to be batched.", state.queue_depth())
        info = GaugeMetricFamily(f"{m.compat_prefix}lora_requests_info", "Running stats on lora requests.",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        info.add_metric([str(state.max_lora()), ",".join(running), ",".join(waiting)], time.time())
        yield info

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


class ServerMetrics:
    """The metrics of one app (see the module docstring); everything lives in :attr:`registry`."""

    def __init__(self, prefix: str = "bitfit_peft:", compat_prefix: str = "vllm:", max_adapter_labels: int = 100,
                 state: EngineState | None = None) -> None:
        if max_adapter_labels < 0:
            raise ValueError("max_adapter_labels must be >= 0.")
        self.prefix, self.compat_prefix, self.max_adapter_labels = prefix, compat_prefix, max_adapter_labels
        self.state = state or EngineState()
        self.registry = CollectorRegistry(auto_describe=False)
        self.in_flight_inputs = 0
        self._labels: set[str] = set()
        self._lock = threading.Lock()
        p, r = prefix, self.registry
        self.requests = Counter(f"{p}requests", "HTTP requests by endpoint, adapter and status.",
                                ["endpoint", "adapter", "status"], registry=r)
        self.latency = Histogram(f"{p}request_duration_seconds", "Request latency (a stream: until its end).",
                                 ["endpoint", "adapter"], buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Input tokens read.", ["adapter"], registry=r)
        self.generation_tokens = Counter(f"{p}generation_tokens", "Tokens generated.", ["adapter"], registry=r)
        self.ttft = Histogram(f"{p}time_to_first_token_seconds", "Streams: request start to first text.",
                              ["adapter"], buckets=_LATENCY, registry=r)
        self.itl = Histogram(f"{p}inter_token_latency_seconds", "Streams: time between text chunks.", ["adapter"],
                             buckets=_TOKEN_GAPS, registry=r)
        self.batch_size = Histogram(f"{p}batch_size", "Inputs per engine batch.", ["kind"], buckets=_SIZES,
                                    registry=r)
        self.batch_tokens = Histogram(f"{p}batch_tokens", "Tokens per engine batch (generated, or read when "
                                      "pooling).", ["kind"], buckets=_TOKENS, registry=r)
        self.adapter_events = Counter(f"{p}adapter_events", "Adapter loads, unloads, evictions, failed loads.",
                                      ["event"], registry=r)
        self.load_seconds = Histogram(f"{p}adapter_load_seconds", "Adapter load time by outcome.", ["outcome"],
                                      buckets=_LATENCY, registry=r)
        r.register(_StateCollector(self))

    def adapter_label(self, name: str | None) -> str:
        """``name`` as a label value: its own for the first ``max_adapter_labels`` names, then ``"other"``."""
        if not name:
            return ""
        if name in self._labels:
            return name
        with self._lock:
            if len(self._labels) < self.max_adapter_labels:
                self._labels.add(name)
                return name
        return OVERFLOW_LABEL

    def observe_request(self, endpoint: str, adapter: str | None, status: int, seconds: float,
                        tokens: tuple[int, int] = (0, 0)) -> None:
        label = self.adapter_label(adapter)
        self.requests.labels(endpoint, label, str(status)).inc()
        self.latency.labels(endpoint, label).observe(seconds)
        if tokens[0]:
            self.prompt_tokens.labels(label).inc(tokens[0])
        if tokens[1]:
            self.generation_tokens.labels(label).inc(tokens[1])

    def observe_batch(self, kind: str, size: int, tokens: int | None) -> None:
        self.batch_size.labels(kind).observe(size)
        if tokens is not None:
            self.batch_tokens.labels(kind).observe(tokens)

    def observe_adapter_event(self, event: str, seconds: float | None = None) -> None:
        self.adapter_events.labels(event).inc()
        if seconds is not None and event in ("load", "load_failed"):
            self.load_seconds.labels("ok" if event == "load" else "failed").observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def batch_tokens(kind: str, results: Iterable[Any]) -> int | None:
    """Tokens a batch generated (generation kinds) or read (pooling), when its results say."""
    total, known = 0, False
    for r in results:
        if isinstance(r, BaseException):
            continue
        if hasattr(r, "completion_tokens"):
            total, known = total + sum(r.completion_tokens), True
        elif hasattr(r, "token_ids"):
            total, known = total + sum(len(t) for t in r.token_ids), True
        elif hasattr(r, "prompt_tokens"):
            total, known = total + r.prompt_tokens, True
    return total if known else None
