"""Load test of the HTTP server: many concurrent clients, mixed tasks, adapters hot-loaded and unloaded meanwhile.

A real uvicorn server (loopback, free port) serves a tiny BERT with several adapters (heads of 1 to 5 outputs).
For a fixed time, ``clients`` async httpx clients send single- and multi-input ``/v1/predict`` requests over the
stable tasks, ``__base__``, hot tasks (loaded and unloaded by a background task while the traffic runs) and a
task that is never loaded. Every input text carries the request's unique id, so a result delivered to the wrong
request cannot match. Checked afterwards:

* every request got exactly one answer, and no transport error;
* no 5xx; 429 only with its JSON message (the documented overload answer);
* a 200 equals what a separate reference engine computed for each ``(task, text)`` before the run (stable and
  hot tasks: a hot name always maps to the same adapter directory);
* a request naming a task that is not loaded gets 404 with a message; requests of stable tasks never get 404;
* the batcher ran every accepted input exactly once (its item count matches the answers).

Requests sent / answered, requests/s and p50/p99 latency are printed (no timing assertions).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import save_tiny_model
from test_serving import LiveServer, _save_adapter

from bitfit_peft.serving import MultiTaskEngine, create_app

TOL = 1e-5
STABLE = {"sentiment": 2, "topic": 4, "rating": 1, "spare": 3}  # loaded for the whole run
HOT = {"hot0": 2, "hot1": 3, "hot2": 5, "hot3": 1}  # loaded and unloaded during the run (two churn tasks)
GHOST = "ghost"  # never loaded
WORDS = ["what", "a", "lovely", "film", "win", "free", "cruise", "now", "the", "cat", "sat", "on", "mat", "ok",
         "call", "me", "back", "later", "spam", "great"]
OVERLOAD = (429, 503)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def load_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("server-load")
    base = save_tiny_model(tmp / "base", "bert", task="base")
    root = tmp / "adapters"
    root.mkdir()
    paths = {"base": base, "root": root}
    for seed, (name, labels) in enumerate({**STABLE, **HOT}.items(), start=10):
        paths[name] = _save_adapter(base, root / f"dir-{name}", num_labels=labels, seed=seed)
    return paths


def _engine(world: dict[str, Path], names: list[str]) -> MultiTaskEngine:
    torch.manual_seed(1234)  # the base checkpoint has no head: same seed, same random __base__ head in every engine
    eng = MultiTaskEngine(str(world["base"]), task_type="SEQ_CLS", device="cpu", dtype="float32")
    for name in names:
        eng.add_adapter(name, world[name])
    return eng


# ---------------------------------------------------------------------------------------------------- requests
@dataclass
class Spec:
    """One HTTP request: its unique id and its ``(task, text)`` inputs."""

    uid: int
    inputs: list[tuple[str, str]]

    @property
    def body(self) -> dict[str, Any]:
        if len(self.inputs) == 1:
            return {"task": self.inputs[0][0], "text": self.inputs[0][1]}
        return {"inputs": [{"task": t, "text": x} for t, x in self.inputs]}


def make_specs(n: int, seed: int = 0) -> list[Spec]:
    """Mixed traffic: 80 % single inputs (stable 70 %, base 10 %, hot 15 %, ghost 5 %), 20 % 2-4 inputs."""
    rng = random.Random(seed)
    stable = [*STABLE, "__base__"]
    specs = []
    for uid in range(n):
        if rng.random() < 0.8:
            r = rng.random()
            tasks = [rng.choice(list(STABLE)) if r < 0.7 else "__base__" if r < 0.8
                     else rng.choice(list(HOT)) if r < 0.95 else GHOST]
        else:
            tasks = [rng.choice(stable) for _ in range(rng.randint(2, 4))]
            if rng.random() < 0.25:
                tasks[rng.randrange(len(tasks))] = rng.choice([*HOT, GHOST])
        inputs = [(t, f"{' '.join(rng.choices(WORDS, k=rng.randint(1, 4)))} r{uid} i{j}")
                  for j, t in enumerate(tasks)]
        specs.append(Spec(uid, inputs))
    return specs


def expected_results(ref: MultiTaskEngine, specs: list[Spec], batch: int = 64) -> dict[tuple[str, str], dict]:
    """Reference answers of every ``(task, text)`` of ``specs`` (ghost excluded), from a separate engine."""
    pairs = [p for s in specs for p in s.inputs if p[0] != GHOST]
    out: dict[tuple[str, str], dict] = {}
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        out.update({p: r.to_dict() for p, r in zip(chunk, ref.predict(chunk), strict=True)})
    return out


def same_result(got: dict[str, Any], want: dict[str, Any]) -> bool:
    if got.keys() != want.keys() or got["task"] != want["task"] or got["kind"] != want["kind"]:
        return False
    if "value" in want:
        return abs(got["value"] - want["value"]) <= TOL
    probs = want["probabilities"]
    if got["probabilities"].keys() != probs.keys():
        return False
    if max(abs(got["probabilities"][k] - v) for k, v in probs.items()) > TOL:
        return False
    top = sorted(probs.values(), reverse=True)
    return got["label"] == want["label"] or (len(top) > 1 and top[0] - top[1] <= 2 * TOL)


# ---------------------------------------------------------------------------------------------------- driver
@dataclass
class Answer:
    status: int  # -1: transport error
    body: Any
    latency: float


@dataclass
class LoadReport:
    sent: int = 0
    answers: dict[int, list[Answer]] = field(default_factory=lambda: defaultdict(list))
    elapsed: float = 0.0
    hot_loads: int = 0
    hot_unloads: int = 0
    admin_errors: list[str] = field(default_factory=list)
    pool_exhausted: bool = False


async def _client(client: httpx.AsyncClient, pool: Iterator[Spec], end: float, report: LoadReport,
                  sent_specs: dict[int, Spec]) -> None:
    while time.monotonic() < end:
        spec = next(pool, None)
        if spec is None:
            report.pool_exhausted = True
            return
        sent_specs[spec.uid] = spec
        report.sent += 1
        started = time.perf_counter()
        try:
            resp = await client.post("/v1/predict", json=spec.body)
            answer = Answer(resp.status_code, resp.json(), time.perf_counter() - started)
        except (httpx.HTTPError, ValueError) as err:  # transport error or a non-JSON body
            answer = Answer(-1, repr(err), time.perf_counter() - started)
        report.answers[spec.uid].append(answer)
        if answer.status in OVERLOAD:
            await asyncio.sleep(0.02)


async def _churn(client: httpx.AsyncClient, end: float, report: LoadReport, loaded: set[str], names: list[str],
                 seed: int) -> None:
    """Toggle random adapters of ``names`` (POST / DELETE) until ``end``; check /v1/adapters after every change."""
    rng = random.Random(seed)
    while time.monotonic() < end:
        name = rng.choice(names)
        if name in loaded:
            resp = await client.delete(f"/v1/adapters/{name}")
            if resp.status_code == 200:
                loaded.discard(name)
                report.hot_unloads += 1
            else:
                report.admin_errors.append(f"DELETE {name}: {resp.status_code} {resp.text}")
        else:
            resp = await client.post("/v1/adapters", json={"name": name, "path": f"dir-{name}"})
            if resp.status_code == 201 and resp.json()["num_labels"] == (HOT[name] if HOT[name] > 1 else None):
                loaded.add(name)
                report.hot_loads += 1
            else:
                report.admin_errors.append(f"POST {name}: {resp.status_code} {resp.text}")
        listed = {a["name"] for a in (await client.get("/v1/adapters")).json()["adapters"]} & set(names)
        if listed != loaded & set(names):
            report.admin_errors.append(f"/v1/adapters lists {sorted(listed)} of {names}, expected {sorted(loaded)}")
        await asyncio.sleep(rng.uniform(0.0, 0.01))


async def run_load(url: str, specs: list[Spec], duration: float, clients: int) -> tuple[LoadReport, dict[int, Spec]]:
    report = LoadReport()
    sent_specs: dict[int, Spec] = {}
    pool = iter(specs)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        loaded: set[str] = set()
        started = time.monotonic()
        end = started + duration
        hot = list(HOT)
        await asyncio.gather(_churn(client, end, report, loaded, hot[::2], seed=1),
                             _churn(client, end, report, loaded, hot[1::2], seed=2),
                             *(_client(client, pool, end, report, sent_specs) for _ in range(clients)))
        report.elapsed = time.monotonic() - started
        for name in sorted(loaded):  # leave the server with its stable adapters only
            await client.delete(f"/v1/adapters/{name}")
    return report, sent_specs


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


# ---------------------------------------------------------------------------------------------------- the test
def _load_test(world: dict[str, Path], duration: float, clients: int, pool_size: int, max_queue: int) -> None:
    specs = make_specs(pool_size)
    prep = time.perf_counter()
    expected = expected_results(_engine(world, [*STABLE, *HOT]), specs)
    prep = time.perf_counter() - prep

    engine = _engine(world, list(STABLE))
    app = create_app(engine, max_batch_size=32, max_wait_ms=5, max_queue=max_queue, adapter_roots=[world["root"]])
    with LiveServer(app) as live:
        before = httpx.get(f"{live.url}/v1/stats").json()
        report, sent_specs = asyncio.run(run_load(live.url, specs, duration, clients))
        after = httpx.get(f"{live.url}/v1/stats").json()
        health = httpx.get(f"{live.url}/healthz").json()

    # exactly one answer per request, nothing lost
    assert report.sent == len(sent_specs) == len(report.answers)
    twice = [uid for uid, answers in report.answers.items() if len(answers) != 1]
    assert not twice, f"requests answered more than once: {twice[:10]}"
    answers = {uid: a[0] for uid, a in report.answers.items()}
    lost = {uid: a.body for uid, a in answers.items() if a.status == -1}
    assert not lost, f"{len(lost)} requests got no HTTP answer, e.g. {list(lost.items())[:3]}"

    statuses = Counter(a.status for a in answers.values())
    server_errors = {uid: (a.status, a.body) for uid, a in answers.items()
                     if a.status >= 500 and not (a.status in OVERLOAD and a.body.get("detail"))}
    assert not server_errors, f"{len(server_errors)} 5xx answers, e.g. {list(server_errors.values())[:3]}"
    unexpected = {uid: (a.status, a.body) for uid, a in answers.items() if a.status not in (200, 404, *OVERLOAD)}
    assert not unexpected, f"unexpected statuses: {list(unexpected.values())[:3]}"

    wrong: list[Any] = []
    items_run = 0  # inputs the batcher must have run: those of 200s and of 404s for tasks removed while queued
    for uid, answer in answers.items():
        spec = sent_specs[uid]
        tasks = {t for t, _ in spec.inputs}
        if answer.status in OVERLOAD:
            assert answer.body.get("detail") and answer.body.get("error") == "queue_full", answer.body
        elif answer.status == 404:
            assert tasks - set(STABLE) - {"__base__"}, f"404 for loaded tasks only: {spec.inputs} {answer.body}"
            assert answer.body.get("detail") and answer.body.get("error") == "unknown_task", answer.body
            if "removed before this request ran" in answer.body["detail"]:
                items_run += len(spec.inputs)
        else:
            assert GHOST not in tasks, f"a never-loaded task got 200: {spec.inputs}"
            results = answer.body["results"]
            items_run += len(spec.inputs)
            if len(results) != len(spec.inputs):
                wrong.append((spec.inputs, results))
                continue
            wrong += [(pair, got) for pair, got in zip(spec.inputs, results, strict=True)
                      if not same_result(got, expected[pair])]
    assert not wrong, f"{len(wrong)} results differ from the reference engine, e.g. {wrong[:3]}"
    assert after["items"] - before["items"] == items_run, "the batcher ran a different number of inputs"
    assert not report.admin_errors, report.admin_errors[:5]
    assert health["queue_depth"] == 0 and health["in_flight"] == 0
    assert sorted(health["adapters"]) == sorted(STABLE)
    assert report.hot_loads > 0 and report.hot_unloads > 0

    latencies = [a.latency for a in answers.values()]
    ok = [a.latency for a in answers.values() if a.status == 200]
    n_inputs = sum(len(sent_specs[uid].inputs) for uid in answers)
    batches = after["batches"] - before["batches"]
    print(
        f"\nload test: {clients} clients, {report.elapsed:.1f} s (+{prep:.1f} s reference precompute); "
        f"sent {report.sent} requests ({n_inputs} inputs), answered {len(answers)}: {dict(sorted(statuses.items()))}"
        f"{' (request pool exhausted early)' if report.pool_exhausted else ''}\n"
        f"  {len(answers) / report.elapsed:.0f} requests/s; latency p50 {1000 * statistics.median(latencies):.1f} ms, "
        f"p99 {1000 * _percentile(latencies, 99):.1f} ms (200s: p50 {1000 * statistics.median(ok):.1f} ms, "
        f"p99 {1000 * _percentile(ok, 99):.1f} ms)\n"
        f"  hot loads {report.hot_loads}, unloads {report.hot_unloads}; {batches} forwards, mean batch "
        f"{(after['items'] - before['items']) / max(batches, 1):.1f}, "
        f"{after['mixed_task_batches'] - before['mixed_task_batches']} mixed-task"
    )


def test_server_under_load_with_hot_reloads(load_world: dict[str, Path]) -> None:
    _load_test(load_world, duration=8.0, clients=32, pool_size=4000, max_queue=96)


@pytest.mark.slow
def test_server_under_long_load_with_overload(load_world: dict[str, Path]) -> None:
    # a small queue against 64 clients of up to 4 inputs: the 429 path is exercised too
    _load_test(load_world, duration=20.0, clients=64, pool_size=8000, max_queue=48)


def test_listing_and_predict_do_not_walk_the_model(load_world: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``adapters()`` (``GET /v1/adapters``, under the engine lock) once walked the whole module tree per adapter:
    O(N^2), 3 s at 100 adapters, blocking every request meanwhile. Listing and serving must not walk the model."""
    engine = _engine(load_world, list(STABLE))
    engine.predict([(t, "warm up") for t in STABLE])  # the first mixed call may build the core's caches
    calls: list[str] = []
    original = torch.nn.Module.named_modules

    def counting(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "named_modules", counting)
    infos = {i.name: i for i in engine.adapters()}
    results = engine.predict([("rating", "a b"), ("topic", "c d"), ("__base__", "e")])
    assert calls == []
    assert results[0].kind == "regression" and isinstance(results[0].value, float)
    assert infos["topic"].head_bytes == 4 * (4 * 32 + 4)
    assert infos["rating"].delta_bytes == 4 * infos["rating"].delta_params > 0


def test_long_input_is_truncated_to_the_model_limit(load_world: dict[str, Path]) -> None:
    """The tiny base embeds 128 positions; ``max_length`` 512 once let a long text fail the forward (HTTP 500)."""
    engine = _engine(load_world, ["topic"])
    assert engine.max_length == 128
    long_text = "word " * 400
    mixed = engine.predict([("topic", long_text), ("topic", "short")])[0].to_dict()
    assert same_result(mixed, engine.predict([("topic", long_text)])[0].to_dict())
    with LiveServer(create_app(engine)) as live:
        resp = httpx.post(f"{live.url}/v1/predict", json={"task": "topic", "text": long_text}, timeout=30)
    assert resp.status_code == 200, resp.text
