"""Step-level interleaving (issue 30, point 2): short requests run between the transformer blocks of a long call.

* exact: a generation (greedy, beam search, seeded sampling, mixed adapters) gives the same tokens whether or not
  other generations ran between its blocks, and so do the inner ones; a mixed-adapter forward the same logits;
* the batcher runs a much cheaper waiting request between a long batch's steps (it is answered while the long one
  still runs), but not a request as costly as the running one, nor one whose adapter must be loaded first.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import save_tiny_model
from test_serving import _save_adapter

from bitfit_peft.serving import MultiTaskEngine
from bitfit_peft.serving.batching import DynamicBatcher
from bitfit_peft.serving.dispatch import encode_payloads, run_engine_batch
from bitfit_peft.serving.interleave import blocks, step_hook

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("interleave")
    base = save_tiny_model(tmp / "gpt2", "gpt2", task="causal_lm")
    paths = {"base": base}
    for i, name in enumerate("abc"):
        paths[name] = _save_adapter(base, tmp / name, task_type="CAUSAL_LM", seed=20 + i)
    return paths


@pytest.fixture(scope="module")
def engine(world: dict[str, Path]) -> MultiTaskEngine:
    eng = MultiTaskEngine(str(world["base"]), task_type="CAUSAL_LM", device="cpu")
    for name in "abc":
        eng.add_adapter(name, world[name])
    return eng


LONG = [("a", "the quick brown fox"), ("b", "a tale of two"), ("__base__", "hello there")]
SHORT = [("c", "once upon"), ("a", "to be or")]
SETTINGS: list[dict[str, Any]] = [
    {"max_new_tokens": 12, "num_beams": 3, "num_return_sequences": 2},
    {"max_new_tokens": 12, "do_sample": True, "top_k": 20, "seed": 7, "num_return_sequences": 2},
    {"max_new_tokens": 12},
]


def _tokens(results: list[Any]) -> list[list[list[int]]]:
    return [r.token_ids for r in results]


@pytest.mark.parametrize("outer", SETTINGS, ids=["beams", "sampling", "greedy"])
def test_generations_run_between_steps_change_nothing(engine: MultiTaskEngine, outer: dict[str, Any]) -> None:
    inner = {"max_new_tokens": 5, "do_sample": True, "seed": 3}
    alone_outer = _tokens(engine.generate(LONG, **outer))
    alone_inner = _tokens(engine.generate(SHORT, **inner))
    inner_results: list[Any] = []
    steps = 0
    inside = False

    def hook(set_aside: Any) -> None:
        nonlocal steps, inside
        if inside:
            return
        steps += 1
        if steps in (3, 13):  # two inner generations, each with its own seed and adapters, mid-way
            inside = True
            with set_aside():
                inner_results.append(engine.generate(SHORT, **inner))
            inside = False

    with step_hook(hook):
        interleaved = _tokens(engine.generate(LONG, **outer))
    assert steps >= 6 and len(inner_results) == 2
    assert interleaved == alone_outer
    assert all(_tokens(r) == alone_inner for r in inner_results)


def test_predictions_run_between_blocks_change_nothing(tmp_path: Path) -> None:
    base = save_tiny_model(tmp_path / "bert", "bert", task="base")
    eng = MultiTaskEngine(str(base), task_type="SEQ_CLS", device="cpu", dtype="float32")
    for i, name in enumerate("xyz"):
        eng.add_adapter(name, _save_adapter(base, tmp_path / name, num_labels=2 + i, seed=30 + i))
    outer = [("x", "what a lovely film"), ("y", "win a free cruise"), ("__base__", "ok"), ("z", "the plot", "thin")]
    inner = [("z", "call me later"), ("x", "not great")]
    alone_outer, alone_inner = eng.predict(outer), eng.predict(inner)
    inner_results: list[Any] = []
    inside = False

    def hook(set_aside: Any) -> None:
        nonlocal inside
        if not inside and len(inner_results) < 2:  # before the outer forward's first and second block
            inside = True
            with set_aside():
                inner_results.append(eng.predict(inner))
            inside = False

    assert len(blocks(eng.model)) == 2  # the tiny BERT's encoder layers
    with step_hook(hook):
        interleaved = eng.predict(outer)
    assert len(inner_results) == 2
    assert [p.to_dict() for p in interleaved] == [p.to_dict() for p in alone_outer]
    assert all([p.to_dict() for p in r] == [p.to_dict() for p in alone_inner] for r in inner_results)


def _batcher(engine: MultiTaskEngine, interleave: bool = True) -> DynamicBatcher:
    return DynamicBatcher(lambda key, p: run_engine_batch(engine, *key, p), max_batch_size=8, max_wait_ms=1,
                          cost_of=lambda p: p.cost, task_of=lambda p: p.task,
                          interleave=(lambda p: engine.registry.is_resident(p.task)) if interleave else None)


async def _race(engine: MultiTaskEngine, batcher: DynamicBatcher, second: list[tuple[str, str]],
                second_settings: dict[str, Any]) -> tuple[bool, list[Any], list[Any]]:
    """Submit a long generation, then (once it runs) ``second``: whether the long one was still running when
    ``second`` was answered, and both results."""
    long_settings = tuple(sorted({"max_new_tokens": 100, "num_beams": 4, "num_return_sequences": 4}.items()))
    short_settings = tuple(sorted(second_settings.items()))
    long_items = encode_payloads(engine, "generate", long_settings, LONG)
    short_items = encode_payloads(engine, "generate", short_settings, second)
    await batcher.start()
    try:
        long_task = asyncio.create_task(batcher.submit(("generate", long_settings), long_items))
        while batcher.in_flight == 0:
            await asyncio.sleep(0.001)
        short = await batcher.submit(("generate", short_settings), short_items)
        long_running = not long_task.done()
        return long_running, await long_task, short
    finally:
        await batcher.stop()


def test_a_short_request_is_answered_while_a_long_generation_runs(engine: MultiTaskEngine) -> None:
    settings = {"max_new_tokens": 4}
    long_running, long_out, short_out = asyncio.run(_race(engine, _batcher(engine), SHORT, settings))
    assert long_running, "the short request waited for the whole long generation"
    alone = engine.generate(LONG, max_new_tokens=100, num_beams=4, num_return_sequences=4)
    assert _tokens(long_out) == _tokens(alone)
    assert _tokens(short_out) == _tokens(engine.generate(SHORT, **settings))
    assert not asyncio.run(_race(engine, _batcher(engine, interleave=False), SHORT, settings))[0]


def test_a_request_as_costly_as_the_running_one_waits_its_turn(engine: MultiTaskEngine) -> None:
    costly = {"max_new_tokens": 40, "num_beams": 4, "num_return_sequences": 4}  # over 1/4 of the long one's cost
    long_running, _, _ = asyncio.run(_race(engine, _batcher(engine), LONG[:1], costly))
    assert not long_running


def test_a_request_whose_adapter_must_load_waits_for_the_running_batch(world: dict[str, Path], tmp_path: Path) -> None:
    eng = MultiTaskEngine(str(world["base"]), task_type="CAUSAL_LM", device="cpu", max_resident=2)
    for name in "abc":
        eng.add_adapter(name, world[name])
    # the long batch names "a" and "b": loading "a" evicts "c", so a request of "c" needs a load, which must not
    # run inside a decoding step (it could evict the running batch's adapters)
    long_running, _, short = asyncio.run(_race(eng, _batcher(eng), [("c", "once upon")], {"max_new_tokens": 4}))
    assert not long_running and short[0].task == "c"


def test_the_server_answers_a_short_request_during_a_long_generation(engine: MultiTaskEngine) -> None:
    """Over HTTP: the server's batcher (``dispatch.engine_batcher``, also each Ray replica's) interleaves."""
    import threading
    import time

    import httpx
    from test_serving import LiveServer

    from bitfit_peft.serving import create_app

    with LiveServer(create_app(engine, max_wait_ms=1)) as live:
        long_body = {"inputs": [{"task": t, "prompt": p} for t, p in LONG], "max_new_tokens": 100, "num_beams": 4,
                     "num_return_sequences": 4}
        done: list[float] = []
        worker = threading.Thread(target=lambda: (httpx.post(f"{live.url}/v1/generate", json=long_body, timeout=300),
                                                  done.append(1)))
        worker.start()
        while engine.lock.acquire(blocking=False):  # until the long generation holds the engine
            engine.lock.release()
            time.sleep(0.001)
        short = httpx.post(f"{live.url}/v1/generate", json={"task": "c", "prompt": "once upon", "max_new_tokens": 4},
                           timeout=300)
        long_still_running = not done
        worker.join()
    assert short.status_code == 200 and long_still_running
