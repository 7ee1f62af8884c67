"""OpenAI- and vLLM-compatible routes, ``/metrics`` and request logging, added to both servers by ``make_app``.

- ``GET /v1/models``: the base model and every loaded adapter (``parent``: the base), as vLLM lists LoRA adapters.
- ``POST /v1/completions``, ``POST /v1/chat/completions``: ``model`` is an adapter name or the base's name;
  ``stream: true`` answers server-sent events. They run through the backend's batcher (kinds of
  ``openai_engine.py``), so requests for different adapters that arrive together share one ``generate`` call.
- ``POST /v1/embeddings`` (``FEATURE_EXTRACTION`` servers), ``POST /classify`` and ``/v1/classify`` (``SEQ_CLS``,
  vLLM's pooling shape).
- ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``: vLLM's runtime adapter endpoints, aliases of
  ``POST`` / ``DELETE /v1/adapters`` under the same admin token and policy.
- ``GET /metrics``: Prometheus text (``metrics.py``), one registry per app.

Errors on these routes use OpenAI's error object (``openai_format.py``); the other routes keep theirs.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from bitfit_peft.serving import openai_format as fmt
from bitfit_peft.serving.limits import Limits
from bitfit_peft.serving.metrics import EngineState, ServerMetrics, batch_tokens
from bitfit_peft.serving.openai_schemas import (
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
    LoadLoraRequest,
    UnloadLoraRequest,
)
from bitfit_peft.serving.request_log import RequestObserver
from bitfit_peft.tuner.routing import BASE_ADAPTER_NAME

__all__ = ["ApiOptions", "install_api"]

_GENERATE_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


@dataclass(frozen=True)
class ApiOptions:
    """Settings of the compatible API and the metrics.

    Args:
        served_model_name: the base's ``id`` in ``/v1/models`` and its ``model`` name (default: the base's path or
            Hub id); the bare base also answers to ``"__base__"``.
        metrics_prefix: prefix of this server's own series (``bitfit_peft:``).
        compat_metrics_prefix: prefix of the vLLM-compatible series (``vllm:lora_requests_info``...).
        max_adapter_labels: most distinct ``adapter`` label values; later adapters are counted as ``other``.
    """

    served_model_name: str | None = None
    metrics_prefix: str = "bitfit_peft:"
    compat_metrics_prefix: str = "vllm:"
    max_adapter_labels: int = 100


class OpenAIRoute(APIRoute):
    """A route whose every error (validation included) is answered with OpenAI's error object."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as err:  # noqa: BLE001 - every error gets OpenAI's shape
                return fmt.error_response(err, getattr(request.state, "model", None))

        return route


def install_api(app: FastAPI, backend: Any, admin: Any, options: ApiOptions, limits: Limits,
                spec: Callable[[str, str], Any]) -> ServerMetrics:
    """Add the routes, ``/metrics`` and the request observer to ``app`` (``admin``: the admin dependency of
    ``/v1/adapters``; ``limits``: the request-shape limits it checks; ``spec(name, path)``: the hot-load
    spec of a path)."""
    metrics = ServerMetrics(options.metrics_prefix, options.compat_metrics_prefix, options.max_adapter_labels)
    if hasattr(backend, "batcher") and hasattr(backend, "engine"):
        watch_local(backend.engine, backend.batcher, metrics)
    app.state.metrics = metrics
    router = APIRouter(route_class=OpenAIRoute)
    api = _Api(backend, options, metrics, limits)
    if not hasattr(backend, "batcher"):  # Ray's ingress: what it sees of the adapters' traffic
        metrics.state = EngineState(running=lambda: list(api.active), max_lora=lambda: getattr(backend, "max_lora", 0))
    router.add_api_route("/v1/models", api.models, methods=["GET"], summary="The base and every adapter")
    router.add_api_route("/v1/completions", api.completions, methods=["POST"], summary="OpenAI completions")
    router.add_api_route("/v1/chat/completions", api.chat, methods=["POST"], summary="OpenAI chat completions")
    router.add_api_route("/v1/embeddings", api.embeddings, methods=["POST"], summary="OpenAI embeddings")
    for path in ("/classify", "/v1/classify"):
        router.add_api_route(path, api.classify, methods=["POST"], summary="vLLM classification")

    async def load_lora(body: LoadLoraRequest) -> PlainTextResponse:
        await backend.load(spec(body.lora_name, body.lora_path))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload_lora(body: UnloadLoraRequest) -> PlainTextResponse:
        await backend.unload(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    router.add_api_route("/v1/load_lora_adapter", load_lora, methods=["POST"], dependencies=[admin],
                         summary="vLLM alias of POST /v1/adapters")
    router.add_api_route("/v1/unload_lora_adapter", unload_lora, methods=["POST"], dependencies=[admin],
                         summary="vLLM alias of DELETE /v1/adapters/{name}")
    app.include_router(router)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_route() -> Response:
        content, content_type = metrics.exposition()
        return Response(content, media_type=content_type)

    app.add_middleware(RequestObserver, metrics=metrics)
    return metrics


def watch_local(engine: Any, batcher: Any, metrics: ServerMetrics) -> None:
    """Batch, queue, residency and adapter-event metrics of an engine served in this process."""
    runner, running = batcher.runner, []

    def observed(key: Any, payloads: list[Any]) -> Any:
        outer, outer_inputs = list(running), metrics.in_flight_inputs  # a batch run inside another's (interleaving)
        running[:] = outer + [p.task for p in payloads]  # encoded items (dispatch.encode_payloads)
        metrics.in_flight_inputs = outer_inputs + len(payloads)
        try:
            results = runner(key, payloads)
        finally:
            running[:] = outer
            metrics.in_flight_inputs = outer_inputs
        metrics.observe_batch(key[0], len(payloads), batch_tokens(key[0], results))
        return results

    batcher.runner = observed
    engine.registry.events.subscribe(lambda event, _, info: metrics.observe_adapter_event(event, info.get("seconds")))
    metrics.state = EngineState(queue_depth=lambda: batcher.depth, resident=lambda: len(engine.tasks()),
                                running=lambda: list(running), waiting=batcher.waiting_tasks,
                                max_lora=lambda: engine.max_resident or batcher.max_batch_size)


class _Api:
    """The route handlers over one backend."""

    def __init__(self, backend: Any, options: ApiOptions, metrics: ServerMetrics, limits: Limits) -> None:
        self.backend, self.metrics = backend, metrics
        self.max_inputs, self.max_new_tokens = limits.max_inputs_per_request, limits.max_new_tokens_limit
        self.base_id = options.served_model_name or backend.base_name
        self.created = int(time.time())
        self.active: Counter[str] = Counter()  #: requests in flight per task (``lora_requests_info`` on Ray)

    @contextmanager
    def _in_flight(self, task: str) -> Iterator[None]:
        self.active[task] += 1
        try:
            yield
        finally:
            self.active[task] -= 1
            if self.active[task] <= 0:
                del self.active[task]

    def _task(self, request: Request, model: str | None) -> str:
        request.state.model = model
        if model is None or model in (self.base_id, self.backend.base_name, BASE_ADAPTER_NAME):
            return BASE_ADAPTER_NAME
        return model

    def _inputs(self, texts: list[str]) -> list[str]:
        if len(texts) > self.max_inputs:
            raise ValueError(f"Too many inputs: {len(texts)} > {self.max_inputs} per request; split it.")
        return texts

    def _need(self, types: tuple[str, ...], what: str) -> None:
        if self.backend.task_type not in types:
            raise ValueError(f"This server's model is {self.backend.task_type}; {what}.")

    def _card(self, name: str, parent: str | None) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "bitfit-peft", "root": name,
                "parent": parent}

    async def models(self) -> dict[str, Any]:
        adapters = await self.backend.adapters()
        cards = [self._card(self.base_id, None)] + [self._card(a["name"], self.base_id) for a in adapters]
        return {"object": "list", "data": cards}

    # ------------------------------------------------------------------ generation
    def _settings(self, body: ChatRequest | CompletionRequest, default_max: int) -> tuple[tuple, int]:
        """The batch key's generation settings, and how many choices the engine computes per prompt."""
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or default_max
        if max_tokens > self.max_new_tokens:
            raise ValueError(f"max_tokens={max_tokens} exceeds this server's limit {self.max_new_tokens}; ask for "
                             "fewer tokens.")
        temperature = 1.0 if body.temperature is None else body.temperature
        sample = temperature > 0
        settings = (("max_new_tokens", max_tokens), ("do_sample", sample),
                    ("temperature", temperature if sample else None), ("top_p", body.top_p if sample else None),
                    ("top_k", body.top_k if sample and body.top_k and body.top_k > 0 else None),
                    ("seed", body.seed if sample else None), ("num_return_sequences", body.n if sample else 1))
        return settings, (body.n if sample else 1)

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        self._need(_GENERATE_TYPES, "use POST /v1/embeddings or /classify")
        task = self._task(request, body.model)
        payloads = [(task, p, body.stops()) for p in self._inputs(body.prompts())]
        return await self._generate(request, body, payloads, chat=False, default_max=16)

    async def chat(self, body: ChatRequest, request: Request) -> Any:
        self._need(_GENERATE_TYPES, "use POST /v1/embeddings or /classify")
        task = self._task(request, body.model)
        return await self._generate(request, body, [(task, body.chat(), body.stops())], chat=True,
                                    default_max=self.max_new_tokens)

    async def _generate(self, request: Request, body: ChatRequest | CompletionRequest, payloads: list[tuple],
                        chat: bool, default_max: int) -> Any:
        settings, computed = self._settings(body, default_max)
        if body.stream:
            return await self._stream(request, body, settings, payloads, chat)
        with self._in_flight(payloads[0][0]):
            results = await self.backend.run("oai_complete", settings, payloads)
        answer = fmt.completion_body(chat, body.model, results, body.n)
        self._record(request, body.model, answer["usage"])
        return answer

    def _record(self, request: Request, model: str, usage: dict[str, int], stream: bool = False) -> None:
        state = request.state
        state.adapter, state.stream = model, stream or None
        state.prompt_tokens, state.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]

    async def _stream(self, request: Request, body: ChatRequest | CompletionRequest, settings: tuple,
                      payloads: list[tuple], chat: bool) -> StreamingResponse:
        started = time.perf_counter()
        events = self.backend.stream(settings, payloads)
        with self._in_flight(payloads[0][0]):
            first = await anext(events)  # errors before the first token are HTTP errors, not a broken stream
        return StreamingResponse(self._events(request, body, chat, first, events, started),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _events(self, request: Request, body: ChatRequest | CompletionRequest, chat: bool, first: tuple,
                      events: AsyncIterator[tuple], started: float) -> AsyncIterator[bytes]:
        stream_id, created, n = fmt.new_id("chatcmpl" if chat else "cmpl"), int(time.time()), body.n
        label = self.metrics.adapter_label(body.model)
        opened: set[int] = set()
        last: float | None = None

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            return fmt.sse(fmt.chunk(chat, stream_id, created, body.model, choices, usage))

        async def all_events() -> AsyncIterator[tuple]:
            yield first
            async for event in events:
                yield event

        try:
            async for event in all_events():
                if event[0] == "done":
                    results = event[1]
                    break
                _, prompt, choice, text = event
                now = time.perf_counter()
                if last is None:
                    self.metrics.ttft.labels(label).observe(now - started)
                else:
                    self.metrics.itl.labels(label).observe(now - last)
                last = now
                targets = range(n) if n > 1 and choice == 0 and not _sampled(body) else [choice]
                for c in targets:
                    index = prompt * n + c
                    yield chunk([fmt.chunk_choice(chat, index, text, None, first=chat and index not in opened)])
                    opened.add(index)
        except Exception as err:  # noqa: BLE001 - the stream has started: report in-band, as vLLM does
            yield fmt.sse(_error_body(err))
            yield fmt.sse("[DONE]")
            return
        final = fmt.completion_body(chat, body.model, results, n)
        for choice in final["choices"]:
            index, reason = choice["index"], choice["finish_reason"]
            yield chunk([fmt.chunk_choice(chat, index, None, reason, first=chat and index not in opened)])
        if body.include_usage:
            yield chunk([], final["usage"])
        self._record(request, body.model, final["usage"], stream=True)
        yield fmt.sse("[DONE]")

    # ------------------------------------------------------------------ pooling
    async def _pooled(self, body: EmbeddingRequest | ClassifyRequest, request: Request) -> tuple[str, list[Any]]:
        """The served model's name and one ``oai_pool`` result per input of ``body``."""
        model = body.model or self.base_id
        task = self._task(request, model)
        with self._in_flight(task):
            return model, await self.backend.run("oai_pool", (), [(task, t) for t in self._inputs(body.texts())])

    async def embeddings(self, body: EmbeddingRequest, request: Request) -> dict[str, Any]:
        self._need(("FEATURE_EXTRACTION",), "POST /v1/embeddings needs a FEATURE_EXTRACTION server (use /classify)")
        model, results = await self._pooled(body, request)
        answer = fmt.embedding_body(model, results, body.encoding_format)
        self._record(request, model, {"prompt_tokens": answer["usage"]["prompt_tokens"], "completion_tokens": 0})
        return answer

    async def classify(self, body: ClassifyRequest, request: Request) -> dict[str, Any]:
        self._need(("SEQ_CLS",), "/classify needs a SEQ_CLS server (use POST /v1/embeddings)")
        model, results = await self._pooled(body, request)
        answer = fmt.classify_body(model, results)
        self._record(request, model, answer["usage"])
        return answer


def _sampled(body: ChatRequest | CompletionRequest) -> bool:
    return body.temperature is None or body.temperature > 0


def _error_body(err: BaseException) -> dict[str, Any]:
    return json.loads(fmt.error_response(err).body)
