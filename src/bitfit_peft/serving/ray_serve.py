"""Ray Serve deployment of the multi-task server (``pip install "bitfit-peft[ray]"``): the same HTTP API as
:func:`~bitfit_peft.serving.create_app`, served by N replicas that each hold the base model and every adapter.

Three deployments make one application (:func:`build_app`):

- ``BitFitIngress``: the FastAPI app of ``server.py`` (same routes, schemas, errors). It forwards each request to a
  replica through a ``DeploymentHandle``; when a replica dies under a request it retries on another one (predict and
  generate are idempotent) and answers ``503`` + ``Retry-After`` only when no replica could take it.
- ``AdapterReplica`` (``replicas`` or ``autoscaling_config``): one :class:`MultiTaskEngine` behind the plain
  server's dynamic batcher (``dispatch.engine_batcher``: budgets, fair flows, queue deadline, cheaper requests run
  between the blocks of a long batch), so inputs of *different* tasks share a forward (the adapter name stays in the
  payload; no ``@serve.multiplexed`` routing, which would split batches by model id).
- ``AdapterRegistry`` (one replica; cluster-wide, unlike each engine's own ``registry.Registry``): ``{name: spec}``
  of every adapter plus a version. A hot load is validated by
  loading it on the replica that receives it, then recorded; the other replicas sync to the registry version before
  serving (cached ``sync_interval_s``; forced when a request names a task they do not hold, so it is answered, not
  dropped), and every replica is told to sync right after a load or unload. A restarted replica syncs on start.

Example::

    import ray
    from ray import serve
    from bitfit_peft.serving.ray_serve import build_app

    serve.run(build_app("base/", {"sst2": "out/sst2", "spam": "out/spam"}, replicas=2), route_prefix="/")
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from bitfit_peft.serving.dispatch import admit, engine_batcher, run_engine_batch, unknown_tasks
from bitfit_peft.serving.engine import MultiTaskEngine, normalize_task_type
from bitfit_peft.serving.limits import Limits
from bitfit_peft.serving.openai_api import ApiOptions
from bitfit_peft.serving.ray_openai import ReplicaMetrics, StreamingReplica, refusal
from bitfit_peft.serving.server import AdapterSpec, ApiError, add_to_engine, make_app

__all__ = ["AdapterRegistry", "AdapterReplica", "BitFitIngress", "build_app"]

logger = logging.getLogger(__name__)
_RETRYABLE = (RayActorError, BackPressureError)
Result = tuple[Any, ...]  # ("ok", value[, replica]), ("error", status, detail, code) or ("raise", error)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class AdapterRegistry:
    """The adapters every replica must hold: ``{name: spec}``, a version and an epoch (new on every restart)."""

    def __init__(self, initial: list[dict[str, Any]]) -> None:
        self.epoch, self.version, self._serial = uuid.uuid4().hex[:12], 0, 0
        self.specs: dict[str, dict[str, Any]] = {}
        for spec in initial:
            self._put(spec)

    def _put(self, spec: dict[str, Any]) -> str:
        self._serial += 1
        self.version += 1
        spec_id = f"{self.epoch}:{self._serial}"
        self.specs[spec["name"]] = {**spec, "id": spec_id}
        return spec_id

    async def head(self) -> tuple[str, int]:
        return self.epoch, self.version

    async def snapshot(self) -> tuple[str, int, dict[str, dict[str, Any]]]:
        return self.epoch, self.version, dict(self.specs)

    async def add(self, spec: dict[str, Any]) -> str | None:
        """Record ``spec``; None when its name is taken."""
        return None if spec["name"] in self.specs else self._put(spec)

    async def remove(self, name: str) -> bool:
        if self.specs.pop(name, None) is None:
            return False
        self.version += 1
        return True

    async def retire(self, name: str, spec_id: str) -> bool:
        """Drop ``name`` if it is still the version ``spec_id`` (a replica could not load it: its folder broke), so
        that every replica converges on the same answer (404) instead of some serving it and some not."""
        if self.specs.get(name, {}).get("id") != spec_id:
            return False
        return await self.remove(name)


@serve.deployment(max_ongoing_requests=64)
class AdapterReplica(StreamingReplica):
    """One engine holding the base and every registered adapter."""

    async def __init__(self, registry: DeploymentHandle, engine: dict[str, Any], roots: list[str], allow_hub: bool,
                       max_batch_size: int, batch_wait_timeout_s: float, sync_interval_s: float,
                       torch_threads: int | None) -> None:
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self._registry, self._roots, self._allow_hub = registry, [Path(r) for r in roots], allow_hub
        self._interval = sync_interval_s
        torch.manual_seed(0)  # a head missing from the base checkpoint ('__base__' of SEQ_CLS) is the same everywhere
        self.engine = await asyncio.to_thread(lambda: MultiTaskEngine(**engine))
        self._applied: dict[str, str] = {}  # adapter name -> registry spec id
        self._failed: dict[str, str] = {}  # spec id -> why it could not be loaded here
        self._head: tuple[str, int] | None = None
        self._checked = 0.0
        self._sync_lock = asyncio.Lock()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.batches = self.items = self.mixed = self.ongoing = 0
        self.metrics = ReplicaMetrics()
        self.engine.registry.events.subscribe(self.metrics.adapter_event)
        self.batcher = engine_batcher(self.engine, max_batch_size, batch_wait_timeout_s * 1000.0, max_queue=1024,
                                      runner=self._run_batch)
        await self.batcher.start()
        await self._sync(force=True)

    # ------------------------------------------------------------------ registry sync
    async def _sync(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._checked < self._interval:
            return
        async with self._sync_lock:
            head = await self._registry.head.remote()
            if head != self._head:
                epoch, version, specs = await self._registry.snapshot.remote()
                failed_before = set(self._failed)
                await asyncio.to_thread(self._apply, specs)
                self._head = (epoch, version)
                for name, raw in specs.items():  # newly unloadable here: retire it everywhere (convergence)
                    if raw["id"] in self._failed and raw["id"] not in failed_before:
                        await self._registry.retire.remote(name, raw["id"])
            self._checked = time.monotonic()

    def _apply(self, specs: dict[str, dict[str, Any]]) -> None:
        for name, spec_id in list(self._applied.items()):
            if specs.get(name, {}).get("id") != spec_id:
                with suppress(Exception):
                    self.engine.remove_adapter(name)
                del self._applied[name]
        for name, raw in specs.items():
            if name in self._applied or raw["id"] in self._failed:
                continue
            spec = AdapterSpec(**{k: v for k, v in raw.items() if k != "id"})
            try:
                add_to_engine(self.engine, spec, self._roots, self._allow_hub)
                self._applied[name] = raw["id"]
            except ApiError as err:  # e.g. the folder changed since it was recorded: keep serving the others
                logger.error("replica %s could not load adapter %r: %s", self.replica_id, name, err.detail)
                self._failed[raw["id"]] = err.detail

    # ------------------------------------------------------------------ serving
    def _run_batch(self, key: tuple[str, tuple], payloads: list[Any]) -> list[Any]:
        """One dynamic batch (on the batcher's thread): :func:`run_engine_batch`, counted."""
        kind, settings = key
        out = run_engine_batch(self.engine, kind, settings, payloads)
        self.batches += 1
        self.items += len(payloads)
        self.mixed += len({p.task for p in payloads}) > 1
        self.metrics.batch(kind, len(payloads), out)
        self.metrics.resident.set(len(self.engine.tasks()))
        return out

    async def _submit(self, kind: str, settings: tuple, items: list[Any]) -> list[Any]:
        """``items`` (admitted: :func:`admit`) through the batcher; raises the first input's error."""
        return await self.batcher.submit((kind, settings), items)

    async def handle(self, kind: str, settings: tuple, payloads: list[tuple]) -> Result:
        self.ongoing += 1
        try:
            return await self._handle(kind, settings, payloads)
        finally:
            self.ongoing -= 1

    async def _admitted(self, kind: str, settings: tuple, payloads: list[tuple]) -> list[Any]:
        """``payloads`` known here (after catching up with the registry), tokenized and costed before any engine
        work, off the engine lock; raises :class:`UnknownTaskError` or :class:`BudgetError`."""
        await self._sync()
        if unknown_tasks(self.engine, [p[0] for p in payloads]) is not None:
            await self._sync(force=True)  # loaded on another replica since our last sync?
            missing = unknown_tasks(self.engine, [p[0] for p in payloads])
            if missing is not None:
                raise missing
        return await asyncio.to_thread(admit, self.engine, kind, settings, payloads)

    async def _handle(self, kind: str, settings: tuple, payloads: list[tuple]) -> Result:
        try:
            items = await self._admitted(kind, settings, payloads)
            results = await self._submit(kind, settings, items)
        except Exception as err:  # noqa: BLE001 - BudgetError: 413 naming the limit; queue: 429/503; ...
            return refusal(err)
        return ("ok", [r.to_dict() for r in results], self.replica_id)

    async def adapters(self) -> Result:
        await self._sync()
        return ("ok", [i.to_dict() for i in await asyncio.to_thread(self.engine.adapters)])

    async def load(self, raw: dict[str, Any]) -> Result:
        spec = AdapterSpec(**raw)
        await self._sync(force=True)  # an adapter of that name recorded elsewhere is now here: the load is a 409
        try:
            info = await asyncio.to_thread(add_to_engine, self.engine, spec, self._roots, self._allow_hub)
        except ApiError as err:
            return ("error", err.status, err.detail, err.error)
        spec_id = await self._registry.add.remote(raw)
        if spec_id is None:  # recorded by another replica meanwhile
            await asyncio.to_thread(self.engine.remove_adapter, spec.name)
            return ("error", 409, f"An adapter named {spec.name!r} is already loaded; DELETE it first.",
                    "duplicate_adapter")
        self._applied[spec.name] = spec_id
        self._checked = 0.0
        return ("ok", info.to_dict())

    async def unload(self, name: str) -> Result:
        if not await self._registry.remove.remote(name):
            return ("error", 404, f"No adapter named {name!r} is loaded.", "unknown_task")
        await self._sync(force=True)
        return ("ok", self.engine.tasks())

    async def state(self, sync: bool = False) -> dict[str, Any]:
        """This replica's adapters and batch counts (``sync=True``: after catching up with the registry)."""
        if sync:
            await self._sync(force=True)
        return {"replica": self.replica_id, "pid": os.getpid(), "actor": ray.get_runtime_context().get_actor_name(),
                "adapters": self.engine.tasks(),
                "registry": list(self._head or ()), "batches": self.batches, "items": self.items,
                "mixed_task_batches": self.mixed, "ongoing_requests": self.ongoing,
                "failed_adapters": list(self._failed.values())}


class RayBackend:
    """:class:`~bitfit_peft.serving.server.Backend` over the replicas' handle (retries when a replica dies)."""

    def __init__(self, replicas: DeploymentHandle, task_type: str, base_name: str, retries: int) -> None:
        self.replicas, self.task_type, self.base_name, self.retries = replicas, task_type, base_name, retries
        self.replica_failures = 0  # calls that failed because a replica died or was overloaded (then retried)

    async def _call(self, method: str, *args: Any, retry: bool = True) -> Any:
        for attempt in range(self.retries + 1 if retry else 1):
            try:
                result = await getattr(self.replicas, method).remote(*args)
                break
            except _RETRYABLE as err:
                self.replica_failures += 1
                logger.warning("replica call %s failed (attempt %d): %s", method, attempt + 1, type(err).__name__)
                await asyncio.sleep(0.25 * (attempt + 1))
            except RayTaskError as err:  # the replica raised: one line (its traceback holds server paths)
                logger.error("replica call %s failed: %s", method, err)
                raise ApiError(500, f"A replica failed on this request ({type(err.cause).__name__}); retry, or ask "
                                    "the operator to check the replica logs.", "internal") from None
        else:
            hint = "" if retry else " It may or may not have been applied: check GET /v1/adapters."
            raise ApiError(503, f"No replica could serve this request (one is restarting); retry shortly.{hint}",
                           "replica_unavailable", {"Retry-After": "1"})
        return _unpack(result)

    async def _broadcast(self, method: str, *args: Any) -> list[Any]:
        response = self.replicas.broadcast(method, *args)
        results = await response.results_async(return_exceptions=True)
        return [r for r in results if not isinstance(r, BaseException)]

    async def run(self, kind: str, settings: tuple[tuple[str, Any], ...], payloads: list[Any]) -> list[dict]:
        return await self._call("handle", kind, settings, payloads)

    async def stream(self, settings: tuple[tuple[str, Any], ...], payloads: list[Any]) -> AsyncIterator[tuple]:
        """A replica's stream events (not retried on another replica once it has started)."""
        async for event in self.replicas.options(stream=True).stream.remote(settings, payloads):
            if event[0] in ("error", "raise"):
                _unpack(event)
            yield event

    async def adapters(self) -> list[dict[str, Any]]:
        return await self._call("adapters")

    async def load(self, spec: AdapterSpec) -> dict[str, Any]:
        info = await self._call("load", spec.to_dict(), retry=False)
        await self._broadcast("state", True)  # every replica loads it now, not on its first request
        return info

    async def unload(self, name: str) -> list[str]:
        tasks = await self._call("unload", name, retry=False)
        await self._broadcast("state", True)
        return tasks

    async def stats(self) -> dict[str, Any]:
        replicas = sorted(await self._broadcast("state"), key=lambda s: s["replica"])
        batches, items = sum(r["batches"] for r in replicas), sum(r["items"] for r in replicas)
        mixed = sum(r["mixed_task_batches"] for r in replicas)
        return {"batches": batches, "items": items, "mixed_task_batches": mixed,
                "mean_batch_size": round(items / batches, 3) if batches else 0.0,
                "replica_failures": self.replica_failures, "replicas": replicas}

    async def health(self) -> dict[str, Any]:
        replicas = await self._broadcast("state")
        adapters = sorted({a for r in replicas for a in r["adapters"]})
        return {"status": "ok" if replicas else "degraded", "task_type": self.task_type, "adapters": adapters,
                "replicas": len(replicas)}


def _unpack(result: Any) -> Any:
    """A replica's answer: its value, or its error raised here (the app maps it to HTTP as the plain server does)."""
    if isinstance(result, tuple) and result and result[0] == "raise":
        raise result[1]
    if isinstance(result, tuple) and result and result[0] == "error":
        _, status, detail, code = result
        raise ApiError(status, detail, code)
    return result[1] if isinstance(result, tuple) else result


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress()
class BitFitIngress:
    """The HTTP front: ``server.make_app`` over :class:`RayBackend`."""

    def __init__(self, replicas: DeploymentHandle, settings: dict[str, Any]) -> None:
        self._replicas, self._settings = replicas, settings

    def __serve_build_asgi_app__(self) -> Any:
        s = self._settings
        backend = RayBackend(self._replicas, s["task_type"], s["base_name"], s["request_retries"])
        backend.max_lora = s["max_batch_size"]  # type: ignore[attr-defined]  # most adapters one batch can mix
        return make_app(backend, admin=s["admin"], admin_token=s["admin_token"], limits=s["limits"],
                        api_options=s["api_options"], title="bitfit-peft multi-task server (Ray Serve)")


def _startup_specs(adapters: Mapping[str, str] | Sequence[tuple[str, str]], allow_hub: bool,
                   allow_base_mismatch: bool) -> list[dict[str, Any]]:
    pairs = list(adapters.items()) if isinstance(adapters, Mapping) else [tuple(p) for p in adapters]
    specs = []
    for name, source in pairs:
        local = Path(source).expanduser()
        if local.is_dir():
            spec = AdapterSpec(name, str(local.resolve()), False, confined=False,
                               allow_base_mismatch=allow_base_mismatch)
        elif allow_hub:
            spec = AdapterSpec(name, str(source), True, allow_base_mismatch=allow_base_mismatch)
        else:
            raise ValueError(f"adapter {name!r}: {source} is not a local folder; pass allow_hub=True for a Hub id.")
        specs.append(spec.to_dict())
    return specs


def build_app(
    base: str,
    adapters: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    *,
    task_type: str = "SEQ_CLS",
    replicas: int = 2,
    autoscaling_config: dict[str, Any] | None = None,
    max_batch_size: int = 32,
    batch_wait_timeout_s: float = 0.005,
    ray_actor_options: dict[str, Any] | None = None,
    replica_options: dict[str, Any] | None = None,
    adapter_roots: Sequence[str | Path] = (),
    allow_hub: bool = False,
    allow_base_mismatch: bool = False,
    admin: bool = True,
    admin_token: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_length: int = 512,
    normalize_embeddings: bool = False,
    torch_threads: int | None = None,
    sync_interval_s: float = 1.0,
    request_retries: int = 3,
    quantize: str | None = None,
    api_options: ApiOptions | None = None,
    limits: Limits | None = None,
) -> serve.Application:
    """The Serve application: ``serve.run(build_app(...), route_prefix="/")``.

    Args:
        base / adapters / task_type / device / dtype / max_length / normalize_embeddings / quantize: as for
            :class:`MultiTaskEngine` and ``bitfit-peft serve``; ``adapters`` maps names to folders (or Hub ids with
            ``allow_hub``), loaded by every replica at start.
        replicas: engine replicas (ignored when ``autoscaling_config`` is given, e.g.
            ``{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}``).
        max_batch_size / batch_wait_timeout_s: each replica's dynamic batcher (inputs of any task).
        ray_actor_options: per replica (default ``{"num_cpus": 1}``); ``replica_options``: more
            ``Deployment.options`` (``max_ongoing_requests``, ``health_check_period_s``...).
        adapter_roots / allow_hub / admin / admin_token: hot loading, as for :func:`create_app`. Every replica must
            see the roots at the same paths (a shared filesystem) or use the Hub.
        torch_threads: ``torch.set_num_threads`` in each replica.
        sync_interval_s: how stale a replica's adapter set may be before it asks the registry again (an unload
            reaches every replica at once through a broadcast, at the latest after this long).
        request_retries: retries on another replica when one dies under a request (then 503 + ``Retry-After``).
        api_options: the OpenAI-compatible API's served model name, metrics prefixes and label cap.
        limits: every replica's request, batch and head budgets (``limits.py``).
    """
    if replicas < 1:
        raise ValueError(f"replicas={replicas}: need at least 1 replica.")
    if admin_token is not None and not admin_token.strip():
        raise ValueError("admin_token is empty; give a non-empty secret or None.")
    local_base = Path(base).expanduser()
    base_name = str(local_base.resolve()) if local_base.is_dir() else str(base)
    roots = [str(Path(r).expanduser().resolve()) for r in adapter_roots]
    engine = {"base": base_name, "task_type": task_type, "device": device, "dtype": dtype, "max_length": max_length,
              "normalize_embeddings": normalize_embeddings, "quantize": quantize, "limits": limits}
    settings = {"task_type": str(normalize_task_type(task_type)), "base_name": base_name, "admin": admin,
                "admin_token": admin_token, "request_retries": request_retries, "api_options": api_options,
                "limits": limits if limits is not None else Limits(), "max_batch_size": max_batch_size}
    options: dict[str, Any] = {"ray_actor_options": ray_actor_options or {"num_cpus": 1},
                               "max_ongoing_requests": max(64, 2 * max_batch_size)}
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = replicas
    options.update(replica_options or {})
    registry = AdapterRegistry.bind(_startup_specs(adapters, allow_hub, allow_base_mismatch))
    replica = AdapterReplica.options(**options).bind(registry, engine, roots, allow_hub, max_batch_size,
                                                     batch_wait_timeout_s, sync_interval_s, torch_threads)
    return BitFitIngress.bind(replica, settings)
