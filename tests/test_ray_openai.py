"""The OpenAI-compatible API through the Ray Serve deployment: the real ``openai`` client (sync and streaming)
against a local Ray instance with 1 CPU replica of a tiny GPT-2 (chat template set) and 2 adapters; the vLLM
adapter aliases, the ingress's ``/metrics`` and the replicas' series on Ray's own metrics endpoint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
from ray import serve  # noqa: E402
from test_openai_api import make_lm_world  # noqa: E402
from test_ray_serve import served  # noqa: E402
from test_serving import _free_port  # noqa: E402

from bitfit_peft.serving import MultiTaskEngine  # noqa: E402
from bitfit_peft.serving.openai_api import ApiOptions  # noqa: E402
from bitfit_peft.serving.ray_serve import build_app  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]
TOKEN = "ray-openai-token"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_lm_world(tmp_path_factory.mktemp("ray-openai"))


RAY_METRICS_PORT = _free_port()


@pytest.fixture(scope="module")
def url(world: dict[str, Path]) -> Iterator[str]:
    os.environ["RAY_DEDUP_LOGS"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}, _metrics_export_port=RAY_METRICS_PORT,
             _system_config={"metrics_report_interval_ms": 500})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(str(world["base"]), {n: str(world["root"] / n) for n in ("one", "two")}, task_type="CAUSAL_LM",
                    replicas=1, max_batch_size=16, batch_wait_timeout_s=0.2, adapter_roots=[world["root"]],
                    admin_token=TOKEN, device="cpu", dtype="float32", torch_threads=1,
                    ray_actor_options={"num_cpus": 1}, api_options=ApiOptions(served_model_name="tiny"))
    with served(app, port, "bitfit-openai-test") as base_url:
        yield base_url


def test_openai_client_through_ray(url: str, world: dict[str, Path]) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    reference = MultiTaskEngine(str(world["base"]), task_type="CAUSAL_LM", device="cpu", dtype="float32")
    reference.add_adapter("one", world["root"] / "one")
    assert {(m.id, m.parent) for m in client.models.list()} == {  # type: ignore[attr-defined]
        ("tiny", None), ("one", "tiny"), ("two", "tiny")}
    answer = client.completions.create(model="one", prompt="a b c", max_tokens=5, temperature=0)
    expected = reference.generate([("one", "a b c")], max_new_tokens=5)[0]
    assert answer.choices[0].text == expected.texts[0]
    assert answer.usage.completion_tokens == len(expected.token_ids[0])
    chunks = list(client.chat.completions.create(model="one", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.generate([("one", "user: hi assistant:")], max_new_tokens=5)[0].texts[0]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", stream=True)
    missing = httpx.post(f"{url}/v1/chat/completions", json={"model": "nope", "messages": [
        {"role": "user", "content": "x"}]})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_vllm_aliases_and_metrics_through_ray(url: str) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "three", "lora_path": "three"}
                      ).status_code == 401
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "three", "lora_path": "three"},
                        headers=auth, timeout=60)
    assert loaded.status_code == 200, loaded.text
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert client.completions.create(model="three", prompt="a", max_tokens=2, temperature=0).choices
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "three"}, headers=auth,
                      timeout=60).status_code == 200
    text = httpx.get(f"{url}/metrics").text
    assert 'bitfit_peft:requests_total{adapter="three",endpoint="/v1/completions",status="200"} 1.0' in text
    assert 'vllm:lora_requests_info{max_lora="16",running_lora_adapters="",waiting_lora_adapters=""}' in text


def test_replica_series_reach_rays_metrics_endpoint(url: str) -> None:
    """The replica's batch and adapter series (``ray.util.metrics``) are exported by Ray's metrics agent."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert client.completions.create(model="two", prompt="a b", max_tokens=2, temperature=0).choices
    wanted = ("ray_bitfit_peft_batch_size_bucket", "ray_bitfit_peft_resident_adapters")
    text = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"http://127.0.0.1:{RAY_METRICS_PORT}/metrics", timeout=10).text
        except httpx.HTTPError:
            text = ""
        if all(name in text for name in wanted):
            break
        time.sleep(1)
    missing = [name for name in wanted if name not in text]
    assert not missing, f"Ray's metrics endpoint lacks {missing}"
