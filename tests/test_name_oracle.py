"""No existence oracle (issue 30, point 5): a task or adapter name can't be used to ask whether a folder exists.

Against the plain server with loading on demand from an adapter root, every hostile name (``..``, ``/``, ``\\``,
absolute, NUL, a link out of the root) that points at an existing folder outside the root gets the byte-identical
status and body (the name itself aside) as one that points at nothing, on every endpoint that takes a name; and a
name that points at a FIFO outside the root is answered at once (nothing opened it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import save_tiny_model
from test_serving import LiveServer, _save_adapter

from bitfit_peft.serving import MultiTaskEngine, create_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("oracle")
    base = save_tiny_model(tmp / "base", "bert", task="base")
    root, outside = tmp / "root", tmp / "outside"
    root.mkdir()
    outside.mkdir()
    _save_adapter(base, root / "t0", seed=1)
    _save_adapter(base, outside / "exists", seed=2)  # a real adapter, but outside the root
    (outside / "folder").mkdir()
    os.mkfifo(outside / "fifo00")  # opening it for reading would block: an answer at once proves nothing opened it
    (outside / "loop00").symlink_to(outside / "loop00")  # resolving it fails: it must not be resolved at all
    for link, target in (("lnexists", "exists"), ("lnfolder", "folder"), ("lnabsent", "absent"),
                         ("lnfifo00", "fifo00")):
        (root / link).symlink_to(outside / target)
    return {"tmp": tmp, "base": base, "root": root, "outside": outside}


@pytest.fixture(scope="module")
def url(world: dict[str, Path]) -> Iterator[str]:
    engine = MultiTaskEngine(str(world["base"]), task_type="SEQ_CLS", device="cpu", max_resident=2,
                             adapter_roots=[world["root"]])  # loading on demand: a request naming root/<name> loads
    engine.add_adapter("t0", world["root"] / "t0")
    with LiveServer(create_app(engine, max_wait_ms=5, adapter_roots=[world["root"]])) as server:
        yield server.url


def _pairs(outside: Path) -> list[tuple[str, str]]:
    """(points at something outside the root, points at nothing): the same shape and length, another target."""
    return [
        ("../outside/exists", "../outside/absent"),
        ("../outside/folder", "../outside/absent"),
        ("t0/../../outside/exists", "t0/../../outside/absent"),
        ("..\\outside\\exists", "..\\outside\\absent"),
        (str(outside / "exists"), str(outside / "absent")),
        (f"{outside}/exists/.", f"{outside}/absent/."),
        (f"{outside}/fifo00", f"{outside}/absent"),
        ("exists\x00", "absent\x00"),
        ("../outside/exists\x00x", "../outside/absent\x00x"),
        ("../outside/loop00/x", "../outside/absent/x"),
        ("~root/exists", "~zzzz/exists"),  # a user's home (or not): never expanded
        ("lnexists", "lnabsent"),  # valid names: links in the root that lead out of it
        ("lnfolder", "lnabsent"),
        ("lnfifo00", "lnabsent"),
    ]


def _requests(name: str) -> list[tuple[str, dict]]:
    return [
        ("/v1/predict", {"task": name, "text": "hi"}),
        ("/v1/predict", {"inputs": [{"task": "t0", "text": "hi"}, {"task": name, "text": "hi"}]}),
        ("/classify", {"model": name, "input": "hi"}),
        ("/v1/embeddings", {"model": name, "input": "hi"}),
        ("/v1/adapters", {"name": name, "path": "no-such-folder"}),
        ("/v1/adapters", {"name": "fresh", "path": name}),
        ("/v1/load_lora_adapter", {"lora_name": name, "lora_path": "no-such-folder"}),
        ("/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": name}),
    ]


def _normalized(body: str, name: str) -> str:
    """``body`` with ``name`` (as JSON and as Python's repr inside JSON write it) replaced by ``<NAME>``."""
    for shown in sorted({json.dumps(name)[1:-1], json.dumps(repr(name)[1:-1])[1:-1], name}, key=len, reverse=True):
        body = body.replace(shown, "<NAME>")
    return body


def test_names_are_no_existence_oracle(url: str, world: dict[str, Path]) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        for there, missing in _pairs(world["outside"]):
            for (path, body_there), (_, body_missing) in zip(_requests(there), _requests(missing), strict=True):
                started = time.monotonic()
                a = client.post(path, json=body_there)
                b = client.post(path, json=body_missing)
                assert time.monotonic() - started < 5, (path, there)  # nothing blocked on the FIFO
                assert a.status_code == b.status_code and a.status_code != 200, (path, there, a.text, b.text)
                assert _normalized(a.text, there) == _normalized(b.text, missing), (path, there, a.text, b.text)
                assert str(world["tmp"]) not in _normalized(a.text, there), a.text  # only the name sent echoes
        names = client.get("/v1/adapters").json()["adapters"]
        assert [a["name"] for a in names] == ["t0"]  # nothing was loaded from outside the root


def test_a_valid_name_in_the_root_still_loads_on_demand(url: str, world: dict[str, Path]) -> None:
    _save_adapter(world["base"], world["root"] / "t1", seed=3)
    resp = httpx.post(f"{url}/v1/predict", json={"task": "t1", "text": "hi"}, timeout=30)
    assert resp.status_code == 200, resp.text  # the oracle test above is not passing because nothing loads
