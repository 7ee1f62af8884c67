"""Ray held to the plain server's bar (issue 30, point 6): the same budgets, error bodies and probes, a registry
that converges, and a clean stop.

* ``bitfit-peft serve --ray`` stops on SIGTERM with exit code 0 and no C++ stack dump; ``/livez`` and ``/readyz``
  are separate (runs first: its own cluster, before this module's);
* an over-budget request is 413 naming the limit, before any engine work on a replica;
* error bodies through Ray are one line naming the adapter and the problem, never a traceback or a server path
  (also when a replica itself raises);
* an adapter whose folder breaks after it was registered gets the same answer from every replica once one of them
  restarts and cannot load it (no flapping between 200 and 404);
* ``/readyz`` is 503 while no replica serves, ``/livez`` stays 200.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ray = pytest.importorskip("ray")
from conftest import save_tiny_model  # noqa: E402
from ray import serve  # noqa: E402
from test_ray_serve import _replicas, served  # noqa: E402
from test_serving import _free_port, _save_adapter  # noqa: E402
from test_tenant_isolation import _reshape_head  # noqa: E402

from bitfit_peft.serving.limits import Limits  # noqa: E402
from bitfit_peft.serving.ray_serve import BitFitIngress, build_app  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]
APP = "bitfit-tenants"
TOKEN = "ray-tenant-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LONG = "lorem ipsum dolor sit amet " * 40
DUMPS = ("*** SIGTERM received", "Stack trace", "core dumped", "terminate called", "*** Aborted", "Segmentation")
SRC, TESTS = Path(__file__).resolve().parents[1] / "src", Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ray_tenants")
    base = save_tiny_model(tmp / "base", "bert", task="base")
    root = tmp / "adapters"
    root.mkdir()
    paths = {"tmp": tmp, "base": base, "root": root}
    for i, name in enumerate(("a", "b", "victim", "healer")):
        paths[name] = _save_adapter(base, root / name, seed=i + 1)
    paths["inner"] = _reshape_head(_save_adapter(base, root / "inner", seed=7), (2, 40))
    broken = root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "BITFIT", "task_type": "SEQ_CLS"}')
    (broken / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    return paths


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "RAY_DEDUP_LOGS": "0"}


def _probe(url: str) -> tuple[int | None, bool]:
    """(status or None when nothing answers, whether our app answered: Serve's proxy may answer before it)."""
    try:
        resp = httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None, False
    try:
        body = resp.json()
    except ValueError:
        return resp.status_code, False
    return resp.status_code, isinstance(body, dict) and ("ready" in body or body.get("status") == "alive")


# ---------------------------------------------------------------------------------------------------- the CLI
def test_serve_ray_stops_cleanly_on_sigterm(world: dict[str, Path]) -> None:
    """Runs before this module's cluster starts (the CLI starts its own)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "bitfit_peft.cli", "serve", "--ray", "--base", str(world["base"]),
           "--adapter", f"a={world['a']}", "--task-type", "SEQ_CLS", "--replicas", "1", "--port", str(port),
           "--device", "cpu", "--dtype", "float32", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    seen: list[tuple[tuple[int | None, bool], tuple[int | None, bool]]] = []
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            live, ready = _probe(f"{url}/livez"), _probe(f"{url}/readyz")
            seen.append((live, ready))
            if ready == (200, True):
                break
            assert time.monotonic() < deadline, seen[-5:]
            time.sleep(0.5)
        assert httpx.post(f"{url}/v1/predict", json={"task": "a", "text": "hi"}, timeout=60).status_code == 200
        assert httpx.get(f"{url}/livez", timeout=10).json() == {"status": "alive"}
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        stop_s = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    print(f"\nserve --ray: ready after {len(seen)} probes; SIGTERM -> exit {proc.returncode} in {stop_s:.1f} s")
    assert proc.returncode == 0, err[-3000:]
    assert not [d for d in DUMPS if d in err], err[-3000:]
    assert f"HTTP listens on 127.0.0.1:{port}" in " ".join(err.split())  # the start-up log says what listens where
    ours = [(live, ready) for live, ready in seen[:-1] if ready[1]]  # our app answered, not yet ready
    assert all(ready[0] == 503 and live == (200, True) for live, ready in ours), seen  # not ready, but alive
    assert _probe(f"{url}/livez") == (None, False)  # the port is closed: nothing was left running


# ---------------------------------------------------------------------------------------------------- the cluster
@pytest.fixture(scope="module")
def url(world: dict[str, Path]) -> Iterator[str]:
    env = _env()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {k: env[k] for k in ("PYTHONPATH", "OMP_NUM_THREADS", "RAY_DEDUP_LOGS")}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    adapters = {name: str(world[name]) for name in ("a", "b", "victim")}
    app = build_app(
        str(world["base"]), adapters, task_type="SEQ_CLS", replicas=2, max_batch_size=16, batch_wait_timeout_s=0.01,
        adapter_roots=[world["root"]], admin_token=TOKEN, device="cpu", dtype="float32", max_length=64,
        torch_threads=1, sync_interval_s=1.0, ray_actor_options={"num_cpus": 1},
        replica_options={"health_check_period_s": 1.0}, limits=Limits(max_request_tokens=256),
    )
    with served(app, port, APP) as base_url:
        yield base_url


def _one_line(body: str, *forbidden: str) -> str:
    detail = httpx.Response(200, content=body).json()
    text = detail["detail"] if "detail" in detail else detail["error"]["message"]
    assert "\n" not in text and "Traceback" not in text and len(text) < 400, text
    assert all(f not in body for f in forbidden), body
    return text


def test_over_budget_request_is_413_before_any_engine_work(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        items = sum(r["items"] for r in _replicas(client))
        resp = client.post("/v1/predict", json={"inputs": [{"task": "a", "text": LONG}] * 16})
        assert resp.status_code == 413 and resp.json()["error"] == "over_budget", resp.text
        assert "max_request_tokens" in resp.json()["detail"] and "256" in resp.json()["detail"]
        assert sum(r["items"] for r in _replicas(client)) == items  # refused before any engine batch
        emb = client.post("/classify", json={"model": "a", "input": [LONG] * 16})
        assert emb.status_code == 413 and "max_request_tokens" in emb.json()["error"]["message"], emb.text
        ok = client.post("/v1/predict", json={"inputs": [{"task": "a", "text": LONG}] * 2})
        assert ok.status_code == 200, ok.text


def test_error_bodies_through_ray_are_one_line_without_paths(url: str, world: dict[str, Path]) -> None:
    root = str(world["tmp"])
    with httpx.Client(base_url=url, timeout=60) as client:
        for name in ("broken", "inner"):
            resp = client.post("/v1/adapters", json={"name": name, "path": name}, headers=AUTH)
            assert 400 <= resp.status_code < 500, resp.text
            assert repr(name) in _one_line(resp.text, root, "/tmp/")
        outside = client.post("/v1/adapters", json={"name": "x", "path": str(world["base"])}, headers=AUTH)
        assert outside.status_code == 403 and _one_line(outside.text, root, "/tmp/")
        assert all(sorted(r["adapters"]) == ["a", "b", "victim"] for r in _replicas(client))


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ExplodingReplica:
    """A replica whose request method raises (not the engine's refusal): its traceback names server paths."""

    async def handle(self, kind: str, settings: tuple, payloads: list[tuple]) -> Any:
        raise RuntimeError("could not open /srv/secret/adapters/a/adapter_model.safetensors\n  File \"/srv/x.py\"")

    async def state(self, sync: bool = False) -> dict[str, Any]:
        return {"replica": "x", "adapters": ["a"]}


def test_a_replica_that_raises_is_a_one_line_500(url: str) -> None:
    settings = {"task_type": "SEQ_CLS", "base_name": "base", "admin": False, "admin_token": None,
                "request_retries": 0, "limits": Limits(max_inputs_per_request=8, max_new_tokens_limit=8),
                "api_options": None, "max_batch_size": 8}
    serve.run(BitFitIngress.bind(ExplodingReplica.bind(), settings), name="exploding", route_prefix="/exploding")
    try:
        with httpx.Client(base_url=f"{url}/exploding", timeout=60) as client:
            resp = client.post("/v1/predict", json={"task": "a", "text": "hi"})
            assert resp.status_code == 500, resp.text
            assert "RuntimeError" in _one_line(resp.text, "/srv/", "x.py")
            oai = client.post("/classify", json={"model": "a", "input": "hi"})
            assert oai.status_code == 500 and "RuntimeError" in _one_line(oai.text, "/srv/", "x.py"), oai.text
    finally:
        serve.delete("exploding")


def test_every_replica_converges_on_an_adapter_whose_folder_broke(url: str, world: dict[str, Path]) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(6):
            assert client.post("/v1/predict", json={"task": "victim", "text": "hi"}).status_code == 200
        weights = world["victim"] / "adapter_model.safetensors"
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")  # the folder breaks after the load
        victim = _replicas(client)[0]
        ray.kill(ray.get_actor(victim["actor"], namespace="serve"), no_restart=True)  # it restarts from disk
        deadline = time.monotonic() + 120
        while True:
            replicas = _replicas(client)
            if len(replicas) == 2 and victim["replica"] not in {r["replica"] for r in replicas}:
                break
            assert time.monotonic() < deadline, replicas
            time.sleep(1.0)
        time.sleep(2.5)  # sync_interval_s=1: every replica has caught up with the registry
        answers = [client.post("/v1/predict", json={"task": "victim", "text": "hi"}) for _ in range(30)]
        statuses = [r.status_code for r in answers]
        print(f"\nconvergence: {statuses.count(404)}/30 answers 404 after the restart")
        assert set(statuses) == {404}, statuses  # no flapping between 200 and 404
        assert len({r.text for r in answers}) == 1
        assert "'victim'" in _one_line(answers[0].text, str(world["tmp"]))
        replicas = sorted(_replicas(client), key=lambda r: r["replica"])
        assert all(sorted(r["adapters"]) == ["a", "b"] for r in replicas), replicas
        assert any(r["failed_adapters"] for r in replicas)  # the restarted one said why
        both = [{"task": "a", "text": "still"}, {"task": "b", "text": "served"}]
        assert all(client.post("/v1/predict", json={"inputs": both}).status_code == 200 for _ in range(6))


def test_readyz_is_503_while_no_replica_serves_and_livez_stays_200(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/readyz").status_code == 200
        for replica in _replicas(client):
            ray.kill(ray.get_actor(replica["actor"], namespace="serve"), no_restart=True)
        seen: list[tuple[int, int, str | None]] = []
        deadline = time.monotonic() + 180
        while not seen or seen[-1][1] != 200:
            assert time.monotonic() < deadline, seen[-5:]
            ready = client.get("/readyz")
            seen.append((client.get("/livez").status_code, ready.status_code, ready.headers.get("retry-after")))
            time.sleep(0.25)
        print(f"\nreadiness: {sum(1 for s in seen if s[1] == 503)} probes 503 while the replicas restarted")
        assert all(live == 200 for live, _, _ in seen), seen
        assert any(r == 503 and after for _, r, after in seen), seen  # not ready while no replica serves
        assert all(r in (200, 503) for _, r, _ in seen), seen
        assert client.post("/v1/predict", json={"task": "a", "text": "back"}).status_code == 200
