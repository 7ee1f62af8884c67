"""The OpenAI-compatible API, vLLM's /classify and adapter endpoints, /metrics and request logs.

Real uvicorn servers on loopback, driven with the real ``openai`` client (sync and streaming) and with httpx for the
error shapes; tiny random GPT-2 (a chat template set on the tiny tokenizer) and BERT models.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from conftest import make_tiny_tokenizer, save_tiny_model
from prometheus_client.parser import text_string_to_metric_families
from test_serving import LiveServer, _save_adapter

from bitfit_peft.serving import EngineError, MultiTaskEngine, create_app
from bitfit_peft.serving.events import AdapterEvents
from bitfit_peft.serving.limits import Limits
from bitfit_peft.serving.openai_api import ApiOptions
from bitfit_peft.serving.openai_engine import ChoiceText, render_prompt
from bitfit_peft.serving.request_log import JsonFormatter, configure_logging

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
TOKEN = "s3cret-admin-token"


# ---------------------------------------------------------------------------------------------------- fixtures
def make_lm_world(tmp: Path) -> dict[str, Path]:
    """A tiny GPT-2 whose tokenizer has a chat template, and adapters "one", "two", "three" under ``root``."""
    base = save_tiny_model(tmp / "gpt2", "gpt2", task="causal_lm")
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    root = tmp / "adapters"
    root.mkdir()
    adapters = {n: _save_adapter(base, root / n, task_type="CAUSAL_LM", seed=i + 1)
                for i, n in enumerate(("one", "two", "three"))}
    return {"base": base, "root": root, **adapters}


@pytest.fixture(scope="module")
def lm_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_lm_world(tmp_path_factory.mktemp("openai-lm"))


@pytest.fixture(scope="module")
def lm_engine(lm_world: dict[str, Path]) -> MultiTaskEngine:
    engine = MultiTaskEngine(str(lm_world["base"]), task_type="CAUSAL_LM", device="cpu", dtype="float32",
                             limits=Limits(max_new_tokens_limit=64))
    engine.add_adapter("one", lm_world["one"])
    engine.add_adapter("two", lm_world["two"])
    return engine


@pytest.fixture(scope="module")
def lm_server(lm_engine: MultiTaskEngine, lm_world: dict[str, Path]) -> Iterator[LiveServer]:
    app = create_app(lm_engine, max_batch_size=16, max_wait_ms=150, adapter_roots=[lm_world["root"]],
                     admin_token=TOKEN,
                     api_options=ApiOptions(served_model_name="tiny-gpt2"))
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(lm_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{lm_server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def enc_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("openai-enc")
    base = save_tiny_model(tmp / "bert", "bert", task="base")
    sentiment = _save_adapter(base, tmp / "sentiment", num_labels=2, seed=1,
                              extra={"bitfit_training.json": {"task": "seq-cls",
                                                              "label_names": ["negative", "positive"]}})
    topic = _save_adapter(base, tmp / "topic", num_labels=3, seed=2)
    config = json.loads((topic / "adapter_config.json").read_text())
    config["id2label"] = {"0": "sport", "1": "politics", "2": "science"}
    (topic / "adapter_config.json").write_text(json.dumps(config))
    return {"base": base, "sentiment": sentiment, "topic": topic, "rating": _save_adapter(base, tmp / "rating",
                                                                                          num_labels=1, seed=3),
            "embed": _save_adapter(base, tmp / "embed", task_type="FEATURE_EXTRACTION", seed=4)}


@pytest.fixture(scope="module")
def cls_engine(enc_world: dict[str, Path]) -> MultiTaskEngine:
    engine = MultiTaskEngine(str(enc_world["base"]), task_type="SEQ_CLS", device="cpu", dtype="float32")
    for name in ("sentiment", "topic", "rating"):
        engine.add_adapter(name, enc_world[name])
    return engine


@pytest.fixture(scope="module")
def cls_server(cls_engine: MultiTaskEngine) -> Iterator[LiveServer]:
    with LiveServer(create_app(cls_engine, max_wait_ms=20)) as live:
        yield live


@pytest.fixture(scope="module")
def emb_engine(enc_world: dict[str, Path]) -> MultiTaskEngine:
    engine = MultiTaskEngine(str(enc_world["base"]), task_type="FEATURE_EXTRACTION", device="cpu", dtype="float32")
    engine.add_adapter("embed", enc_world["embed"])
    return engine


def _metrics(url: str) -> dict[str, dict[tuple, float]]:
    """``{sample name: {sorted label items: value}}`` of a scrape."""
    text = httpx.get(f"{url}/metrics").text
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _greedy(engine: MultiTaskEngine, task: str, prompt: str, max_tokens: int) -> str:
    return engine.generate([(task, prompt)], max_new_tokens=max_tokens)[0].texts[0]


# ---------------------------------------------------------------------------------------------------- models
def test_models_lists_the_base_and_every_adapter_with_the_base_as_parent(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny-gpt2", "one", "two"}
    assert models["tiny-gpt2"].parent is None  # type: ignore[attr-defined]
    assert models["one"].parent == models["two"].parent == "tiny-gpt2"  # type: ignore[attr-defined]
    assert models["one"].owned_by == "bitfit-peft"


# ---------------------------------------------------------------------------------------------------- completions
def test_completions_with_the_openai_client_equal_the_engine_and_mix_adapters_in_one_batch(
        client: openai.OpenAI, lm_engine: MultiTaskEngine, lm_server: LiveServer) -> None:
    prompts = {"one": "the cat sat", "two": "a b c d", "tiny-gpt2": "hello world"}
    before = httpx.get(f"{lm_server.url}/v1/stats").json()["mixed_task_batches"]
    answers: dict[str, Any] = {}

    def ask(model: str) -> None:
        answers[model] = client.completions.create(model=model, prompt=prompts[model], max_tokens=6, temperature=0)

    threads = [threading.Thread(target=ask, args=(m,)) for m in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for model, answer in answers.items():
        task = "__base__" if model == "tiny-gpt2" else model
        assert answer.object == "text_completion" and answer.model == model
        expected = lm_engine.generate([(task, prompts[model])], max_new_tokens=6)[0]
        assert answer.choices[0].text == expected.texts[0]
        ids = expected.token_ids[0]
        ended = ids[-1] == lm_engine.tokenizer.eos_token_id
        assert answer.choices[0].finish_reason == ("stop" if ended else "length")
        prompt_tokens = len(lm_engine.tokenizer(prompts[model])["input_ids"])
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, len(ids))
        assert answer.usage.total_tokens == prompt_tokens + len(ids)
    assert httpx.get(f"{lm_server.url}/v1/stats").json()["mixed_task_batches"] > before  # one mixed generate


def test_completions_several_prompts_n_seed_and_stop(client: openai.OpenAI, lm_engine: MultiTaskEngine) -> None:
    answer = client.completions.create(model="one", prompt=["the cat", "a b"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert answer.choices[0].text == answer.choices[1].text == _greedy(lm_engine, "one", "the cat", 4)
    sampled = [client.completions.create(model="two", prompt="the cat", max_tokens=8, temperature=1.0, top_p=0.9,
                                         n=2, seed=7) for _ in range(2)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]
    assert sampled[0].usage.completion_tokens == sum(8 if c.finish_reason == "length" else 0 for c in
                                                     sampled[0].choices) or sampled[0].usage.completion_tokens > 0
    full = _greedy(lm_engine, "one", "the cat sat", 8)
    assert len(full) >= 5
    stop = full[1:3]
    cut = client.completions.create(model="one", prompt="the cat sat", max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)] != ""
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 8


def test_chat_uses_the_tokenizer_chat_template(client: openai.OpenAI, lm_engine: MultiTaskEngine) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a cat?"}]
    answer = client.chat.completions.create(model="two", messages=messages, max_tokens=5, temperature=0)  # type: ignore[arg-type]
    rendered = render_prompt(lm_engine.tokenizer, (("system", "be brief"), ("user", "what is a cat?")))
    assert rendered == "system: be brief user: what is a cat? assistant:"
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == _greedy(lm_engine, "two", rendered, 5)
    assert answer.usage.prompt_tokens == len(lm_engine.tokenizer(rendered)["input_ids"])


def test_streaming_completion_and_chat_with_the_openai_client(client: openai.OpenAI,
                                                              lm_engine: MultiTaskEngine) -> None:
    chunks = list(client.completions.create(model="one", prompt="the cat sat", max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == _greedy(lm_engine, "one", "the cat sat", 6)
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) >= 2  # token by token, not one block
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6

    stream = client.chat.completions.create(model="two", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == _greedy(lm_engine, "two", "user: hi assistant:", 5)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_streams_of_different_adapters_share_batches(client: openai.OpenAI, lm_server: LiveServer) -> None:
    before = httpx.get(f"{lm_server.url}/v1/stats").json()["mixed_task_batches"]
    texts: dict[str, str] = {}

    def ask(model: str) -> None:
        stream = client.completions.create(model=model, prompt="a b c", max_tokens=4, temperature=0, stream=True)
        texts[model] = "".join(c.choices[0].text for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(m,)) for m in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(texts) == {"one", "two"}
    assert httpx.get(f"{lm_server.url}/v1/stats").json()["mixed_task_batches"] > before


def test_choice_text_holds_back_a_possible_stop_string(lm_engine: MultiTaskEngine) -> None:
    tok = lm_engine.tokenizer
    choice = ChoiceText(tok, ["x y"])
    shown = "".join(choice.add(t) for t in tok("a b x y c", add_special_tokens=False)["input_ids"])
    assert choice.stopped and choice.text == "a b " and shown + choice.rest() == "a b "


# ---------------------------------------------------------------------------------------------------- errors
def test_errors_use_the_openai_error_object(client: openai.OpenAI, lm_server: LiveServer) -> None:
    url = lm_server.url
    cases = [
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model_not_found", "model"),
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404,
         "model_not_found", "model"),
        ("/v1/completions", {"model": "one", "prompt": "x", "logprobs": 2}, 400, "invalid_request", None),
        ("/v1/completions", {"model": "one", "prompt": "x", "max_tokens": 10_000}, 400, "invalid_request", None),
        ("/v1/completions", {"model": "one", "prompt": "x", "temperature": "hot"}, 400, "invalid_request",
         "temperature"),
        ("/v1/completions", {"model": "one"}, 400, "invalid_request", "prompt"),
        ("/v1/chat/completions", {"model": "one", "messages": [{"role": "tool", "content": "x"}]}, 400,
         "invalid_request", "messages.0.role"),
        ("/v1/embeddings", {"model": "one", "input": "x"}, 400, "invalid_request", None),
        ("/classify", {"model": "one", "input": ["x"]}, 400, "invalid_request", None),
    ]
    for path, body, status, code, param in cases:
        response = httpx.post(url + path, json=body)
        assert response.status_code == status, (path, body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["code"], error["param"]) == (code, param), (path, body, error)
        assert "\n" not in error["message"] and error["message"]
    bad_json = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):  # an error before the first token is an HTTP error, not a stream
        client.completions.create(model="nope", prompt="x", stream=True)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="one", prompt="x", max_tokens=1000)


# ---------------------------------------------------------------------------------------------- vLLM adapters
def test_vllm_load_and_unload_aliases_need_the_admin_token(lm_server: LiveServer, client: openai.OpenAI) -> None:
    url, auth = lm_server.url, {"Authorization": f"Bearer {TOKEN}"}
    refused = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "three", "lora_path": "three"})
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "three", "lora_path": "three"},
                        headers=auth)
    assert loaded.status_code == 200, loaded.text
    assert "three" in {m.id for m in client.models.list()}
    assert client.completions.create(model="three", prompt="a", max_tokens=2, temperature=0).choices
    outside = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"}, headers=auth)
    assert outside.status_code == 403 and outside.json()["error"]["type"] == "permission_error"
    again = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "three", "lora_path": "three"},
                       headers=auth)
    assert again.status_code == 409
    gone = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "three"}, headers=auth)
    assert gone.status_code == 200 and "three" not in {m.id for m in client.models.list()}
    missing = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "three"}, headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


# ---------------------------------------------------------------------------------------------------- encoders
def test_classify_in_vllm_shape_with_the_adapters_label_names(cls_server: LiveServer,
                                                              cls_engine: MultiTaskEngine) -> None:
    texts = ["what a lovely film", "the cat sat on the mat"]
    for path in ("/classify", "/v1/classify"):
        answer = httpx.post(cls_server.url + path, json={"model": "topic", "input": texts}).json()
        assert answer["object"] == "list" and answer["model"] == "topic" and answer["id"].startswith("classify-")
        expected = cls_engine.predict([("topic", t) for t in texts])
        for i, (row, pred) in enumerate(zip(answer["data"], expected, strict=True)):
            assert row["index"] == i and row["num_classes"] == 3
            assert row["label"] == pred.label and row["label"] in {"sport", "politics", "science"}  # never LABEL_n
            assert row["probs"] == pytest.approx(list(pred.probabilities.values()), abs=1e-6)
            assert sum(row["probs"]) == pytest.approx(1.0, abs=1e-5)
        tokens = sum(len(cls_engine.tokenizer(t)["input_ids"]) for t in texts)
        assert answer["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                                   "prompt_tokens_details": None}
    single = httpx.post(cls_server.url + "/classify", json={"model": "sentiment", "input": "ok"}).json()
    assert single["data"][0]["label"] in {"negative", "positive"}
    regression = httpx.post(cls_server.url + "/classify", json={"model": "rating", "input": "ok"})
    assert regression.status_code == 400 and "regression" in regression.json()["error"]["message"]


def test_embeddings_with_the_openai_client(emb_engine: MultiTaskEngine) -> None:
    with LiveServer(create_app(emb_engine, max_wait_ms=20)) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        texts = ["a cat", "the dog barked twice"]
        answer = client.embeddings.create(model="embed", input=texts)  # the client asks for base64
        expected = [p.embedding for p in emb_engine.predict([("embed", t) for t in texts])]
        for item, vector in zip(answer.data, expected, strict=True):
            assert np.allclose(item.embedding, vector, atol=1e-6)
        assert answer.usage.prompt_tokens == sum(len(emb_engine.tokenizer(t)["input_ids"]) for t in texts)
        floats = client.embeddings.create(model="embed", input="a cat", encoding_format="float")
        assert np.allclose(floats.data[0].embedding, expected[0], atol=1e-6)
        raw = httpx.post(f"{live.url}/v1/embeddings", json={"model": "embed", "input": "a cat",
                                                             "encoding_format": "base64"}).json()
        decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
        assert np.allclose(decoded, expected[0], atol=1e-6)
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="embed", input="a cat", dimensions=4)
        wrong = httpx.post(f"{live.url}/v1/chat/completions",
                           json={"model": "embed", "messages": [{"role": "user", "content": "x"}]})
        assert wrong.status_code == 400 and "embeddings" in wrong.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------------- metrics
def test_metrics_after_known_traffic(lm_world: dict[str, Path]) -> None:
    engine = MultiTaskEngine(str(lm_world["base"]), task_type="CAUSAL_LM", device="cpu", dtype="float32",
                             max_resident=1, adapter_roots=[lm_world["root"]])
    engine.add_adapter("one", lm_world["one"])
    app = create_app(engine, max_wait_ms=5, adapter_roots=[lm_world["root"]],
                     api_options=ApiOptions(max_adapter_labels=1, compat_metrics_prefix="vllm:"))
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        for _ in range(2):
            client.completions.create(model="one", prompt="a b", max_tokens=3, temperature=0)
        list(client.completions.create(model="two", prompt="hello world", max_tokens=3, temperature=0, stream=True))
        httpx.post(f"{live.url}/v1/completions", json={"model": "nope", "prompt": "x"})
        m = _metrics(live.url)
        requests = m["bitfit_peft:requests_total"]
        done = (("endpoint", "/v1/completions"), ("status", "200"))
        assert requests[tuple(sorted((("adapter", "one"), *done)))] == 2
        assert requests[tuple(sorted((("adapter", "other"), *done)))] == 1  # "two": over the label cap of 1
        assert requests[tuple(sorted((("adapter", ""), ("endpoint", "/v1/completions"), ("status", "404"))))] == 1
        assert m["bitfit_peft:request_duration_seconds_count"][(("adapter", "one"),
                                                                ("endpoint", "/v1/completions"))] == 2
        assert m["bitfit_peft:generation_tokens_total"][(("adapter", "one"),)] == 6
        assert m["bitfit_peft:time_to_first_token_seconds_count"][(("adapter", "other"),)] == 1
        assert m["bitfit_peft:inter_token_latency_seconds_count"][(("adapter", "other"),)] >= 1
        assert m["bitfit_peft:batch_size_count"][(("kind", "oai_complete"),)] == 2
        assert m["bitfit_peft:batch_size_count"][(("kind", "oai_stream"),)] == 1
        assert m["bitfit_peft:batch_tokens_sum"][(("kind", "oai_complete"),)] == 6
        # "two" was loaded on first use from the adapter root and evicted "one" (max_resident=1)
        events = m["bitfit_peft:adapter_events_total"]
        assert events[(("event", "load"),)] == 1 and events[(("event", "evict"),)] == 1
        assert m["bitfit_peft:adapter_load_seconds_count"][(("outcome", "ok"),)] == 1
        assert m["bitfit_peft:resident_adapters"][()] == 1
        assert m["bitfit_peft:queue_depth"][()] == 0
        (labels, stamp), = m["vllm:lora_requests_info"].items()
        assert dict(labels) == {"max_lora": "1", "running_lora_adapters": "", "waiting_lora_adapters": ""}
        assert stamp > 1e9  # the time it was read, as vLLM's gauge
        assert "vllm:num_requests_waiting" in m and "vllm:num_requests_running" in m


def test_each_app_has_its_own_metrics_registry(cls_engine: MultiTaskEngine) -> None:
    with LiveServer(create_app(cls_engine)) as first, LiveServer(create_app(cls_engine)) as second:
        httpx.post(first.url + "/classify", json={"model": "sentiment", "input": "x"})
        key = (("adapter", "sentiment"), ("endpoint", "/classify"), ("status", "200"))
        assert _metrics(first.url)["bitfit_peft:requests_total"][key] == 1
        assert key not in _metrics(second.url).get("bitfit_peft:requests_total", {})


# ---------------------------------------------------------------------------------------------------- logs
def test_one_log_line_per_request_with_the_request_id_and_no_text(lm_server: LiveServer,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="bitfit_peft.serving.requests"):
        response = httpx.post(f"{lm_server.url}/v1/completions", headers={"X-Request-ID": "req-42"},
                              json={"model": "one", "prompt": "secret words here", "max_tokens": 2,
                                    "temperature": 0})
        hostile = httpx.post(f"{lm_server.url}/v1/completions", headers={"X-Request-ID": "bad id; drop table"},
                             json={"model": "one", "prompt": "x", "max_tokens": 1, "temperature": 0})
    assert response.headers["x-request-id"] == "req-42"
    assert "drop" not in hostile.headers["x-request-id"] and len(hostile.headers["x-request-id"]) == 32
    lines = [r for r in caplog.records if r.name == "bitfit_peft.serving.requests"]
    ours = [r for r in lines if r.fields["request_id"] == "req-42"]  # type: ignore[attr-defined]
    assert len(ours) == 1
    fields = ours[0].fields  # type: ignore[attr-defined]
    assert fields["adapter"] == "one" and fields["status"] == 200 and fields["completion_tokens"] == 2
    assert fields["prompt_tokens"] > 0 and fields["latency_ms"] > 0 and fields["endpoint"] == "/v1/completions"
    assert all("secret" not in r.getMessage() for r in caplog.records)
    parsed = json.loads(JsonFormatter().format(ours[0]))
    assert parsed["request_id"] == "req-42" and parsed["adapter"] == "one"


def test_loads_unloads_evictions_and_refused_loads_are_logged(lm_world: dict[str, Path],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    engine = MultiTaskEngine(str(lm_world["base"]), task_type="CAUSAL_LM", device="cpu", max_resident=1)
    with caplog.at_level(logging.INFO, logger="bitfit_peft.serving.adapters"):
        engine.add_adapter("one", lm_world["one"])
        engine.add_adapter("two", lm_world["two"])
        with pytest.raises(EngineError):
            engine.add_adapter("bad", lm_world["root"])  # not an adapter folder
        engine.remove_adapter("two")
    events = [(r.fields["event"], r.fields["adapter"]) for r in caplog.records  # type: ignore[attr-defined]
              if r.name == "bitfit_peft.serving.adapters"]
    assert events == [("adapter_load", "one"), ("adapter_evict", "one"), ("adapter_load", "two"),
                      ("adapter_load_failed", "bad"), ("adapter_unload", "two")]
    reasons = {r.fields["event"]: r.fields["reason"] for r in caplog.records  # type: ignore[attr-defined]
               if r.name == "bitfit_peft.serving.adapters"}
    assert "max_resident=1" in reasons["adapter_evict"] and reasons["adapter_load_failed"]


def test_queue_full_is_a_429_rate_limit_error_with_retry_after(lm_engine: MultiTaskEngine) -> None:
    with LiveServer(create_app(lm_engine, max_queue=1)) as live:
        response = httpx.post(f"{live.url}/v1/completions", json={"model": "one", "prompt": ["a", "b"]})
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "rate_limit_error"


def test_a_chat_without_a_chat_template_is_refused_in_one_line(tiny_tokenizer: Any) -> None:
    with pytest.raises(EngineError, match="no chat template"):
        render_prompt(tiny_tokenizer, (("user", "hi"),))
    assert render_prompt(tiny_tokenizer, "plain prompt") == "plain prompt"


def test_the_servers_input_limit_holds_on_the_openai_routes(enc_world: dict[str, Path]) -> None:
    engine = MultiTaskEngine(str(enc_world["base"]), task_type="SEQ_CLS", device="cpu", dtype="float32",
                             limits=Limits(max_inputs_per_request=2))
    engine.add_adapter("sentiment", enc_world["sentiment"])
    with LiveServer(create_app(engine)) as live:
        response = httpx.post(f"{live.url}/classify", json={"model": "sentiment", "input": ["a", "b", "c"]})
        assert response.status_code == 400 and "Too many inputs: 3 > 2" in response.json()["error"]["message"]


def test_streams_with_n_choices_and_a_stop_string_equal_the_plain_answers(client: openai.OpenAI) -> None:
    plain = client.completions.create(model="one", prompt="the cat sat", max_tokens=8, temperature=0, stop=[" s s"])
    chunks = list(client.completions.create(model="one", prompt="the cat sat", max_tokens=8, temperature=0,
                                            stop=[" s s"], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [
        plain.choices[0].finish_reason]
    kwargs: dict[str, Any] = {"model": "two", "prompt": "hello world", "max_tokens": 4, "temperature": 1.0,
                              "n": 2, "seed": 3}
    sampled = client.completions.create(**kwargs)
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert [texts[0], texts[1]] == [c.text for c in sampled.choices]  # same seed, same batch: same samples


def test_json_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    names = ("bitfit_peft.serving.requests", "bitfit_peft.serving.adapters")
    saved = [(log.handlers, log.level, log.propagate) for log in map(logging.getLogger, names)]
    try:
        configure_logging(json_lines=True)
        AdapterEvents().emit("evict", "sst2", reason="least recently used")
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert line["event"] == "adapter_evict" and line["adapter"] == "sst2" and line["level"] == "INFO"
    finally:
        for log, (handlers, level, propagate) in zip(map(logging.getLogger, names), saved, strict=True):
            log.handlers, log.level, log.propagate = handlers, level, propagate


def test_classify_requests_for_different_adapters_share_a_forward(cls_engine: MultiTaskEngine) -> None:
    with LiveServer(create_app(cls_engine, max_wait_ms=300)) as live:
        answers: dict[str, Any] = {}

        def ask(model: str) -> None:
            answers[model] = httpx.post(f"{live.url}/classify", json={"model": model, "input": "a fine film"}).json()

        threads = [threading.Thread(target=ask, args=(m,)) for m in ("sentiment", "topic")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers["sentiment"]["data"][0]["num_classes"] == 2 and answers["topic"]["data"][0]["num_classes"] == 3
        assert httpx.get(f"{live.url}/v1/stats").json()["mixed_task_batches"] == 1


def test_openai_requests_are_held_to_the_engines_budgets(lm_world: dict[str, Path],
                                                         cls_engine: MultiTaskEngine) -> None:
    """Completions (plain and streamed) and /classify are costed before any work, like /v1/generate and
    /v1/predict: over budget is a 413 in OpenAI's error shape (issue 30 on the OpenAI routes)."""
    engine = MultiTaskEngine(str(lm_world["base"]), task_type="CAUSAL_LM", device="cpu", dtype="float32",
                             limits=Limits(max_request_generate_cost=100, max_new_tokens_limit=64))
    engine.add_adapter("one", lm_world["one"])
    with LiveServer(create_app(engine)) as live:
        body = {"model": "one", "prompt": "a b c", "max_tokens": 60, "n": 2, "temperature": 1.0}
        for stream in (False, True):
            response = httpx.post(f"{live.url}/v1/completions", json={**body, "stream": stream}, timeout=60)
            assert response.status_code == 413, response.text
            assert "max_request_generate_cost" in response.json()["error"]["message"]
        ok = httpx.post(f"{live.url}/v1/completions", json={**body, "max_tokens": 8, "n": 1}, timeout=60)
        assert ok.status_code == 200, ok.text
    small = MultiTaskEngine(cls_engine.base_name, task_type=str(cls_engine.task_type), device="cpu",
                            dtype="float32", limits=Limits(max_request_tokens=8))
    with LiveServer(create_app(small)) as live:
        response = httpx.post(f"{live.url}/classify", json={"model": small.base_name, "input": ["a b c d e f"] * 3})
        assert response.status_code == 413, response.text
        assert "max_request_tokens" in response.json()["error"]["message"]
