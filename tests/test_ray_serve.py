"""The Ray Serve deployment (issue 12, point 1) on a local Ray instance: 2 CPU replicas, a tiny BERT, 3 adapters.

Answers equal the direct engine call (mixed-task batch in one request), a hot load reaches every replica (also one
recorded elsewhere and not yet pushed: loaded on the first request that needs it), an unload too, and a replica
killed under traffic loses no request (200, or 503 + Retry-After) and is replaced with every adapter.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

ray = pytest.importorskip("ray")
from conftest import save_tiny_model  # noqa: E402
from ray import serve  # noqa: E402
from test_serving import _free_port, _save_adapter  # noqa: E402

from bitfit_peft.serving import MultiTaskEngine  # noqa: E402
from bitfit_peft.serving.ray_serve import build_app  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]
TOKEN = "ray-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
APP = "bitfit-test"
TOL = 1e-5
INPUTS = [{"task": "a", "text": "what a lovely film"}, {"task": "b", "text": "win a free cruise now"},
          {"task": "a", "text": "the plot", "text_pair": "was thin"}, {"task": "__base__", "text": "ok then"},
          {"task": "b", "text": "call me back later"}]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ray")
    base = save_tiny_model(tmp / "base", "bert", task="base")
    root = tmp / "adapters"
    root.mkdir()
    for i, (name, labels) in enumerate({"a": 2, "b": 3, "c": 4, "d": 2}.items()):
        _save_adapter(base, root / name, num_labels=labels, seed=i + 1)
    return {"base": base, "root": root}


@pytest.fixture(scope="module")
def reference(world: dict[str, Path]) -> MultiTaskEngine:
    torch.manual_seed(0)  # as the replicas do: the base checkpoint has no classifier, '__base__' gets a seeded one
    eng = MultiTaskEngine(str(world["base"]), task_type="SEQ_CLS", device="cpu", dtype="float32")
    for name in "abcd":
        eng.add_adapter(name, world["root"] / name)
    return eng


@pytest.fixture(scope="module")
def url(world: dict[str, Path]) -> Iterator[str]:
    os.environ["RAY_DEDUP_LOGS"] = "0"
    env = {"env_vars": {"OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=env, logging_level="WARNING")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(
        str(world["base"]), {"a": str(world["root"] / "a"), "b": str(world["root"] / "b")}, task_type="SEQ_CLS",
        replicas=2, max_batch_size=16, batch_wait_timeout_s=0.01, adapter_roots=[world["root"]],
        admin_token=TOKEN, device="cpu", dtype="float32", torch_threads=1, sync_interval_s=60.0,
        ray_actor_options={"num_cpus": 1}, replica_options={"health_check_period_s": 1.0},
    )
    with served(app, port) as base_url:
        yield base_url


@contextmanager
def served(app: Any, port: int, name: str = APP) -> Iterator[str]:
    """Run ``app`` as the Serve application ``name`` on ``port``; Serve and Ray are shut down afterwards."""
    serve.run(app, name=name, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _replicas(client: httpx.Client) -> list[dict[str, Any]]:
    resp = client.get("/v1/stats")
    assert resp.status_code == 200, resp.text
    return resp.json()["replicas"]


def _assert_matches(results: list[dict[str, Any]], inputs: list[dict[str, str]], ref: MultiTaskEngine) -> None:
    expected = ref.predict([(i["task"], i["text"], i.get("text_pair")) for i in inputs])
    for got, want in zip(results, expected, strict=True):
        want = want.to_dict()
        assert got["task"] == want["task"] and got.get("label") == want.get("label")
        for key in ("probabilities", "embedding"):
            if key in want:
                vals = want[key].values() if isinstance(want[key], dict) else want[key]
                gots = got[key].values() if isinstance(got[key], dict) else got[key]
                assert max(abs(x - y) for x, y in zip(gots, vals, strict=True)) <= TOL


def test_mixed_batch_answers_equal_the_engine(url: str, reference: MultiTaskEngine) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        resp = client.post("/v1/predict", json={"inputs": INPUTS})
        assert resp.status_code == 200, resp.text
        _assert_matches(resp.json()["results"], INPUTS, reference)
        replicas = _replicas(client)
        assert len(replicas) == 2 and all(sorted(r["adapters"]) == ["a", "b"] for r in replicas)
        assert sum(r["mixed_task_batches"] for r in replicas) >= 1  # the 5 inputs shared a forward
        assert client.post("/v1/predict", json={"task": "zzz", "text": "x"}).status_code == 404
        bad = client.post("/v1/predict", content=b'{"task":"a","text":"\\ud800"}',
                          headers={"content-type": "application/json"})
        assert bad.status_code == 422 and "surrogate" in bad.json()["detail"]


def test_hot_load_and_unload_reach_every_replica(url: str, reference: MultiTaskEngine) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/v1/adapters", json={"name": "c", "path": "c"}).status_code == 401
        resp = client.post("/v1/adapters", json={"name": "c", "path": "c"}, headers=AUTH)
        assert resp.status_code == 201, resp.text
        assert client.post("/v1/adapters", json={"name": "c", "path": "c"}, headers=AUTH).status_code == 409
        assert all("c" in r["adapters"] for r in _replicas(client))  # pushed to both, before any request
        inputs = [{"task": "c", "text": "topic four"}, {"task": "a", "text": "fine"}]
        for _ in range(8):
            resp = client.post("/v1/predict", json={"inputs": inputs})
            assert resp.status_code == 200, resp.text
            _assert_matches(resp.json()["results"], inputs, reference)
        assert client.delete("/v1/adapters/c", headers=AUTH).status_code == 200
        assert all("c" not in r["adapters"] for r in _replicas(client))
        assert client.post("/v1/predict", json={"task": "c", "text": "x"}).status_code == 404
        assert client.delete("/v1/adapters/c", headers=AUTH).status_code == 404


def test_adapter_recorded_elsewhere_is_loaded_on_demand(url: str, world: dict[str, Path],
                                                        reference: MultiTaskEngine) -> None:
    """An adapter in the registry that no replica holds yet (its push not arrived): every replica answers."""
    registry = serve.get_deployment_handle("AdapterRegistry", app_name=APP)
    spec = {"name": "d", "source": str(world["root"] / "d"), "hub": False, "revision": None, "label_names": None,
            "confined": True, "allow_base_mismatch": False}
    assert registry.add.remote(spec).result() is not None
    with httpx.Client(base_url=url, timeout=60) as client:
        assert all("d" not in r["adapters"] for r in _replicas(client))
        holders: set[str] = set()
        for _ in range(40):
            resp = client.post("/v1/predict", json={"task": "d", "text": "on demand"})
            assert resp.status_code == 200, resp.text
            _assert_matches(resp.json()["results"], [{"task": "d", "text": "on demand"}], reference)
            holders = {r["replica"] for r in _replicas(client) if "d" in r["adapters"]}
            if len(holders) == 2:
                break
        assert len(holders) == 2
        assert client.delete("/v1/adapters/d", headers=AUTH).status_code == 200


def test_killed_replica_loses_no_request(url: str, reference: MultiTaskEngine) -> None:
    answers: list[tuple[int, str | None]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    heavy = [{"task": t, "text": f"request {i} " + "long text " * 40} for i, t in enumerate("ab" * 24)]

    def fire() -> None:  # requests of 48 long inputs: the kill lands while some are being computed
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                try:
                    resp = client.post("/v1/predict", json={"inputs": heavy})
                    answers.append((resp.status_code, resp.headers.get("retry-after")))
                    if resp.status_code == 200:
                        _assert_matches(resp.json()["results"], heavy, reference)
                except BaseException as err:  # noqa: BLE001 - collected and asserted below
                    errors.append(err)

    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/v1/adapters", json={"name": "c", "path": "c"}, headers=AUTH).status_code == 201
        victim = _replicas(client)[0]
        threads = [threading.Thread(target=fire) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 30
            while not any(r["replica"] == victim["replica"] and r["ongoing_requests"] for r in _replicas(client)):
                assert time.monotonic() < deadline, "the victim never had a request in flight"
            ray.kill(ray.get_actor(victim["actor"], namespace="serve"), no_restart=True)  # Serve's namespace
            time.sleep(3.0)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        failures = client.get("/v1/stats").json()["replica_failures"]
        print(f"\nkill: {failures} replica failures retried; {len(answers)} answers, " + ", ".join(
            f"{code}: {sum(1 for s, _ in answers if s == code)}" for code in sorted({s for s, _ in answers})))
        assert not errors, errors[:3]
        assert failures >= 1  # the kill hit requests in flight, and they were retried on the other replica
        assert answers and all(s == 200 or (s == 503 and ra) for s, ra in answers), answers
        deadline = time.monotonic() + 90
        while True:
            replicas = _replicas(client)
            ids = {r["replica"] for r in replicas}
            if len(replicas) == 2 and victim["replica"] not in ids and all(
                    sorted(r["adapters"]) == ["a", "b", "c"] for r in replicas):
                break
            assert time.monotonic() < deadline, replicas
            time.sleep(1.0)
        for _ in range(6):
            resp = client.post("/v1/predict", json={"inputs": INPUTS + [{"task": "c", "text": "again"}]})
            assert resp.status_code == 200, resp.text
