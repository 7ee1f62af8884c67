"""HTTP server for a :class:`~bitfit_peft.serving.engine.MultiTaskEngine` (FastAPI).

Endpoints (OpenAPI docs at ``/docs``):

- ``POST /v1/predict``  classify / regress / embed; inputs of different tasks share one forward (dynamic batching)
- ``POST /v1/generate`` text generation (causal / seq2seq LM engines)
- ``GET /v1/adapters``, ``POST /v1/adapters`` (hot load), ``DELETE /v1/adapters/{name}``
- ``GET /v1/stats``, ``GET /healthz``, ``GET /livez`` (liveness), ``GET /readyz`` (readiness: 503 until ready)

The routes, schemas and error mapping are shared with the Ray Serve deployment (``ray_serve.py``): both build their
app with :func:`make_app` over a :class:`Backend` (here :class:`LocalBackend`: one engine, one batcher).

Trust model (``docs/security.md#the-servers``): requests and adapter folders are untrusted. Every file a hot load
opens must resolve inside the configured ``adapter_roots`` (symlinks followed, else 403); a ``hub_id`` is only ever
fetched from the Hub, and only when ``allow_hub=True``; with ``admin_token`` set, ``POST``/``DELETE /v1/adapters``
need ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bitfit_peft.errors import BitFitError
from bitfit_peft.names import __version__
from bitfit_peft.serving.batching import QueueFullError, QueueTimeoutError
from bitfit_peft.serving.dispatch import (
    AdapterRunError,
    admit,
    engine_batcher,
    run_engine_batch,
    unknown_tasks,
    with_costs,
)
from bitfit_peft.serving.engine import MultiTaskEngine
from bitfit_peft.serving.errors import (
    AdapterNameError,
    AdapterNotFoundError,
    AdapterPathError,
    BadAdapterPathError,
    DuplicateAdapterError,
    EngineError,
    UnknownTaskError,
)
from bitfit_peft.serving.limits import BudgetError, Limits
from bitfit_peft.serving.openai_api import ApiOptions, install_api
from bitfit_peft.serving.openai_engine import stream_completion
from bitfit_peft.serving.schemas import (
    GenerateRequest,
    LoadAdapterRequest,
    PredictRequest,
    json_safe,
    redact_paths,
    validation_detail,
)

__all__ = ["LOAD_ERRORS", "AdapterSpec", "ApiError", "Backend", "LocalBackend", "create_app", "make_app",
           "run_engine_batch", "unknown_tasks"]

logger = logging.getLogger(__name__)
PREDICT_TYPES = ("SEQ_CLS", "FEATURE_EXTRACTION")
GENERATE_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM")
_BAD_BODY = "There was an error parsing the body"


class ApiError(Exception):
    """An answer other than 2xx: ``status``, a one-line ``detail``, an ``error`` code and extra headers."""

    def __init__(self, status: int, detail: str, error: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.error, self.headers = status, detail, error, headers or {}


@dataclass(frozen=True)
class AdapterSpec:
    """A hot-load request: ``source`` is a path (inside the server's roots; relative ones are taken relative to
    them) or a Hub id (``hub``). The engine's registry checks the name and the path when it loads the spec.

    ``confined=False`` and ``allow_base_mismatch`` only for the operator's own start-up adapters (``--adapter``).
    """

    name: str
    source: str
    hub: bool
    revision: str | None = None
    label_names: tuple[str, ...] | None = None
    confined: bool = True
    allow_base_mismatch: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Backend(Protocol):
    """What :func:`make_app` serves: a single engine (:class:`LocalBackend`) or Ray replicas."""

    task_type: str
    base_name: str

    async def run(self, kind: str, settings: tuple[tuple[str, Any], ...], payloads: list[Any]) -> list[dict]: ...
    async def adapters(self) -> list[dict[str, Any]]: ...
    async def load(self, spec: AdapterSpec) -> dict[str, Any]: ...
    async def unload(self, name: str) -> list[str]: ...
    async def stats(self) -> dict[str, Any]: ...
    async def health(self) -> dict[str, Any]: ...
    def stream(self, settings: tuple[tuple[str, Any], ...], payloads: list[Any]) -> AsyncIterator[tuple]: ...


# ---------------------------------------------------------------------------------------------------- hot loads
#: how a refused hot load is answered: the first matching class wins (subclasses before their base classes)
LOAD_ERRORS: tuple[tuple[type[Exception], int, str | None], ...] = (
    (DuplicateAdapterError, 409, "duplicate_adapter"),
    (AdapterNameError, 422, "invalid_request"),
    (AdapterNotFoundError, 404, None),
    (BadAdapterPathError, 400, None),
    (AdapterPathError, 403, "adapter_path"),
)


def adapter_spec(body: LoadAdapterRequest) -> AdapterSpec:
    """The hot-load request as an :class:`AdapterSpec`; the engine's registry checks its name and path."""
    labels = tuple(body.label_names) if body.label_names is not None else None
    if body.hub_id is not None:
        return AdapterSpec(body.name, body.hub_id, True, body.revision, labels)
    assert body.path is not None
    return AdapterSpec(body.name, body.path, False, body.revision, labels)


def add_to_engine(engine: MultiTaskEngine, spec: AdapterSpec, roots: Sequence[Path], allow_hub: bool) -> Any:
    """``engine.add_adapter`` for ``spec``, confined to ``roots``; its errors as :class:`ApiError` (``LOAD_ERRORS``,
    else 422)."""
    try:
        return engine.add_adapter(
            spec.name, spec.source, revision=spec.revision,
            label_names=list(spec.label_names) if spec.label_names is not None else None,
            allow_hub=allow_hub and spec.hub, allow_base_mismatch=spec.allow_base_mismatch, hub=spec.hub,
            within=list(roots) if spec.confined and not spec.hub else None,
        )
    except Exception as err:  # noqa: BLE001 - a broken adapter must not take the server down
        for exc_type, status, code in LOAD_ERRORS:
            if isinstance(err, exc_type):
                raise ApiError(status, str(err), code) from err
        why = str(err) if isinstance(err, (EngineError, BitFitError)) else f"{type(err).__name__}: {err}"
        raise ApiError(422, f"Could not load adapter {spec.name!r}: {why}", "invalid_adapter") from err


# ---------------------------------------------------------------------------------------------------- local backend
class LocalBackend:
    """One engine in this process, fed by a :class:`DynamicBatcher`."""

    def __init__(self, engine: MultiTaskEngine, max_batch_size: int, max_wait_ms: float, max_queue: int,
                 roots: Sequence[Path], allow_hub: bool) -> None:
        self.engine, self.roots, self.allow_hub = engine, list(roots), allow_hub
        self.task_type, self.base_name = str(engine.task_type), engine.base_name
        self.batcher = engine_batcher(engine, max_batch_size, max_wait_ms, max_queue)

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        await self.batcher.start()
        try:
            yield
        finally:
            await self.batcher.stop()

    async def _admitted(self, kind: str, settings: tuple, payloads: list[Any]) -> list[Any]:
        """``payloads`` known, tokenized and costed before any engine work, off the engine's thread and lock."""
        missing = await asyncio.to_thread(unknown_tasks, self.engine, [p[0] for p in payloads])  # may stat roots
        if missing is not None:
            raise missing
        return await asyncio.to_thread(admit, self.engine, kind, settings, payloads)

    async def run(self, kind: str, settings: tuple[tuple[str, Any], ...], payloads: list[Any]) -> list[dict]:
        items = await self._admitted(kind, settings, payloads)
        key: Hashable = (kind, settings)
        return [r.to_dict() for r in await self.batcher.submit(key, items)]

    async def stream(self, settings: tuple[tuple[str, Any], ...], payloads: list[Any]) -> AsyncIterator[tuple]:
        costed = await self._admitted("oai_stream", settings, payloads)
        submit = lambda items: self.batcher.submit(("oai_stream", settings), with_costs(costed, items))  # noqa: E731
        async for event in stream_completion(submit, self.engine.tokenizer, payloads):
            yield event

    async def adapters(self) -> list[dict[str, Any]]:
        return [i.to_dict() for i in await asyncio.to_thread(self.engine.adapters)]

    async def load(self, spec: AdapterSpec) -> dict[str, Any]:
        info = await asyncio.to_thread(add_to_engine, self.engine, spec, self.roots, self.allow_hub)
        return info.to_dict()

    async def unload(self, name: str) -> list[str]:
        await asyncio.to_thread(self.engine.remove_adapter, name)  # not loaded: UnknownTaskError, a 404
        return self.engine.tasks()

    async def stats(self) -> dict[str, Any]:
        b = self.batcher
        return {**b.stats.to_dict(), "queue_depth": b.depth, "in_flight": b.in_flight, "max_queue": b.max_queue,
                "max_batch_size": b.max_batch_size, "max_wait_ms": b.max_wait * 1000}

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "task_type": self.task_type, "adapters": self.engine.tasks(),
                "queue_depth": self.batcher.depth, "in_flight": self.batcher.in_flight}


# ---------------------------------------------------------------------------------------------------- the app
class _CatchAll:
    """Answer an unexpected exception with a JSON 500 and keep the connection (Starlette's own handler for
    ``Exception`` re-raises into the server, which then resets the connection)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as err:  # noqa: BLE001 - the server must answer, whatever broke
            logger.exception("internal error serving %s", scope.get("path"))
            if started:
                raise
            detail = redact_paths(f"Internal error while serving the request: {type(err).__name__}: {err}")
            await JSONResponse(json_safe({"detail": detail, "error": "internal"}), 500)(scope, receive, send)


def _json(status: int, detail: str, error: str | None = None, headers: dict[str, str] | None = None,
          **extra: Any) -> JSONResponse:
    body = {"detail": redact_paths(detail), **({"error": error} if error else {}), **extra}
    return JSONResponse(json_safe(body), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """The JSON error mapping of both servers (table in ``docs/serving.md``)."""
    handlers: dict[type[Exception], Callable[[Exception], JSONResponse]] = {
        ApiError: lambda e: _json(e.status, e.detail, e.error, e.headers),  # type: ignore[attr-defined]
        QueueFullError: lambda e: _json(429, str(e), "queue_full", {"Retry-After": "1"}),
        QueueTimeoutError: lambda e: _json(503, str(e), "queue_timeout", {"Retry-After": "2"}),
        BudgetError: lambda e: _json(413, str(e), "over_budget"),
        AdapterRunError: lambda e: _json(500, str(e), "adapter_failed"),
        UnknownTaskError: lambda e: _json(404, str(e), "unknown_task"),
        DuplicateAdapterError: lambda e: _json(409, str(e), "duplicate_adapter"),
        AdapterPathError: lambda e: _json(403, str(e), "adapter_path"),
        EngineError: lambda e: _json(422, str(e), "invalid_request"),
    }

    def make(fn: Callable[[Exception], JSONResponse]) -> Callable[[Request, Exception], Any]:
        async def handler(_: Request, err: Exception) -> JSONResponse:
            return fn(err)
        return handler

    for exc_type, fn in handlers.items():
        app.add_exception_handler(exc_type, make(fn))

    async def invalid(_: Request, err: Exception) -> JSONResponse:
        detail, errors = validation_detail(list(err.errors()))  # type: ignore[attr-defined]
        return _json(422, detail, "invalid_request", errors=errors)

    async def http_error(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, HTTPException)
        detail = err.detail if isinstance(err.detail, str) else str(err.detail)
        if detail == _BAD_BODY:
            detail = ("Could not parse the request body: send UTF-8 JSON (no invalid bytes, numbers of at most 4300 "
                      "digits, nesting depth within limits).")
        return _json(err.status_code, detail, headers=dict(err.headers or {}))

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_middleware(_CatchAll)


def make_app(
    backend: Backend,
    *,
    admin: bool = True,
    admin_token: str | None = None,
    limits: Limits | None = None,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    title: str = "bitfit-peft multi-task server",
    api_options: ApiOptions | None = None,
) -> FastAPI:
    """The FastAPI app of both servers over ``backend`` (see :func:`create_app` for the arguments; the backend holds
    the adapter roots and the Hub setting, and its engines check hot loads against them; ``limits``: the engines',
    of which the app checks the request-shape ones)."""
    limits = limits if limits is not None else Limits()
    if admin_token is not None and not admin_token.strip():
        raise ValueError("admin_token is empty; give a non-empty secret or None for no admin authentication.")
    app = FastAPI(title=title, version=__version__, lifespan=lifespan,
                  description="Many BitFit adapters over one base model; inputs of different tasks share a forward.")
    app.state.backend = backend
    install_error_handlers(app)
    _add_inference_routes(app, backend, limits)
    _add_adapter_routes(app, backend, Depends(_admin_guard(admin, admin_token)))
    install_api(app, backend, Depends(_admin_guard(admin, admin_token)), api_options or ApiOptions(),
                limits, lambda name, path: AdapterSpec(name, path, False))

    @app.get("/v1/stats", summary="Batching statistics")
    async def stats() -> dict[str, Any]:
        return await backend.stats()

    @app.get("/healthz", summary="Health: adapters, queue")
    async def healthz() -> dict[str, Any]:
        return await backend.health()

    @app.get("/livez", summary="Liveness: the process answers (never waits for the engine)")
    async def livez() -> dict[str, Any]:
        return {"status": "alive"}

    @app.get("/readyz", summary="Readiness: 200 once requests can be served, else 503")
    async def readyz() -> JSONResponse:
        health = await backend.health()
        ready = health.get("status") == "ok"
        return JSONResponse(json_safe({**health, "ready": ready}), 200 if ready else 503,
                            headers=None if ready else {"Retry-After": "1"})

    return app


def _admin_guard(admin: bool, admin_token: str | None) -> Callable[[Request], None]:
    """The dependency of the adapter-management routes: 403 with ``admin=False``, 401 without the token."""
    token = admin_token.encode("utf-8") if admin_token is not None else None

    def require_admin(request: Request) -> None:
        if not admin:
            raise ApiError(403, "Adapter management is disabled on this server (--no-admin).", "admin_disabled")
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        challenge = 'Bearer realm="bitfit-peft admin"'
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "Adapter management needs 'Authorization: Bearer <admin token>'.", "unauthorized",
                           {"WWW-Authenticate": challenge})
        if not secrets.compare_digest(given.strip().encode("latin-1"), token):
            raise ApiError(401, "Wrong admin token; send the server's --admin-token as a Bearer token.",
                           "unauthorized", {"WWW-Authenticate": challenge + ', error="invalid_token"'})

    return require_admin


def _add_inference_routes(app: FastAPI, backend: Backend, limits: Limits) -> None:
    max_inputs, max_new_tokens_limit = limits.max_inputs_per_request, limits.max_new_tokens_limit

    def check_size(n: int) -> None:
        if n > max_inputs:
            raise ApiError(413, f"Too many inputs: {n} > {max_inputs} per request; split it.")

    @app.post("/v1/predict", summary="Classify / regress / embed inputs of any loaded tasks")
    async def predict(body: PredictRequest) -> dict[str, Any]:
        if backend.task_type not in PREDICT_TYPES:
            raise ApiError(400, f"This server's model is {backend.task_type}: use POST /v1/generate.")
        items = body.items()
        check_size(len(items))
        return {"results": await backend.run("predict", (), [(it.task, it.text, it.text_pair) for it in items])}

    @app.post("/v1/generate", summary="Generate text for prompts of any loaded tasks")
    async def generate(body: GenerateRequest) -> dict[str, Any]:
        if backend.task_type not in GENERATE_TYPES:
            raise ApiError(400, f"This server's model is {backend.task_type}: use POST /v1/predict.")
        items = body.items()
        check_size(len(items))
        if body.max_new_tokens > max_new_tokens_limit:
            raise ApiError(413, f"max_new_tokens={body.max_new_tokens} exceeds this server's limit "
                                f"{max_new_tokens_limit}; ask for fewer tokens.")
        return {"results": await backend.run("generate", body.settings(), [(it.task, it.prompt) for it in items])}


def _add_adapter_routes(app: FastAPI, backend: Backend, admin: Any) -> None:
    @app.get("/v1/adapters", summary="Loaded adapters, their labels and memory")
    async def list_adapters() -> dict[str, Any]:
        return {"base": backend.base_name, "task_type": backend.task_type, "adapters": await backend.adapters()}

    @app.post("/v1/adapters", status_code=201, dependencies=[admin],
              summary="Hot-load an adapter (from an adapter root or the Hub)")
    async def load_adapter(body: LoadAdapterRequest) -> dict[str, Any]:
        return await backend.load(adapter_spec(body))

    @app.delete("/v1/adapters/{name}", dependencies=[admin], summary="Unload an adapter")
    async def delete_adapter(name: str) -> dict[str, Any]:
        return {"removed": name, "adapters": await backend.unload(name)}


def create_app(
    engine: MultiTaskEngine,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_queue: int = 1024,
    adapter_roots: Sequence[str | Path] = (),
    *,
    allow_hub: bool = False,
    admin: bool = True,
    admin_token: str | None = None,
    api_options: ApiOptions | None = None,
) -> FastAPI:
    """Build the FastAPI app serving ``engine`` in this process.

    Args:
        engine: the loaded :class:`MultiTaskEngine`.
        max_batch_size: dynamic batching: inputs of any task share a forward, up to this many.
        max_wait_ms: how long the oldest waiting input waits for others to join its batch.
        max_queue: most inputs waiting; beyond it requests get HTTP 429 with a JSON message (never dropped).
        adapter_roots: directories hot loading (``POST /v1/adapters``) may read from: every file a load opens must
            resolve inside one of them. Empty disables loading from paths.
        allow_hub: let ``POST /v1/adapters`` download ``hub_id`` adapters from the Hugging Face Hub.
        admin: serve ``POST``/``DELETE /v1/adapters`` at all.
        admin_token: when set, those endpoints need ``Authorization: Bearer <admin_token>`` (else 401).
        api_options: the OpenAI-compatible API's served model name and the metrics' prefixes and label cap.
    """
    roots = [Path(r).expanduser().resolve() for r in adapter_roots]
    backend = LocalBackend(engine, max_batch_size, max_wait_ms, max_queue, roots, allow_hub)
    app = make_app(backend, admin=admin, admin_token=admin_token, limits=engine.limits, lifespan=backend.lifespan,
                   api_options=api_options)
    app.state.engine, app.state.batcher = engine, backend.batcher
    return app
