"""Many tenants on one base (issue 30): no request or adapter of one tenant can stall, fail or see another's.

* work is bounded in tokens: inputs truncated while tokenizing, outside the lock, costed before any work (413);
* a failing adapter fails only its own requests; a head that cannot run (or is huge) is refused at load;
* ``max_resident`` serves batches over more adapters in rounds; pinned adapters stay; loads on demand are bounded;
* error bodies carry no server path; reserved names are refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import HIDDEN, save_tiny_model
from safetensors import safe_open
from test_serving import LiveServer, _save_adapter

from bitfit_peft.serving import EngineError, MultiTaskEngine, create_app
from bitfit_peft.serving.batching import DynamicBatcher
from bitfit_peft.serving.limits import BudgetError, Limits

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LONG = "lorem ipsum dolor sit amet " * 700  # 18,900 characters (the schema allows 20,000)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("tenants")
    base = save_tiny_model(tmp / "base", "bert", task="base")
    root = tmp / "root"
    root.mkdir()
    paths = {"tmp": tmp, "base": base, "root": root}
    for i in range(6):
        paths[f"t{i}"] = _save_adapter(base, root / f"t{i}", seed=10 + i)
    paths["inner"] = _reshape_head(_save_adapter(base, root / "inner", seed=3), (2, HIDDEN + 8))
    paths["huge"] = _sparse_huge_head(_save_adapter(base, root / "huge", seed=4), 2_000_000)
    broken = root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "BITFIT", "task_type": "SEQ_CLS"}))
    (broken / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    return paths


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def _reshape_head(folder: Path, shape: tuple[int, int]) -> Path:
    """The adapter's head with another inner shape (the hidden size it reads)."""
    from safetensors.torch import save_file

    tensors = _tensors(folder)
    tensors["base_model.model.classifier.weight"] = torch.randn(shape)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _sparse_huge_head(folder: Path, labels: int) -> Path:
    """A ~2 KB sparse safetensors file declaring a ``labels``-label head (the deltas are real)."""
    deltas = {k: v.float().contiguous() for k, v in _tensors(folder).items() if "classifier" not in k}
    header: dict[str, Any] = {}
    offset, blobs = 0, []
    for key, tensor in deltas.items():
        data = tensor.numpy().tobytes()
        header[key] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    for key, shape in (("base_model.model.classifier.weight", [labels, HIDDEN]),
                       ("base_model.model.classifier.bias", [labels])):
        size = 4 * int(torch.Size(shape).numel())
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = folder / "adapter_model.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
        fh.truncate(8 + len(raw) + offset)  # a hole: the file declares ~264 MB and holds ~2 KB
    return folder


@pytest.fixture(scope="module")
def engine(world: dict[str, Path]) -> MultiTaskEngine:
    eng = MultiTaskEngine(str(world["base"]), task_type="SEQ_CLS", device="cpu", dtype="float32",
                          limits=Limits(max_request_tokens=2048, max_batch_tokens=1024, max_labels=64))
    for i in range(3):
        eng.add_adapter(f"t{i}", world[f"t{i}"])
    return eng


@pytest.fixture(scope="module")
def live(engine: MultiTaskEngine, world: dict[str, Path]) -> Iterator[LiveServer]:
    with LiveServer(create_app(engine, max_wait_ms=20, adapter_roots=[world["root"]])) as server:
        yield server


# ---------------------------------------------------------------------------------------------------- A: budgets
def test_pairs_are_truncated_while_tokenizing_and_costed(engine: MultiTaskEngine) -> None:
    items = engine.inference.encode([("t0", LONG, LONG), ("t1", LONG), ("t2", "short")])
    assert [len(it.features["input_ids"]) for it in items[:2]] == [engine.max_length] * 2
    assert [it.cost for it in items] == [len(it.features["input_ids"]) for it in items]
    assert items[2].cost < 10


def test_tokenizing_does_not_take_the_engine_lock(engine: MultiTaskEngine) -> None:
    done = threading.Event()
    with engine.lock:  # a batch holds the engine
        worker = threading.Thread(target=lambda: (engine.inference.encode([("t0", LONG, LONG)] * 64), done.set()))
        worker.start()
        assert done.wait(30), "tokenizing waited for the engine lock"
    worker.join()


def test_over_budget_predict_is_413_before_any_work(live: LiveServer, engine: MultiTaskEngine) -> None:
    body = {"inputs": [{"task": "t0", "text": LONG, "text_pair": LONG}] * 256}
    started = time.monotonic()
    resp = httpx.post(f"{live.url}/v1/predict", json=body, timeout=60)
    assert resp.status_code == 413 and resp.json()["error"] == "over_budget", resp.text[:300]
    assert "max_request_tokens" in resp.json()["detail"] and "2,048" in resp.json()["detail"]
    assert time.monotonic() - started < 5
    ok = httpx.post(f"{live.url}/v1/predict", json={"inputs": [{"task": "t1", "text": LONG}] * 8}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["results"]) == 8


def test_over_budget_generate_is_413(tmp_path: Path) -> None:
    base = save_tiny_model(tmp_path / "gpt2", "gpt2", task="causal_lm")
    eng = MultiTaskEngine(str(base), task_type="CAUSAL_LM", device="cpu")
    eng.add_adapter("g", _save_adapter(base, tmp_path / "g", task_type="CAUSAL_LM", seed=1))
    with LiveServer(create_app(eng, max_wait_ms=5)) as live:
        body = {"inputs": [{"task": "g", "prompt": "hello"}] * 16, "num_beams": 8, "num_return_sequences": 8,
                "max_new_tokens": 512}
        started = time.monotonic()
        resp = httpx.post(f"{live.url}/v1/generate", json=body, timeout=60)
        assert resp.status_code == 413 and "max_request_generate_cost" in resp.json()["detail"]
        assert time.monotonic() - started < 5
        small = httpx.post(f"{live.url}/v1/generate", json={"task": "g", "prompt": "hi", "max_new_tokens": 4},
                           timeout=60)
        assert small.status_code == 200


def test_limits_refuse_bad_values() -> None:
    with pytest.raises(EngineError, match="max_batch_tokens"):
        Limits(max_batch_tokens=0)
    Limits(max_batch_tokens=100).check_request("predict", [101])  # one input (<= max_length) may always run alone
    with pytest.raises(BudgetError, match="max_batch_generate_cost"):
        Limits(max_batch_generate_cost=100).check_request("generate", [101])


def test_batches_stay_within_the_cost_budget_and_small_requests_are_not_starved() -> None:
    seen: list[list[int]] = []

    def runner(_key: Any, payloads: list[int]) -> list[int]:
        seen.append(list(payloads))
        return payloads

    async def scenario() -> list[int]:
        batcher = DynamicBatcher(runner, max_batch_size=32, max_wait_ms=1, cost_of=lambda p: p,
                                 budget_of=lambda _: 1024)
        await batcher.start()
        big = asyncio.create_task(batcher.submit("k", [500] * 40))  # one hostile request: 40 long inputs
        await asyncio.sleep(0)
        small = [asyncio.create_task(batcher.submit("k", [10])) for _ in range(8)]
        await asyncio.gather(big, *small)
        await batcher.stop()
        return [next(i for i, b in enumerate(seen) if 10 in b)]

    first_small = asyncio.run(scenario())[0]
    assert all(len(b) * max(b) <= 1024 for b in seen)
    assert first_small <= 1  # served in the first or second batch, not after the 20 batches of the big request


# ---------------------------------------------------------------------------------------------------- B: isolation
def test_heads_that_cannot_run_or_are_too_big_are_refused_at_load(engine: MultiTaskEngine,
                                                                  world: dict[str, Path]) -> None:
    before = sorted(engine.tasks())
    with pytest.raises(EngineError, match=r"'inner'.*shape \[2, 40\].*needs \[2, 32\]"):
        engine.add_adapter("inner", world["inner"])
    started = time.monotonic()
    with pytest.raises(EngineError, match=r"'huge'.*2,000,000 labels.*max_labels"):
        engine.add_adapter("huge", world["huge"])
    assert time.monotonic() - started < 5
    assert os.stat(world["huge"] / "adapter_model.safetensors").st_blocks * 512 < 64 << 10  # still sparse
    assert sorted(engine.tasks()) == before
    fresh = MultiTaskEngine(str(world["base"]), task_type="SEQ_CLS", device="cpu")  # PEFT's path (first load)
    with pytest.raises(EngineError, match="'inner'"):
        fresh.add_adapter("inner", world["inner"])
    with pytest.raises(EngineError, match="max_head_bytes"):
        MultiTaskEngine(str(world["base"]), task_type="SEQ_CLS", device="cpu",
                        limits=Limits(max_head_bytes=64)).add_adapter("t0", world["t0"])


def test_a_bin_adapters_head_is_checked_before_commit(engine: MultiTaskEngine, world: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """PEFT's ``adapter_model.bin`` fallback: its head is held to the same shape and label caps."""
    for name, head in (("bin_inner", (2, HIDDEN + 8)), ("bin_many", (65, HIDDEN))):  # the engine's max_labels: 64
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text((world["t0"] / "adapter_config.json").read_text())
        tensors = _tensors(world["t0"])
        tensors["base_model.model.classifier.weight"] = torch.randn(head)
        if name == "bin_many":
            tensors["base_model.model.classifier.bias"] = torch.zeros(head[0])
        torch.save(tensors, folder / "adapter_model.bin")
        with pytest.raises(EngineError, match=r"needs \[2, 32\]" if name == "bin_inner" else "65 labels.*max_labels"):
            engine.add_adapter(name, folder)
        assert name not in engine.tasks()


def test_a_failing_adapter_fails_only_its_own_requests(world: dict[str, Path]) -> None:
    eng = MultiTaskEngine(str(world["base"]), task_type="SEQ_CLS", device="cpu")
    for i in range(4):
        eng.add_adapter(f"t{i}", world[f"t{i}"])
    internal = eng.registry.get("t3").internal  # its head breaks after the load (a fault inside the model)
    wrapper = eng.registry.get("t3").layout.wrappers[0]
    wrapper.modules_to_save[internal].weight = torch.nn.Parameter(torch.zeros(2, HIDDEN + 3))
    with LiveServer(create_app(eng, max_wait_ms=50)) as live:
        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
                return await asyncio.gather(*(client.post("/v1/predict", json={"task": f"t{i % 4}", "text": "hi"})
                                              for i in range(20)))

        responses = asyncio.run(fire())
    for i, resp in enumerate(responses):
        if i % 4 == 3:
            assert resp.status_code == 500 and "'t3'" in resp.json()["detail"], resp.text
        else:
            assert resp.status_code == 200, resp.text


# ---------------------------------------------------------------------------------------------------- C: residency
def test_max_resident_serves_batches_over_more_adapters_in_rounds(world: dict[str, Path]) -> None:
    eng = MultiTaskEngine(str(world["base"]), task_type="SEQ_CLS", device="cpu", max_resident=2,
                          adapter_roots=[world["root"]])
    eng.add_adapter("t0", world["t0"], pin=True)
    with LiveServer(create_app(eng, max_wait_ms=50, adapter_roots=[world["root"]])) as live:
        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
                names = [f"t{i % 6}" for i in range(24)] + ["broken"] * 2
                return await asyncio.gather(*(client.post("/v1/predict", json={"task": n, "text": "hi"})
                                              for n in names))

        responses = asyncio.run(fire())
    assert [r.status_code for r in responses[:24]] == [200] * 24, [r.text for r in responses if r.status_code != 200]
    assert all(400 <= r.status_code < 500 for r in responses[24:]), [r.text for r in responses[24:]]
    assert all(str(world["root"]) not in r.text for r in responses)
    assert "t0" in eng.tasks() and len([t for t in eng.tasks() if t != "t0"]) <= 2  # pinned, never evicted


def test_a_slow_load_on_demand_is_time_bounded(world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    eng = MultiTaskEngine(str(world["base"]), task_type="SEQ_CLS", device="cpu", max_resident=2,
                          adapter_roots=[world["root"]], limits=Limits(load_timeout_s=0.5))
    preparer = eng.registry._preparer
    prepare = preparer.prepare

    def slow(name: str, request: Any) -> Any:  # a folder that takes 3 s to read (a slow disk, a huge file)
        if name == "t4":
            time.sleep(3)
        return prepare(name, request)

    monkeypatch.setattr(preparer, "prepare", slow)
    started = time.monotonic()
    with pytest.raises(EngineError, match=r"'t4'.*load_timeout_s"):
        eng.predict([("t4", "hi")])
    assert time.monotonic() - started < 2.5
    assert eng.predict([("t1", "hi")])[0].task == "t1"  # the engine was not held
    time.sleep(3)
    assert "t4" not in eng.tasks()  # the late result was dropped, nothing committed


def test_loading_on_demand_follows_the_admin_policy(tmp_path: Path) -> None:
    from bitfit_peft.cli.serve import on_demand_roots

    roots = [tmp_path]
    assert on_demand_roots(roots, 2, "auto", False, None) == roots  # an open server: as before
    assert on_demand_roots(roots, 2, "auto", True, None) == []  # --no-admin: clients load nothing
    assert on_demand_roots(roots, 2, "auto", False, "token") == []  # --admin-token: only the admin loads
    assert on_demand_roots(roots, 2, "on", False, "token") == roots  # the operator's explicit choice
    assert on_demand_roots(roots, None, "auto", False, None) == []


def test_serve_limit_flags() -> None:
    import typer

    from bitfit_peft.cli.serve import parse_limits

    limits = parse_limits(["max_batch_tokens=2048", "load_timeout_s=2.5"])
    assert (limits.max_batch_tokens, limits.load_timeout_s, limits.max_labels) == (2048, 2.5, Limits().max_labels)
    for bad in (["nope=1"], ["max_labels=x"], ["max_labels=0"]):
        with pytest.raises(typer.Exit):
            parse_limits(bad)


# ---------------------------------------------------------------------------------------------------- D: leaks
def test_error_bodies_carry_no_server_paths(live: LiveServer, world: dict[str, Path]) -> None:
    resp = httpx.post(f"{live.url}/v1/adapters", json={"name": "broken", "path": "broken"}, timeout=60)
    assert 400 <= resp.status_code < 500
    assert "'broken'" in resp.json()["detail"] and str(world["tmp"]) not in resp.text and "/tmp/" not in resp.text


def test_the_reserved_base_name_is_refused_on_every_path(world: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from bitfit_peft import BitFitConfig, BitFitError

    def fresh() -> Any:
        return AutoModelForSequenceClassification.from_pretrained(world["base"], num_labels=2)

    adapter = world["t0"]
    model = get_peft_model(fresh(), BitFitConfig(task_type="SEQ_CLS"))
    with pytest.raises(BitFitError, match="reserved"):
        model.add_adapter("__base__", BitFitConfig(task_type="SEQ_CLS"))  # PEFT's add_adapter
    with pytest.raises(BitFitError, match="reserved"):
        model.load_adapter(str(adapter), adapter_name="__base__")  # PEFT's load_adapter
    with pytest.raises(BitFitError, match="reserved"):
        PeftModel.from_pretrained(fresh(), str(adapter), adapter_name="__base__")
    with pytest.raises(BitFitError, match="reserved"):
        fresh().load_adapter(str(adapter), adapter_name="__base__")  # transformers' load_adapter
    with pytest.raises(BitFitError, match="reserved"):
        model.base_model.add_weighted_adapter(["default"], [1.0], "__base__")
    assert "__base__" not in model.peft_config
    with pytest.raises(EngineError, match="__base__"):
        MultiTaskEngine(str(world["base"]), task_type="SEQ_CLS", device="cpu").add_adapter("__base__", adapter)


# ---------------------------------------------------------------------------------------------------- F: probes
def test_liveness_and_readiness_are_separate(live: LiveServer) -> None:
    assert httpx.get(f"{live.url}/livez", timeout=10).json() == {"status": "alive"}
    ready = httpx.get(f"{live.url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["ready"] is True
