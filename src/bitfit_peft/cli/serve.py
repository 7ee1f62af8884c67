"""``bitfit-peft serve``: an HTTP server for many BitFit adapters over one base model.

Example:
    $ bitfit-peft serve --base sentence-transformers/all-MiniLM-L6-v2 \\
        --adapter sst2=out/sst2 --adapter spam=out/spam --adapter-root out/ --port 8000
    $ curl -s localhost:8000/v1/predict -H 'content-type: application/json' \\
        -d '{"inputs": [{"task": "sst2", "text": "great film"}, {"task": "spam", "text": "WIN NOW"}]}'

With ``--ray --replicas N`` the same HTTP API is served by a Ray Serve application (``pip install
"bitfit-peft[ray]"``): N replicas, each holding the base and every adapter (``docs/serving.md#scaling-out``).
``--admin-token`` (or ``BITFIT_PEFT_ADMIN_TOKEN``) makes ``POST``/``DELETE /v1/adapters`` require
``Authorization: Bearer <token>``.

Before anything is loaded, ``--base`` and every ``--adapter`` are checked: a missing directory, a folder without
``config.json`` / ``adapter_config.json``, or a Hub id that cannot be fetched is one line naming it, exit code 2
(as is any load error). An adapter trained on another base is refused unless ``--allow-base-mismatch``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import signal
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from bitfit_peft.cli import SwitchCommand, app
from bitfit_peft.cli._errors import ADAPTER, MODEL, check_source, fail, with_flag_hint
from bitfit_peft.errors import BitFitError
from bitfit_peft.names import CONFIG_FILE as CONFIG_NAME

__all__ = ["on_demand_roots", "parse_adapter_specs", "parse_limits", "register", "serve_command"]


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    """``["sst2=out/sst2", ...]`` -> ``[("sst2", "out/sst2"), ...]`` (raises ``typer.BadParameter``)."""
    pairs: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise typer.BadParameter(f"--adapter expects NAME=PATH_OR_HUB_ID, got {spec!r}.")
        pairs.append((name.strip(), source.strip()))
    names = [n for n, _ in pairs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise typer.BadParameter(f"--adapter names must be unique; repeated: {dupes}.")
    return pairs


def _infer_task_type(pairs: list[tuple[str, str]]) -> str:
    for _, source in pairs:
        cfg = Path(source).expanduser() / CONFIG_NAME
        if cfg.is_file():
            task_type = json.loads(cfg.read_text(encoding="utf-8")).get("task_type")
            if task_type:
                return str(task_type)
    raise typer.BadParameter(
        "Cannot infer the task type (no local --adapter with a task_type); pass --task-type "
        "(SEQ_CLS, FEATURE_EXTRACTION, CAUSAL_LM or SEQ_2_SEQ_LM)."
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(
    base: str = typer.Option(..., "--base", help="Base model: local directory or Hugging Face Hub id."),
    adapter: list[str] = typer.Option(
        [], "--adapter", help="NAME=PATH (or NAME=HUB_ID with --allow-hub); repeat for each task."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    task_type: str = typer.Option(
        "auto", "--task-type", help="SEQ_CLS, FEATURE_EXTRACTION, CAUSAL_LM, SEQ_2_SEQ_LM or auto (from adapters)."
    ),
    max_batch_size: int = typer.Option(32, "--max-batch-size", min=1, help="Most inputs per forward."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0.0, help="How long to wait to fill a batch."),
    max_queue: int = typer.Option(1024, "--max-queue", min=1, help="Most waiting inputs; beyond: HTTP 429."),
    max_resident: int | None = typer.Option(
        None, "--max-resident", min=1, show_default=False,
        help="Keep at most K adapters in memory: least recently used evicted, reloaded on their next request; a "
        "request for <adapter-root>/<name> loads it on first use. Default: no cap.",
    ),
    adapter_root: list[Path] = typer.Option(
        [], "--adapter-root", help="Directory POST /v1/adapters may load from (repeatable); none: no hot loading."
    ),
    on_demand: str = typer.Option(
        "auto", "--on-demand", metavar="auto|on|off",
        help="With --max-resident: a request naming <adapter-root>/<name> loads it (bounded in time). auto: on "
        "unless --no-admin or --admin-token is set (then only the admin loads adapters).",
    ),
    pin: bool = typer.Option(False, "--pin", help="With --max-resident: never evict the --adapter ones."),
    limit: list[str] = typer.Option(
        [], "--limit", metavar="NAME=VALUE",
        help="Override a request/batch/head budget, e.g. --limit max_batch_tokens=2048 (repeatable; names and "
        "defaults: docs/security.md#limits).",
    ),
    allow_hub: bool = typer.Option(False, "--allow-hub", help="Allow Hub ids in --adapter and POST /v1/adapters."),
    allow_base_mismatch: bool = typer.Option(
        False,
        "--allow-base-mismatch",
        help="Load every --adapter even if it was trained on another base (skips the base fingerprint check).",
    ),
    no_admin: bool = typer.Option(False, "--no-admin", help="Disable POST/DELETE /v1/adapters."),
    admin_token: str | None = typer.Option(
        None, "--admin-token", envvar="BITFIT_PEFT_ADMIN_TOKEN", show_default=False, show_envvar=True,
        help="Require 'Authorization: Bearer TOKEN' for POST/DELETE /v1/adapters (prefer the environment variable: "
        "command lines are visible to other local users).",
    ),
    ray: bool = typer.Option(False, "--ray", help="Serve with Ray Serve replicas (needs bitfit-peft[ray])."),
    replicas: int = typer.Option(2, "--replicas", min=1, help="With --ray: engine replicas, each with every adapter."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="With --ray: a running cluster ('auto', 'ray://host:10001'); default: start one."
    ),
    cpus_per_replica: float = typer.Option(1.0, "--cpus-per-replica", min=0.0, help="With --ray: CPUs per replica."),
    quantize: str | None = typer.Option(
        None, "--quantize", show_default=False, metavar="nf4|fp4|int8|torchao-int8",
        help="Load the base quantized: nf4 / fp4 (bitsandbytes 4-bit), int8 (bitsandbytes), torchao-int8 (torchao "
        "int8 weight-only); adapters stay full precision.",
    ),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("auto", "--dtype", help="float32, bfloat16, float16 or auto."),
    max_length: int = typer.Option(512, "--max-length", min=1, help="Truncate inputs to this many tokens."),
    normalize_embeddings: bool = typer.Option(False, "--normalize", help="L2-normalise embeddings."),
    log_level: str = typer.Option("info", "--log-level"),
    log_json: bool = typer.Option(False, "--log-json", help="Request and adapter-event logs as JSON lines."),
    served_model_name: str | None = typer.Option(
        None, "--served-model-name", help="The base's model name in the OpenAI API (default: --base)."),
    metrics_prefix: str = typer.Option("bitfit_peft:", "--metrics-prefix", help="Prefix of the /metrics series."),
    max_adapter_labels: int = typer.Option(
        100, "--max-adapter-labels", min=0, help="Most adapter names as metric labels; more count as 'other'."),
) -> None:
    """Serve several BitFit adapters of one base model; inputs of different tasks share one forward."""
    import uvicorn

    # deferred: serving loads torch, transformers and FastAPI; --help needs only the options
    from bitfit_peft.serving import create_app
    from bitfit_peft.serving.openai_api import ApiOptions  # deferred: as above (FastAPI, prometheus_client)
    from bitfit_peft.serving.request_log import configure_logging  # deferred: as above

    pairs = parse_adapter_specs(adapter)
    check_source(base, MODEL)
    for name, source in pairs:
        check_source(source, ADAPTER, label=f"adapter {name!r}", allow_hub=allow_hub)
    if task_type == "auto":
        task_type = _infer_task_type(pairs)
    _check_serving_options(host, admin_token, no_admin, adapter_root, ray, max_resident)
    _check_quantize(quantize)
    configure_logging(json_lines=log_json, level=log_level.upper())
    api = ApiOptions(served_model_name=served_model_name, metrics_prefix=metrics_prefix,
                     max_adapter_labels=max_adapter_labels)
    if ray:
        _serve_ray(base, pairs, task_type=task_type, replicas=replicas, host=host, port=port,
                   max_batch_size=max_batch_size, batch_wait_timeout_s=max_wait_ms / 1000, adapter_roots=adapter_root,
                   allow_hub=allow_hub, allow_base_mismatch=allow_base_mismatch, admin=not no_admin,
                   admin_token=admin_token, device=device, dtype=dtype, max_length=max_length,
                   normalize_embeddings=normalize_embeddings, ray_address=ray_address,
                   cpus_per_replica=cpus_per_replica, quantize=quantize, api_options=api,
                   limits=parse_limits(limit))
        return
    demand_roots = on_demand_roots(adapter_root, max_resident, on_demand, no_admin, admin_token)
    engine = _local_engine(base, pairs, allow_hub=allow_hub, allow_base_mismatch=allow_base_mismatch, pin=pin,
                           limits=parse_limits(limit), task_type=task_type, device=device, dtype=dtype,
                           max_length=max_length,
                           normalize_embeddings=normalize_embeddings, max_resident=max_resident,
                           adapter_roots=demand_roots, quantize=quantize)
    if max_resident is not None:
        Console(stderr=True).print(f"loading on demand from the adapter roots: {'on' if demand_roots else 'off'}")
    app = create_app(
        engine,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        adapter_roots=adapter_root,
        allow_hub=allow_hub,
        admin=not no_admin,
        admin_token=admin_token,
        api_options=api,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def parse_limits(specs: list[str]) -> Any:
    """``["max_batch_tokens=2048", ...]`` -> a :class:`~bitfit_peft.serving.limits.Limits` (one line on a bad one)."""
    # deferred: the limits module loads the serving package; --help needs only the options
    from bitfit_peft.serving.limits import Limits

    known = Limits().to_dict()
    values: dict[str, Any] = {}
    for spec in specs:
        name, _, raw = spec.partition("=")
        if name not in known:
            fail(f"--limit {spec!r}: unknown limit; use one of {sorted(known)}.")
        try:
            values[name] = type(known[name])(raw)
        except ValueError:
            fail(f"--limit {spec!r}: {raw!r} is not a number.")
    try:
        return Limits(**values)
    except ValueError as err:
        fail(f"--limit: {err}")


def on_demand_roots(adapter_root: list[Path], max_resident: int | None, on_demand: str, no_admin: bool,
                    admin_token: str | None) -> list[Path]:
    """The roots the engine may load from when a request names an unknown adapter (empty: no loading on demand).

    Loading on demand is loading by any client, so it follows the admin policy: ``auto`` is off under
    ``--no-admin`` or ``--admin-token`` and on otherwise (with ``--max-resident``); ``on`` / ``off`` say so."""
    if on_demand not in ("auto", "on", "off"):
        fail(f"--on-demand must be auto, on or off, got {on_demand!r}.")
    if max_resident is None or not adapter_root:
        if on_demand == "on":
            fail("--on-demand on needs --max-resident and at least one --adapter-root.")
        return []
    enabled = on_demand == "on" or (on_demand == "auto" and not no_admin and admin_token is None)
    return list(adapter_root) if enabled else []


def _check_serving_options(host: str, admin_token: str | None, no_admin: bool, adapter_root: list[Path], ray: bool,
                           max_resident: int | None) -> None:
    """Refuse contradictory or empty options; warn when binding beyond loopback."""
    if admin_token is not None and not admin_token.strip():
        raise typer.BadParameter("--admin-token / BITFIT_PEFT_ADMIN_TOKEN is empty; set a secret or unset it.")
    if not _is_loopback(host):
        unguarded = not no_admin and admin_token is None
        Console(stderr=True).print(
            f"[yellow]warning:[/yellow] binding {host}: anyone who can reach this port can run the model"
            + (" and load/unload adapters (see --admin-token, --no-admin)" if unguarded else "") + "."
        )
    for root in adapter_root:
        if not root.is_dir():
            raise typer.BadParameter(f"--adapter-root {root} is not a directory.")
    if ray and max_resident is not None:
        fail("--max-resident is not available with --ray (every replica holds every adapter); drop one of them.")


def _check_quantize(quantize: str | None) -> None:
    """One line, before anything loads, when --quantize cannot work here."""
    if quantize is None:
        return
    # deferred: reading the quantization options loads torch and transformers; --help needs only the options
    from bitfit_peft.compat.quantized import quantization_config

    try:
        quantization_config(quantize)
    except BitFitError as err:
        fail(str(err))


def _local_engine(base: str, pairs: list[tuple[str, str]], *, allow_hub: bool, allow_base_mismatch: bool,
                  pin: bool = False, **engine_options: Any) -> Any:
    """The engine with every ``--adapter`` loaded (one line per adapter on stderr); any error exits with code 2."""
    # deferred: serving loads torch and transformers; --help needs only the options
    from bitfit_peft.serving import EngineError, MultiTaskEngine

    err = Console(stderr=True)
    try:
        engine = MultiTaskEngine(base, **engine_options)
        for name, source in pairs:
            try:
                info = engine.add_adapter(name, source, allow_hub=allow_hub, allow_base_mismatch=allow_base_mismatch,
                                          pin=pin)
            except (EngineError, ValueError, OSError) as exc:
                text = with_flag_hint(exc)
                fail(text if repr(name) in text else f"adapter {name!r}: {text}")
            labels = f" labels={info.labels}" if info.labels else ""
            err.print(
                f"loaded [bold]{name}[/bold] ({info.kind}{labels}): {info.delta_params} bias params, "
                f"{info.total_bytes / 1024:.1f} KiB"
            )
    except (EngineError, ValueError, OSError) as exc:
        fail(exc)
    return engine


def _serve_ray(base: str, pairs: list[tuple[str, str]], *, host: str, port: int, ray_address: str | None,
               cpus_per_replica: float, **options: Any) -> None:
    """``serve --ray``: run :func:`bitfit_peft.serving.ray_serve.build_app` until interrupted."""
    try:
        import ray
        from ray import serve
    except ImportError:
        fail('--ray needs Ray Serve: pip install "bitfit-peft[ray]"')
    # deferred: Ray is an optional extra (checked just above)
    from bitfit_peft.serving.ray_serve import build_app

    app = build_app(base, pairs, ray_actor_options={"num_cpus": cpus_per_replica}, **options)
    ray.init(address=ray_address, include_dashboard=False, dashboard_host="127.0.0.1")
    Console(stderr=True).print(
        f"Ray Serve HTTP listens on {host}:{port}. Ray's own servers (GCS, raylet, object manager, workers, agents; "
        "about 20 ports with one replica, more per replica) listen on all interfaces whatever --host says (Ray has "
        "no loopback-only mode); this Ray requires its cluster token (RAY_AUTH_MODE). Firewall every port but the "
        "HTTP one (docs/security.md#ray).")
    signal.signal(signal.SIGTERM, _interrupt)  # a clean stop: Serve and Ray shut down, no C++ stack dump
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(app, name="bitfit-peft", route_prefix="/", blocking=True)
    except RuntimeError as exc:  # a replica failed to start (its traceback is in the Ray logs above)
        fail(f"the Ray Serve application did not start: {str(exc).splitlines()[0]}")
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def register(typer_app: typer.Typer) -> None:
    """Add the ``serve`` command to a typer app."""
    typer_app.command("serve", cls=SwitchCommand)(serve_command)


register(app)
