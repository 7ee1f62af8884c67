"""The Ray Serve deployment on a quantized base (``build_app(quantize=...)`` / ``serve --ray --quantize``).

One replica on a local Ray instance serves a tiny Llama loaded in NF4 with two adapters trained on the
full-precision base; a mixed request answers exactly what the in-process engine on the same quantized base answers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("bitsandbytes")
from peft import get_peft_model  # noqa: E402
from ray import serve  # noqa: E402
from test_quantized import _load, _save_base  # noqa: E402
from test_ray_serve import served  # noqa: E402
from test_serving import _free_port  # noqa: E402

import bitfit_peft  # noqa: E402
from bitfit_peft.serving import MultiTaskEngine  # noqa: E402
from bitfit_peft.serving.ray_serve import build_app  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]
PROMPTS = [{"task": "first", "prompt": "hello world"}, {"task": "second", "prompt": "hello world"},
           {"task": "__base__", "prompt": "hello"}]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ray-quantized")
    base = _save_base(tmp / "base", 0)
    for name, seed in (("first", 1), ("second", 2)):
        torch.manual_seed(seed)
        config = bitfit_peft.BitFitConfig(task_type="CAUSAL_LM", add_missing_bias=True, init_weights=False)
        get_peft_model(_load(base, None), config).save_pretrained(tmp / name)  # trained on the fp32 base
    return {"base": base, "first": tmp / "first", "second": tmp / "second"}


@pytest.fixture(scope="module")
def url(world: dict[str, Path]) -> Iterator[str]:
    os.environ["RAY_DEDUP_LOGS"] = "0"
    ray.init(num_cpus=1, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
             logging_level="WARNING")  # fmt: skip
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    adapters = {"first": str(world["first"]), "second": str(world["second"])}
    app = build_app(str(world["base"]), adapters, task_type="CAUSAL_LM", replicas=1, device="cpu",
                    quantize="nf4", torch_threads=1, ray_actor_options={"num_cpus": 1})  # fmt: skip
    with served(app, port, "bitfit-quantized") as base_url:
        yield base_url


def test_ray_replica_on_a_quantized_base_answers_like_the_engine(url: str, world: dict[str, Path]) -> None:
    torch.set_num_threads(1)
    engine = MultiTaskEngine(world["base"], task_type="CAUSAL_LM", device="cpu", quantize="nf4")
    for name in ("first", "second"):
        engine.add_adapter(name, world[name])
    expected = engine.generate([(p["task"], p["prompt"]) for p in PROMPTS], max_new_tokens=4)
    resp = httpx.post(f"{url}/v1/generate", json={"inputs": PROMPTS, "max_new_tokens": 4}, timeout=120)
    assert resp.status_code == 200, resp.text
    got = resp.json()["results"]
    assert [r["texts"] for r in got] == [g.texts for g in expected]
    assert got[0]["texts"] != got[1]["texts"] or got[0]["texts"] != got[2]["texts"]  # the adapters act
