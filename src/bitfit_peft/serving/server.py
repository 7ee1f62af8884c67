"""HTTP server for a :class:`~bitfit_peft.serving.engine.MultiTaskEngine` (FastAPI).

Endpoints (OpenAPI docs at ``/docs``):

- ``POST /v1/predict``  classify / regress / embed; inputs of different tasks share one forward (dynamic batching)
- ``POST /v1/generate`` text generation (causal / seq2seq LM engines)
- ``GET /v1/adapters``, ``POST /v1/adapters`` (hot load), ``DELETE /v1/adapters/{name}``
- ``GET /v1/stats``, ``GET /healthz``

Trust model: the server binds 127.0.0.1 by default and has no authentication. Hot loading reads only directories
inside the configured ``adapter_roots`` (symlinks resolved; anything else is 403), and Hub ids only when
``allow_hub=True``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from peft.utils.constants import CONFIG_NAME
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import BASE_ADAPTER_NAME, BitFitError, __version__
from .batching import DynamicBatcher, QueueFullError
from .engine import EngineError, MultiTaskEngine, UnknownTaskError, validate_adapter_name

__all__ = ["create_app", "resolve_in_roots"]

MAX_TEXT_CHARS = 20_000
MAX_TASK_CHARS = 64


# ---------------------------------------------------------------------------------------------------- schemas
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PredictInput(_Strict):
    task: str = Field(min_length=1, max_length=MAX_TASK_CHARS, description="Adapter name, or '__base__'.")
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    text_pair: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)


class PredictRequest(_Strict):
    """Either ``inputs`` (a list) or a single ``task`` + ``text`` (+ ``text_pair``)."""

    inputs: list[PredictInput] | None = Field(default=None, min_length=1)
    task: str | None = Field(default=None, min_length=1, max_length=MAX_TASK_CHARS)
    text: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)
    text_pair: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"inputs": [{"task": "sst2", "text": "a gripping, funny film"},
                                                    {"task": "spam", "text": "WIN a FREE cruise, reply YES"}]}]},
    )

    @model_validator(mode="after")
    def _one_form(self) -> PredictRequest:
        single = self.task is not None or self.text is not None or self.text_pair is not None
        if self.inputs is None and not single:
            raise ValueError("give 'inputs' (a non-empty list) or 'task' and 'text'")
        if self.inputs is not None and single:
            raise ValueError("give either 'inputs' or 'task'/'text', not both")
        if single and (self.task is None or self.text is None):
            raise ValueError("a single input needs both 'task' and 'text'")
        return self

    def items(self) -> list[PredictInput]:
        if self.inputs is not None:
            return self.inputs
        assert self.task is not None and self.text is not None
        return [PredictInput(task=self.task, text=self.text, text_pair=self.text_pair)]


class GenerateInput(_Strict):
    task: str = Field(min_length=1, max_length=MAX_TASK_CHARS)
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)


class GenerateRequest(_Strict):
    inputs: list[GenerateInput] | None = Field(default=None, min_length=1)
    task: str | None = Field(default=None, min_length=1, max_length=MAX_TASK_CHARS)
    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)
    max_new_tokens: int = Field(default=32, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(default=None, gt=0, le=10)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    num_beams: int = Field(default=1, ge=1, le=8)
    num_return_sequences: int = Field(default=1, ge=1, le=8)

    @model_validator(mode="after")
    def _check(self) -> GenerateRequest:
        single = self.task is not None or self.prompt is not None
        if self.inputs is None and not single:
            raise ValueError("give 'inputs' (a non-empty list) or 'task' and 'prompt'")
        if self.inputs is not None and single:
            raise ValueError("give either 'inputs' or 'task'/'prompt', not both")
        if single and (self.task is None or self.prompt is None):
            raise ValueError("a single input needs both 'task' and 'prompt'")
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ValueError("without do_sample, num_return_sequences must be <= num_beams")
        return self

    def items(self) -> list[GenerateInput]:
        if self.inputs is not None:
            return self.inputs
        assert self.task is not None and self.prompt is not None
        return [GenerateInput(task=self.task, prompt=self.prompt)]

    def settings(self) -> tuple[tuple[str, Any], ...]:
        return tuple(
            (k, getattr(self, k))
            for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_beams",
                      "num_return_sequences")
        )


class LoadAdapterRequest(_Strict):
    name: str = Field(min_length=1, max_length=MAX_TASK_CHARS)
    path: str | None = Field(default=None, min_length=1, max_length=4096,
                             description="Adapter directory inside one of the server's adapter roots.")
    hub_id: str | None = Field(default=None, min_length=3, max_length=200,
                               description="Hugging Face Hub repo id (only if the server allows the Hub).")
    revision: str | None = Field(default=None, min_length=1, max_length=200)
    label_names: list[str] | None = Field(default=None, min_length=1, max_length=10_000)

    @model_validator(mode="after")
    def _one_source(self) -> LoadAdapterRequest:
        if (self.path is None) == (self.hub_id is None):
            raise ValueError("give exactly one of 'path' or 'hub_id'")
        return self


# ---------------------------------------------------------------------------------------------------- helpers
def resolve_in_roots(path: str, roots: Sequence[Path]) -> Path | None:
    """``path`` resolved (symlinks followed) if it lies inside one of ``roots``, else None.

    A relative ``path`` is taken relative to each root in turn.
    """
    raw = Path(path).expanduser()
    for root in roots:
        root = Path(root).expanduser().resolve()
        candidate = (raw if raw.is_absolute() else root / raw).resolve()
        if candidate == root or candidate.is_relative_to(root):
            return candidate
    return None


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message, **extra})


def create_app(
    engine: MultiTaskEngine,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_queue: int = 1024,
    adapter_roots: Sequence[str | Path] = (),
    *,
    allow_hub: bool = False,
    admin: bool = True,
    max_inputs_per_request: int = 256,
    max_new_tokens_limit: int = 512,
) -> FastAPI:
    """Build the FastAPI app serving ``engine``.

    Args:
        engine: the loaded :class:`MultiTaskEngine`.
        max_batch_size / max_wait_ms: dynamic batching (inputs of any task arriving within ``max_wait_ms`` of the
            oldest waiting one share a forward, up to ``max_batch_size``).
        max_queue: most inputs waiting; beyond it requests get HTTP 429 with a JSON message (never dropped).
        adapter_roots: directories hot loading (``POST /v1/adapters``) may read from; empty disables loading
            from paths.
        allow_hub: let ``POST /v1/adapters`` download ``hub_id`` adapters from the Hugging Face Hub.
        admin: serve ``POST``/``DELETE /v1/adapters`` at all.
        max_inputs_per_request / max_new_tokens_limit: request size limits (HTTP 413 beyond them).
    """
    roots = [Path(r).expanduser().resolve() for r in adapter_roots]

    def run_batch(key: Hashable, payloads: list[Any]) -> list[Any]:
        kind, settings = key  # type: ignore[misc]
        with engine.lock:  # check-then-run atomically: an adapter removed meanwhile fails only its inputs
            live = [i for i, p in enumerate(payloads) if engine.has_task(p[0])]
            results: list[Any] = [
                UnknownTaskError(f"Adapter {p[0]!r} was removed before this request ran.") for p in payloads
            ]
            if not live:
                return results
            subset = [payloads[i] for i in live]
            if kind == "predict":
                outputs: list[Any] = engine.predict(subset)
            else:
                outputs = engine.generate([(t, x) for t, x in subset], **dict(settings))
            for i, out in zip(live, outputs, strict=True):
                results[i] = out
            return results

    batcher = DynamicBatcher(run_batch, max_batch_size, max_wait_ms, max_queue, task_of=lambda p: p[0])

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="bitfit-peft multi-task server",
        version=__version__,
        description="Many BitFit adapters over one base model; inputs of different tasks share a forward.",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.batcher = batcher
    app.state.adapter_roots = roots

    @app.exception_handler(QueueFullError)
    async def _queue_full(_: Request, err: QueueFullError) -> JSONResponse:
        return JSONResponse(status_code=429, content={"detail": str(err), "error": "queue_full"},
                            headers={"Retry-After": "1"})

    @app.exception_handler(UnknownTaskError)
    async def _unknown_task(_: Request, err: UnknownTaskError) -> JSONResponse:
        return _error(404, str(err), error="unknown_task")

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, err: EngineError) -> JSONResponse:
        return _error(422, str(err), error="invalid_request")

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> JSONResponse:
        return _error(500, f"Internal error while serving the request: {type(err).__name__}: {err}",
                      error="internal")

    def check_tasks(tasks: list[str]) -> None:
        unknown = sorted({t for t in tasks if not engine.has_task(t)})
        if unknown:
            raise UnknownTaskError(
                f"Unknown task(s) {unknown}; loaded adapters: {sorted(engine.tasks())} "
                f"(or {BASE_ADAPTER_NAME!r} for the bare base model)."
            )

    def check_size(n: int) -> None:
        if n > max_inputs_per_request:
            raise HTTPException(413, f"Too many inputs: {n} > {max_inputs_per_request} per request; split it.")

    @app.post("/v1/predict", summary="Classify / regress / embed inputs of any loaded tasks")
    async def predict(body: PredictRequest) -> dict[str, Any]:
        if engine.task_type not in ("SEQ_CLS", "FEATURE_EXTRACTION"):
            raise HTTPException(400, f"This server's model is {engine.task_type}: use POST /v1/generate.")
        items = body.items()
        check_size(len(items))
        check_tasks([it.task for it in items])
        payloads = [(it.task, it.text, it.text_pair) for it in items]
        results = await batcher.submit(("predict", ()), payloads)
        return {"results": [r.to_dict() for r in results]}

    @app.post("/v1/generate", summary="Generate text for prompts of any loaded tasks")
    async def generate(body: GenerateRequest) -> dict[str, Any]:
        if engine.task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
            raise HTTPException(400, f"This server's model is {engine.task_type}: use POST /v1/predict.")
        items = body.items()
        check_size(len(items))
        if body.max_new_tokens > max_new_tokens_limit:
            raise HTTPException(413, f"max_new_tokens={body.max_new_tokens} exceeds this server's limit "
                                     f"{max_new_tokens_limit}.")
        check_tasks([it.task for it in items])
        results = await batcher.submit(("generate", body.settings()), [(it.task, it.prompt) for it in items])
        return {"results": [r.to_dict() for r in results]}

    @app.get("/v1/adapters", summary="Loaded adapters, their labels and memory")
    async def list_adapters() -> dict[str, Any]:
        infos = await asyncio.to_thread(engine.adapters)
        return {
            "base": engine.base_name,
            "task_type": engine.task_type,
            "adapters": [i.to_dict() for i in infos],
        }

    @app.post("/v1/adapters", status_code=201, summary="Hot-load an adapter (from an adapter root or the Hub)")
    async def load_adapter(body: LoadAdapterRequest) -> dict[str, Any]:
        if not admin:
            raise HTTPException(403, "Adapter management is disabled on this server.")
        try:
            validate_adapter_name(body.name)
        except EngineError as err:
            raise HTTPException(422, str(err)) from err
        if engine.has_task(body.name):
            raise HTTPException(409, f"An adapter named {body.name!r} is already loaded; DELETE it first.")
        if body.hub_id is not None:
            if not allow_hub:
                raise HTTPException(403, "Loading adapters from the Hugging Face Hub is disabled on this server.")
            source: str | Path = body.hub_id
        else:
            assert body.path is not None
            if not roots:
                raise HTTPException(403, "Hot loading from paths is disabled: the server has no adapter roots.")
            resolved = resolve_in_roots(body.path, roots)
            if resolved is None:
                raise HTTPException(403, "Path is outside the server's adapter roots.")
            if not (resolved / CONFIG_NAME).is_file():
                raise HTTPException(404, f"No adapter (adapter_config.json) at {body.path!r} in the adapter roots.")
            source = resolved
        try:
            info = await asyncio.to_thread(
                engine.add_adapter, body.name, source, revision=body.revision, label_names=body.label_names,
                allow_hub=allow_hub,
            )
        except (EngineError, BitFitError) as err:
            if "already loaded" in str(err):
                raise HTTPException(409, str(err)) from err
            raise HTTPException(422, f"Could not load adapter {body.name!r}: {err}") from err
        except Exception as err:  # noqa: BLE001 - a broken adapter must not take the server down
            raise HTTPException(422, f"Could not load adapter {body.name!r}: {type(err).__name__}: {err}") from err
        return info.to_dict()

    @app.delete("/v1/adapters/{name}", summary="Unload an adapter")
    async def delete_adapter(name: str) -> dict[str, Any]:
        if not admin:
            raise HTTPException(403, "Adapter management is disabled on this server.")
        if name not in engine.tasks():
            raise HTTPException(404, f"No adapter named {name!r} is loaded.")
        try:
            await asyncio.to_thread(engine.remove_adapter, name)
        except UnknownTaskError as err:
            raise HTTPException(404, str(err)) from err
        return {"removed": name, "adapters": engine.tasks()}

    @app.get("/v1/stats", summary="Batching statistics")
    async def stats() -> dict[str, Any]:
        return {**batcher.stats.to_dict(), "queue_depth": batcher.depth, "in_flight": batcher.in_flight,
                "max_queue": batcher.max_queue,
                "max_batch_size": batcher.max_batch_size, "max_wait_ms": batcher.max_wait * 1000}

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "task_type": engine.task_type, "adapters": engine.tasks(),
                "queue_depth": batcher.depth, "in_flight": batcher.in_flight}

    return app
