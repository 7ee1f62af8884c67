"""The engine's adapter room: direct commits equal PEFT's load, refusals leave the engine exactly as it was, loads
do not hold the engine lock, Hub ids are never read from disk, files stay inside the allowed folders."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model
from peft import PeftModel
from safetensors.torch import load_file, save_file
from test_serving import TEXTS, _save_adapter
from transformers import AutoModelForSequenceClassification

from bitfit_peft import BitFitConfig, BitFitError
from bitfit_peft.serving import (
    AdapterPathError,
    DuplicateAdapterError,
    EngineError,
    MultiTaskEngine,
    UnknownTaskError,
    adapter_files,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("lifecycle")
    base = save_tiny_model(tmp / "base", "bert", task="base")
    root = tmp / "root"
    root.mkdir()
    paths = {"tmp": tmp, "base": base, "root": root}
    for i, labels in enumerate((2, 3, 2, 4, 2)):
        paths[f"a{i}"] = _save_adapter(base, root / f"a{i}", num_labels=labels, seed=10 + i)
    return paths


def _engine(world: dict[str, Path]) -> MultiTaskEngine:
    return MultiTaskEngine(str(world["base"]), task_type="SEQ_CLS", device="cpu", dtype="float32")


def _snapshot(engine: MultiTaskEngine) -> tuple:
    """Everything a load could change: module tree (types), every tensor (by identity and value), PEFT's names."""
    model = engine.model
    modules = tuple((n, type(m).__name__) for n, m in model.named_modules())
    tensors = {n: (id(t), t.detach().clone()) for n, t in model.state_dict(keep_vars=True).items()}
    peft = tuple(getattr(model, "peft_config", {}))
    return modules, tensors, peft, tuple(engine.tasks())


def _assert_same(before: tuple, after: tuple) -> None:
    assert before[0] == after[0] and before[2] == after[2] and before[3] == after[3]
    assert before[1].keys() == after[1].keys()
    for name, (ident, value) in before[1].items():
        assert after[1][name][0] == ident and torch.equal(after[1][name][1], value), name


def _logits(engine: MultiTaskEngine, task: str) -> torch.Tensor:
    return torch.tensor([p.probabilities[p.label] for p in engine.predict([(task, t) for t in TEXTS])])


def test_direct_commit_equals_peft_load_and_single_models(world: dict[str, Path]) -> None:
    engine = _engine(world)
    for i in range(5):
        engine.add_adapter(f"t{i}", world[f"a{i}"])
    assert len(engine.registry.layouts) == 1  # one layout: adapters 1..4 were committed directly
    mixed = engine.predict([(f"t{i % 5}", TEXTS[i % len(TEXTS)]) for i in range(10)])
    for i, pred in enumerate(mixed):
        k = i % 5
        model = AutoModelForSequenceClassification.from_pretrained(world["base"], num_labels=(2, 3, 2, 4, 2)[k])
        ref = PeftModel.from_pretrained(model, world[f"a{k}"]).eval()
        batch = engine.tokenizer([TEXTS[i % len(TEXTS)]], return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(ref(**batch).logits[0], -1)
        assert torch.allclose(torch.tensor(list(pred.probabilities.values())), probs, atol=1e-5)
    info = {a.name: a for a in engine.adapters()}
    assert info["t3"].num_labels == 4 and info["t1"].delta_bytes == info["t0"].delta_bytes > 0


@pytest.mark.parametrize("damage", ["base_weight", "missing_delta", "wrong_shape", "nan", "int_delta", "head_in"])
def test_refused_file_of_a_known_layout_leaves_engine_unchanged(world: dict[str, Path], tmp_path: Path,
                                                               damage: str) -> None:
    engine = _engine(world)
    engine.add_adapter("first", world["a0"])
    before = _snapshot(engine)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((world["a1"] / "adapter_config.json").read_text())
    state = load_file(str(world["a1"] / "adapter_model.safetensors"))
    delta_key = next(k for k in state if k.endswith("bitfit_delta"))
    if damage == "base_weight":
        state["base_model.model.bert.encoder.layer.0.attention.self.query.weight"] = torch.zeros(32, 32)
    elif damage == "missing_delta":
        del state[delta_key]
    elif damage == "wrong_shape":
        state[delta_key] = torch.zeros(state[delta_key].numel() + 1)
    elif damage == "nan":
        state[delta_key] = torch.full_like(state[delta_key], float("nan"))
    elif damage == "int_delta":
        state[delta_key] = torch.zeros_like(state[delta_key], dtype=torch.int32)
    else:  # a head whose input size is not the model's
        key = next(k for k in state if k.endswith("classifier.weight"))
        state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    save_file(state, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises((BitFitError, EngineError), match="does not fit|NaN|non-float|not a float|shape"):
        engine.add_adapter("bad", bad)
    _assert_same(before, _snapshot(engine))
    assert engine.predict([("first", "still serving")])[0].task == "first"


def test_failed_load_of_a_new_layout_unwraps_what_it_wrapped(world: dict[str, Path], tmp_path: Path) -> None:
    base = world["base"]
    narrow = tmp_path / "narrow"
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    from peft import get_peft_model

    get_peft_model(model, BitFitConfig(task_type="SEQ_CLS", bias_terms=["query"])).save_pretrained(narrow)
    engine = _engine(world)
    engine.add_adapter("narrow", narrow)
    before = _snapshot(engine)
    wide = tmp_path / "wide"  # targets every bias (new modules to wrap), one delta broken
    (wide).mkdir()
    (wide / "adapter_config.json").write_text((world["a0"] / "adapter_config.json").read_text())
    state = load_file(str(world["a0"] / "adapter_model.safetensors"))
    key = next(k for k in state if k.endswith("output.dense.bitfit_delta"))
    state[key] = torch.full_like(state[key], float("inf"))
    save_file(state, str(wide / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BitFitError):
        engine.add_adapter("wide", wide)
    _assert_same(before, _snapshot(engine))
    engine.add_adapter("wide", world["a0"])  # the same layout, intact, loads afterwards
    assert set(engine.tasks()) == {"narrow", "wide"}


def test_first_load_failure_leaves_the_bare_base(world: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(world)
    before = _snapshot(engine)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((world["a0"] / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises((BitFitError, EngineError)):
        engine.add_adapter("x", broken)
    _assert_same(before, _snapshot(engine))
    assert engine.model is engine.registry.base


def test_prepare_does_not_hold_the_lock(world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(world)
    engine.add_adapter("t0", world["a0"])
    entered, release = threading.Event(), threading.Event()
    original = adapter_files.read_task_metadata

    def slow_metadata(path: Path) -> dict:  # a slow (or hostile) folder: parsing takes long
        entered.set()
        release.wait(10)
        return original(path)

    monkeypatch.setattr(adapter_files, "read_task_metadata", slow_metadata)
    loader = threading.Thread(target=engine.add_adapter, args=("t1", world["a1"]))
    loader.start()
    assert entered.wait(10)
    started = time.perf_counter()
    assert engine.predict([("t0", "serving goes on")])[0].task == "t0"  # not blocked by the load
    assert time.perf_counter() - started < 5
    release.set()
    loader.join(10)
    assert set(engine.tasks()) == {"t0", "t1"}


def test_remove_readd_and_remove_the_active_adapter(world: dict[str, Path]) -> None:
    engine = _engine(world)
    for i in range(3):
        engine.add_adapter(f"t{i}", world[f"a{i}"])
    reference = _logits(engine, "t2")
    engine.remove_adapter("t0")  # PEFT's active adapter
    assert engine.model.active_adapter != "t0" and "t0" not in engine.tasks()
    assert torch.allclose(_logits(engine, "t2"), reference)
    engine.add_adapter("t0", world["a3"])  # same name, another adapter: no stale state
    assert engine.adapters()[-1].num_labels == 4
    with pytest.raises(DuplicateAdapterError):
        engine.add_adapter("t0", world["a1"])
    for name in ("t1", "t2", "t0"):
        engine.remove_adapter(name)
    with pytest.raises(UnknownTaskError):
        engine.predict([("t1", "gone")])
    engine.add_adapter("again", world["a2"])
    assert torch.allclose(_logits(engine, "again"), reference)
    assert len(engine.model.peft_config) == 1  # the retired last adapter was dropped by the next load


def test_hub_ids_are_never_read_from_disk(world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(world["tmp"])
    lookalike = world["tmp"] / "user" / "repo"  # a local folder named like the Hub id
    lookalike.mkdir(parents=True, exist_ok=True)
    for f in world["a0"].iterdir():
        (lookalike / f.name).write_bytes(f.read_bytes())
    engine = _engine(world)
    with pytest.raises(EngineError, match="Hub is disabled"):
        engine.add_adapter("x", "user/repo", hub=True, allow_hub=False)
    with pytest.raises(EngineError, match="not a Hugging Face Hub repo id"):
        engine.add_adapter("x", "../etc", hub=True)
    assert engine.tasks() == []
    engine.add_adapter("x", "user/repo", hub=False)  # said to be a path: read from disk
    assert engine.tasks() == ["x"]


def test_every_file_must_stay_inside_the_allowed_folders(world: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(world)
    root = world["root"]
    outside = world["a1"]  # a real adapter, outside the only allowed root below
    linked = root.parent / "linked"
    linked.mkdir(exist_ok=True)
    (linked / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    (linked / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    cases = {
        "outside the roots": (world["a0"], [tmp_path]),
        "files linked out of the folder": (linked, [root.parent]),
        "a NUL byte": ("a\x00b", [root]),
        "too long": ("x" * 5000, [root]),
    }
    loop = root / "loop"
    if not loop.is_symlink():
        loop.symlink_to(loop)
    cases["a symlink loop"] = (loop, [root])
    for what, (path, within) in cases.items():
        with pytest.raises(AdapterPathError):
            engine.add_adapter("x", path, hub=False, within=within)
        assert engine.tasks() == [], what
    engine.add_adapter("x", world["a0"], hub=False, within=[root])
    assert engine.tasks() == ["x"]


def test_equal_configs_share_one_object_and_deltas_are_packed(world: dict[str, Path]) -> None:
    engine = _engine(world)
    for i in (0, 2, 4):
        engine.add_adapter(f"t{i}", world[f"a{i}"])
    internals = [engine.registry.get(n).internal for n in ("t2", "t4")]
    configs = [engine.model.peft_config[i] for i in internals]
    assert configs[0] is configs[1]
    layers = list(engine.registry.get("t2").layout.deltas.values())
    storages = {layer.delta_of(internals[0]).untyped_storage().data_ptr() for layer in layers}
    assert len(storages) == 1  # one allocation per adapter


def test_peft_load_adapter_failure_unwraps_new_targets(world: dict[str, Path], tmp_path: Path) -> None:
    """The same guarantee for plain ``PeftModel.load_adapter``: a refused adapter with new targets wraps nothing."""
    from peft import get_peft_model

    model = AutoModelForSequenceClassification.from_pretrained(world["base"], num_labels=2)
    peft_model = get_peft_model(model, BitFitConfig(task_type="SEQ_CLS", bias_terms=["query"]))
    before = [(n, type(m).__name__) for n, m in peft_model.named_modules()]
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "adapter_config.json").write_text((world["a0"] / "adapter_config.json").read_text())
    state = load_file(str(world["a0"] / "adapter_model.safetensors"))
    state["base_model.model.bert.pooler.dense.weight"] = torch.zeros(32, 32)  # a base weight: refused
    save_file(state, str(wide / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BitFitError):
        peft_model.load_adapter(str(wide), adapter_name="wide")
    assert [(n, type(m).__name__) for n, m in peft_model.named_modules()] == before


def test_max_resident_evicts_lru_and_reloads_on_first_request(world: dict[str, Path]) -> None:
    engine = MultiTaskEngine(str(world["base"]), task_type="SEQ_CLS", device="cpu", dtype="float32",
                             max_resident=2, adapter_roots=[world["root"]])
    full = _engine(world)
    for i in range(4):
        full.add_adapter(f"a{i}", world[f"a{i}"])
    expected = {f"a{i}": full.predict([(f"a{i}", TEXTS[0])])[0].probabilities for i in range(4)}
    engine.add_adapter("a0", world["a0"])
    engine.add_adapter("a1", world["a1"])
    engine.predict([("a0", TEXTS[0])])  # a0 is now the most recently used
    engine.add_adapter("a2", world["a2"])  # evicts a1, the least recently used
    assert sorted(engine.tasks()) == ["a0", "a2"] and engine.has_task("a1")
    for name in ("a1", "a3", "a0"):  # a1: known, evicted; a3: only in the adapter roots
        got = engine.predict([(name, TEXTS[0])])[0].probabilities
        assert got == pytest.approx(expected[name], abs=1e-5)
        assert len(engine.tasks()) <= 2
    mixed = engine.predict([("a2", TEXTS[0]), ("a1", TEXTS[0])])  # both resident at once for the batch
    assert [p.probabilities for p in mixed] == [pytest.approx(expected[n], abs=1e-5) for n in ("a2", "a1")]
    over = engine.predict([("a0", TEXTS[0]), ("a1", TEXTS[0]), ("a2", TEXTS[0])])  # 3 > K=2: served in rounds
    assert [p.probabilities for p in over] == [pytest.approx(expected[n], abs=1e-5) for n in ("a0", "a1", "a2")]
    assert len(engine.tasks()) <= 2
    assert not engine.has_task("nowhere")
    with pytest.raises(UnknownTaskError):
        engine.predict([("nowhere", "x")])
    engine.remove_adapter("a1")  # an explicit remove forgets; the roots still hold a1, so it can come back
    assert engine.has_task("a1")
    with pytest.raises(EngineError, match="positive integer"):
        MultiTaskEngine(str(world["base"]), task_type="SEQ_CLS", device="cpu", max_resident=0)


def test_server_with_max_resident_serves_adapters_from_the_roots(world: dict[str, Path]) -> None:
    from fastapi.testclient import TestClient

    from bitfit_peft.serving import create_app

    engine = MultiTaskEngine(str(world["base"]), task_type="SEQ_CLS", device="cpu", dtype="float32",
                             max_resident=2, adapter_roots=[world["root"]])
    with TestClient(create_app(engine, adapter_roots=[world["root"]])) as client:
        for name in ("a0", "a1", "a2", "a3", "a0"):  # each loaded on first request, at most 2 in memory
            reply = client.post("/v1/predict", json={"task": name, "text": TEXTS[0]})
            assert reply.status_code == 200, reply.text
            assert len(engine.tasks()) <= 2
        assert client.post("/v1/predict", json={"task": "nowhere", "text": "x"}).status_code == 404
        reply = client.post("/v1/adapters", json={"name": "a4", "path": "a4"})  # known in the roots, not resident
        assert reply.status_code == 201, reply.text
        assert client.post("/v1/adapters", json={"name": "a4", "path": "a4"}).status_code == 409
