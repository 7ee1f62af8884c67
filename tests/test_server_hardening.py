"""No request or adapter folder subverts the server (issue 12, point 3): a real uvicorn server driven with httpx.

* every hostile input is a 4xx with a one-line JSON ``detail``, and the same keep-alive connection goes on working;
* every file a hot load opens resolves inside the adapter roots (403 otherwise, nothing loaded);
* a ``hub_id`` is never read from disk;
* ``--admin-token`` / ``admin_token``: POST/DELETE /v1/adapters need the Bearer token (401 otherwise), never logged;
* predict keeps answering while adapters are hot-loaded (latency printed).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import save_tiny_model
from test_serving import LiveServer, _free_port, _save_adapter

from bitfit_peft.serving import MultiTaskEngine, create_app

TOKEN = "s3cret-admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json"}
NOT_A_REPO = "bitfit-peft-test/not-a-repo-7f3a"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hardening")
    base = save_tiny_model(tmp / "base", "bert", task="base")
    root, outside = tmp / "root", tmp / "outside"
    root.mkdir()
    outside.mkdir()
    _save_adapter(base, root / "a", seed=1)
    _save_adapter(base, root / "spare", num_labels=3, seed=2)
    real = _save_adapter(base, outside / "real", seed=3)
    linked = root / "linkedfiles"  # a folder inside the root whose files are symlinks to a folder outside it
    linked.mkdir()
    for f in real.iterdir():
        (linked / f.name).symlink_to(f)
    hub_root = tmp / "cache" / "snapshots"  # a root shaped like the Hub cache: its blobs lie outside the root
    (hub_root / "rev").mkdir(parents=True)
    (tmp / "cache" / "blobs").mkdir()
    for f in real.iterdir():
        blob = tmp / "cache" / "blobs" / f.name
        blob.write_bytes(f.read_bytes())
        (hub_root / "rev" / f.name).symlink_to(blob)
    (root / "loop").symlink_to(root / "loop")
    (root / "loop2").symlink_to(root / "loop3")
    (root / "loop3").symlink_to(root / "loop2")
    _save_adapter(base, tmp / NOT_A_REPO, seed=4)  # a local folder named like the Hub id, relative to the CWD
    _save_adapter(base, root / NOT_A_REPO, seed=5)  # and the same inside the root
    return {"tmp": tmp, "base": base, "root": root, "hub_root": hub_root, "real": real}


@pytest.fixture(scope="module")
def engine(world: dict[str, Path]) -> MultiTaskEngine:
    eng = MultiTaskEngine(str(world["base"]), task_type="SEQ_CLS", device="cpu", dtype="float32")
    eng.add_adapter("a", world["root"] / "a")
    return eng


@pytest.fixture(scope="module")
def live(engine: MultiTaskEngine, world: dict[str, Path]) -> Iterator[LiveServer]:
    app = create_app(engine, max_wait_ms=1, adapter_roots=[world["root"], world["hub_root"]], allow_hub=True,
                     admin_token=TOKEN)
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def client(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


def _raw(body: str) -> bytes:
    return body.encode("utf-8")


# (label, method, url, body bytes, expected status); JSON escapes such as \ud800 are sent as written.
HOSTILE: list[tuple[str, str, str, bytes, int]] = [
    ("text lone surrogate", "POST", "/v1/predict", _raw('{"task":"a","text":"\\ud800"}'), 422),
    ("task lone surrogate", "POST", "/v1/predict", _raw('{"task":"\\udfff","text":"x"}'), 422),
    ("text_pair lone surrogate", "POST", "/v1/predict", _raw('{"task":"a","text":"x","text_pair":"\\ud800x"}'), 422),
    ("inputs[1].text surrogate", "POST", "/v1/predict",
     _raw('{"inputs":[{"task":"a","text":"ok"},{"task":"a","text":"\\ud83d"}]}'), 422),
    ("task NUL", "POST", "/v1/predict", _raw('{"task":"a\\u0000","text":"x"}'), 422),
    ("non-UTF-8 body", "POST", "/v1/predict", b'{"task":"a","text":"\xff\xfe\xc3"}', 400),
    ("invalid JSON", "POST", "/v1/predict", b'{"task":', 422),
    ("empty body", "POST", "/v1/predict", b"", 422),
    ("body is a list", "POST", "/v1/predict", b"[1,2]", 422),
    ("body is null", "POST", "/v1/predict", b"null", 422),
    ("text is a number", "POST", "/v1/predict", b'{"task":"a","text":5}', 422),
    ("inputs is an object", "POST", "/v1/predict", b'{"inputs":{"task":"a"}}', 422),
    ("5000-digit integer", "POST", "/v1/predict", b'{"task":"a","text":' + b"9" * 5000 + b"}", 400),
    ("1e400 (infinity)", "POST", "/v1/predict", b'{"task":"a","text":1e400}', 422),
    ("NaN literal", "POST", "/v1/predict", b'{"task":"a","text":NaN}', 422),
    ("nesting depth 100000", "POST", "/v1/predict", b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
    ("extra field with surrogate name", "POST", "/v1/predict", _raw('{"task":"a","text":"x","\\ud800":1}'), 422),
    ("generate temperature 1e400", "POST", "/v1/generate", b'{"task":"a","prompt":"x","temperature":1e400}', 422),
    ("load path lone surrogate", "POST", "/v1/adapters", _raw('{"name":"s1","path":"\\ud800"}'), 422),
    ("load name lone surrogate", "POST", "/v1/adapters", _raw('{"name":"\\ud800","path":"a"}'), 422),
    ("load path NUL", "POST", "/v1/adapters", _raw('{"name":"n1","path":"a\\u0000b"}'), 422),
    ("load name NUL", "POST", "/v1/adapters", _raw('{"name":"n\\u0000","path":"a"}'), 422),
    ("load path of 5000 chars", "POST", "/v1/adapters", json.dumps({"name": "l1", "path": "x/" * 2500}).encode(), 422),
    ("load path component of 300 chars", "POST", "/v1/adapters",
     json.dumps({"name": "l2", "path": "x" * 300}).encode(), 422),
    ("load path of 19 x 200-char components", "POST", "/v1/adapters",
     json.dumps({"name": "l3", "path": "/".join(["y" * 200] * 19)}).encode(), 404),
    ("load symlink loop", "POST", "/v1/adapters", b'{"name":"lp","path":"loop"}', 400),
    ("load two-link loop", "POST", "/v1/adapters", b'{"name":"lp2","path":"loop2/x"}', 400),
    ("load path is a file", "POST", "/v1/adapters", b'{"name":"f1","path":"a/adapter_config.json"}', 400),
    ("load hub_id surrogate", "POST", "/v1/adapters", _raw('{"name":"h2","hub_id":"us\\ud800/repo"}'), 422),
    ("load hub_id NUL", "POST", "/v1/adapters", _raw('{"name":"h3","hub_id":"us\\u0000er/repo"}'), 422),
    ("load hub_id with ..", "POST", "/v1/adapters", b'{"name":"h5","hub_id":"../etc"}', 422),
    ("load revision NUL", "POST", "/v1/adapters", _raw('{"name":"h4","hub_id":"user/x","revision":"m\\u0000"}'), 422),
    ("load label_names surrogate", "POST", "/v1/adapters",
     _raw('{"name":"ln","path":"a","label_names":["\\ud800","b"]}'), 422),
    ("load label_names numbers", "POST", "/v1/adapters", b'{"name":"ln2","path":"a","label_names":[1,2]}', 422),
    ("load name with slash", "POST", "/v1/adapters", b'{"name":"x/y","path":"a"}', 422),
    ("load non-UTF-8 body", "POST", "/v1/adapters", b'{"name":"\xff","path":"a"}', 400),
    ("delete %ED%A0%80 (surrogate bytes)", "DELETE", "/v1/adapters/%ED%A0%80", b"", 404),
    ("delete %FF", "DELETE", "/v1/adapters/%FF", b"", 404),
    ("delete name with NUL", "DELETE", "/v1/adapters/a%00", b"", 404),
    ("delete 5000-char name", "DELETE", "/v1/adapters/" + "x" * 5000, b"", 404),
]


@pytest.mark.parametrize(("label", "method", "url", "body", "status"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_4xx_and_the_connection_stays_usable(
    client: httpx.Client, engine: MultiTaskEngine, label: str, method: str, url: str, body: bytes, status: int
) -> None:
    resp = client.request(method, url, content=body, headers={**JSON, **AUTH})
    assert resp.status_code == status, (label, resp.text)
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail
    assert resp.headers.get("connection", "").lower() != "close"
    ok = client.post("/v1/predict", json={"task": "a", "text": "still here"})  # same keep-alive connection
    assert ok.status_code == 200
    assert engine.tasks() == ["a"]


def test_internal_error_keeps_the_connection(client: httpx.Client, engine: MultiTaskEngine,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("kaboom \ud800")  # even an unencodable message is answered as JSON

    monkeypatch.setattr(engine, "adapters", broken)
    resp = client.get("/v1/adapters")
    assert resp.status_code == 500 and "kaboom" in resp.json()["detail"]
    monkeypatch.undo()
    assert client.get("/v1/adapters").status_code == 200


@pytest.mark.parametrize("path", ["linkedfiles", "HUB_ROOT/rev"])
def test_files_resolving_outside_the_roots_are_403(client: httpx.Client, engine: MultiTaskEngine,
                                                   world: dict[str, Path], path: str) -> None:
    path = path.replace("HUB_ROOT", str(world["hub_root"]))
    resp = client.post("/v1/adapters", json={"name": "escaped", "path": path}, headers=AUTH)
    assert resp.status_code == 403, resp.text
    detail = resp.json()["detail"]
    assert "outside" in detail or "symlink" in detail  # a linked file is refused as one (files/validate.py)
    assert str(world["tmp"]) not in detail  # no server path (issue 30)
    assert engine.tasks() == ["a"]


def test_hub_id_is_never_read_from_disk(client: httpx.Client, engine: MultiTaskEngine, world: dict[str, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(world["tmp"])
    assert (Path(NOT_A_REPO) / "adapter_config.json").is_file()  # a loadable folder under that name, here and
    assert (world["root"] / NOT_A_REPO / "adapter_config.json").is_file()  # inside the root
    resp = client.post("/v1/adapters", json={"name": "hubbed", "hub_id": NOT_A_REPO}, headers=AUTH)
    assert resp.status_code == 422 and "Hub" in resp.json()["detail"], resp.text
    assert engine.tasks() == ["a"]
    resp = client.post("/v1/adapters", json={"name": "pathed", "path": NOT_A_REPO}, headers=AUTH)
    assert resp.status_code == 201, resp.text  # as a path it is the folder inside the root
    assert client.delete("/v1/adapters/pathed", headers=AUTH).status_code == 200


def test_admin_token(client: httpx.Client, engine: MultiTaskEngine) -> None:
    body = {"name": "tok", "path": "spare"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": "Bearer"}, {"Authorization": f"Bearer {TOKEN}x"}):
        resp = client.post("/v1/adapters", json=body, headers=headers)
        assert resp.status_code == 401, (headers, resp.text)
        assert resp.headers["www-authenticate"].startswith("Bearer")
        assert TOKEN not in resp.text
    assert "tok" not in engine.tasks()
    assert client.post("/v1/adapters", json=body, headers=AUTH).status_code == 201
    assert client.delete("/v1/adapters/tok").status_code == 401
    assert "tok" in engine.tasks()
    assert client.delete("/v1/adapters/tok", headers=AUTH).status_code == 200
    assert client.get("/v1/adapters").status_code == 200  # reads and inference need no token
    assert client.post("/v1/predict", json={"task": "a", "text": "hi"}).status_code == 200
    with pytest.raises(ValueError, match="empty"):
        create_app(engine, admin_token=" ")


def test_predict_latency_during_hot_loads(live: LiveServer, engine: MultiTaskEngine) -> None:
    """Predict requests keep being answered while another client hot-loads and unloads adapters."""
    stop = threading.Event()
    loads: list[float] = []

    def loader() -> None:
        with httpx.Client(base_url=live.url, timeout=60, headers=AUTH) as c:
            i = 0
            while not stop.is_set():
                t0 = time.perf_counter()
                resp = c.post("/v1/adapters", json={"name": f"hot{i}", "path": "spare"})
                assert resp.status_code == 201, resp.text
                loads.append(time.perf_counter() - t0)
                assert c.delete(f"/v1/adapters/hot{i}").status_code == 200
                i += 1

    def measure(seconds: float) -> list[float]:
        out: list[float] = []
        with httpx.Client(base_url=live.url, timeout=60) as c:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                t0 = time.perf_counter()
                assert c.post("/v1/predict", json={"task": "a", "text": "a steady stream"}).status_code == 200
                out.append(time.perf_counter() - t0)
        return out

    quiet = measure(2.0)
    thread = threading.Thread(target=loader)
    thread.start()
    try:
        busy = measure(4.0)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert loads and len(busy) > 10

    def pct(xs: list[float], q: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1000

    print(f"\npredict quiet p50 {pct(quiet, .5):.1f} ms p99 {pct(quiet, .99):.1f} ms; during {len(loads)} hot loads "
          f"p50 {pct(busy, .5):.1f} ms p99 {pct(busy, .99):.1f} ms; load median {statistics.median(loads)*1000:.1f} ms")
    assert engine.tasks() == ["a"]


def test_cli_admin_token_from_the_environment_is_required_and_never_logged(world: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "BITFIT_PEFT_ADMIN_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "bitfit_peft.cli", "serve", "--base", str(world["base"]), "--adapter",
           f"a={world['root'] / 'a'}", "--adapter-root", str(world["root"]), "--port", str(port), "--device", "cpu",
           "--log-level", "debug"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        body = {"name": "b", "path": "spare"}
        assert httpx.post(f"{url}/v1/adapters", json=body, timeout=60).status_code == 401
        assert httpx.post(f"{url}/v1/adapters", json=body, headers=AUTH, timeout=60).status_code == 201
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert TOKEN not in log.read_text()


def test_cli_admin_token_flags(world: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from bitfit_peft.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--help"], env={"BITFIT_PEFT_ADMIN_TOKEN": TOKEN, "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for flag in ("--admin-token", "BITFIT_PEFT_ADMIN_TOKEN", "--ray", "--replicas", "--ray-address"):
        assert flag in result.output
    assert TOKEN not in result.output  # the help never shows the value from the environment
    result = runner.invoke(app, ["serve", "--base", str(world["base"]), "--adapter", f"a={world['root'] / 'a'}",
                                 "--admin-token", " "])
    assert result.exit_code == 2 and "empty" in result.output, result.output
