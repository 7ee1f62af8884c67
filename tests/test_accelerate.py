"""BitFit on Accelerate-dispatched models: explicit device maps with CPU- and disk-offloaded modules (CPU only).

Reference for every check: the same base loaded without a device map, with the same adapter.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from peft import PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification

import bitfit_peft
from bitfit_peft import BitFitConfig, BitFitError
from bitfit_peft.serving.engine import MultiTaskEngine

DEVICE_MAP = {
    "bert.embeddings": "cpu",
    "bert.encoder.layer.0": "cpu",
    "bert.encoder.layer.1": "disk",
    "bert.pooler": "disk",
    "classifier": "cpu",
}
IDS = torch.tensor([[2, 10, 11, 12, 3], [2, 20, 21, 3, 0]])
MASK = (IDS != 0).long()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A saved tiny BERT classifier and a BitFit adapter with large random deltas + a perturbed head."""
    root = tmp_path_factory.mktemp("accelerate")
    base_dir, adapter_dir = root / "base", root / "adapter"
    make_tiny_model("bert", task="seq_cls").save_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir)
    peft_model = get_peft_model(model, BitFitConfig(task_type="SEQ_CLS"))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def _save_adapter(base: torch.nn.Module, folder: Path, seed: int) -> Path:
    peft_model = get_peft_model(base, BitFitConfig(task_type="SEQ_CLS"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def more_adapters(dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A second adapter of the same base, and one trained on a base that differs only in the pooler, which
    ``DEVICE_MAP`` puts on disk (so refusing it needs the offloaded values)."""
    base_dir, _ = dirs
    root = tmp_path_factory.mktemp("accelerate-more")
    second = _save_adapter(AutoModelForSequenceClassification.from_pretrained(base_dir), root / "second", seed=1)
    other = AutoModelForSequenceClassification.from_pretrained(base_dir)
    with torch.no_grad():
        other.bert.pooler.dense.weight.add_(0.5)
        other.bert.pooler.dense.bias.add_(0.5)
    return second, _save_adapter(other, root / "wrong-base", seed=2)


def _offloaded(base_dir: Path, folder: Path, device_map: dict[str, str] | None = None) -> torch.nn.Module:
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir, device_map=device_map or DEVICE_MAP, offload_folder=str(folder), low_cpu_mem_usage=True
    )
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert any(p.device.type == "meta" for p in model.parameters()), "nothing was offloaded to disk"
    return model.eval()


def _out(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def _reference(base_dir: Path, adapter_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    base = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    plain = _out(base)
    adapted = _out(PeftModel.from_pretrained(base, adapter_dir).eval())
    assert (adapted[1] - plain[1]).abs().max() > 1e-2  # the adapter really changes the output
    return adapted


def _peft_device_map() -> dict[str, str]:
    """PEFT re-dispatches a cpu/disk model after loading; without a map it infers "auto" (= all on CPU here)."""
    return {f"base_model.model.{k}": v for k, v in DEVICE_MAP.items()}


def _assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- loading
def test_from_pretrained_onto_disk_offloaded_model(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    base_dir, adapter_dir = dirs
    model = _offloaded(base_dir, tmp_path / "offload")
    loaded = PeftModel.from_pretrained(
        model, adapter_dir, device_map=_peft_device_map(), offload_folder=str(tmp_path / "peft-offload")
    )
    _assert_same(_out(loaded.eval()), _reference(base_dir, adapter_dir))


def test_from_pretrained_onto_disk_offloaded_model_without_fingerprint(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """Same as above with the fingerprint check switched off; the disk-offloaded pooler's delta must stay on
    ``meta`` (loaded by the offload hook, not materialised)."""
    base_dir, adapter_dir = dirs
    model = _offloaded(base_dir, tmp_path / "offload")
    config = bitfit_peft.allow_base_mismatch(BitFitConfig.from_pretrained(adapter_dir))
    loaded = PeftModel.from_pretrained(
        model,
        adapter_dir,
        config=config,
        device_map=_peft_device_map(),
        offload_folder=str(tmp_path / "peft-offload"),
    ).eval()
    deltas = dict(loaded.named_parameters())
    assert deltas["base_model.model.bert.pooler.dense.bitfit_delta.default"].device.type == "meta"
    _assert_same(_out(loaded), _reference(base_dir, adapter_dir))


def test_load_adapter_onto_offloaded_peft_model(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """Works today: wrap the offloaded model first (hooks stay), then ``load_adapter`` the saved deltas."""
    base_dir, adapter_dir = dirs
    model = _offloaded(base_dir, tmp_path / "offload")
    peft_model = get_peft_model(model, BitFitConfig(task_type="SEQ_CLS"), adapter_name="scratch")
    peft_model.load_adapter(adapter_dir, adapter_name="task_a")  # fingerprint checked via the offload hooks
    peft_model.set_adapter("task_a")
    peft_model.delete_adapter("scratch")
    _assert_same(_out(peft_model.eval()), _reference(base_dir, adapter_dir))


# ---------------------------------------------------------------------------------------------- training
def test_get_peft_model_on_offloaded_model_trains_and_saves(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    base_dir, _ = dirs
    model = _offloaded(base_dir, tmp_path / "offload")
    reference = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    torch.manual_seed(3)
    offloaded = get_peft_model(model, BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    torch.manual_seed(3)
    plain = get_peft_model(reference, BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    _assert_same(_out(offloaded), _out(plain))

    offloaded.train()
    out = offloaded(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 1]))
    out.loss.backward()
    grads = {n: p.grad for n, p in offloaded.named_parameters() if p.requires_grad}
    pooler = "base_model.model.bert.pooler.dense.bitfit_delta.default"  # a disk-offloaded module
    assert grads[pooler] is not None and grads[pooler].abs().sum() > 0
    assert all(p.device.type == "cpu" for n, p in offloaded.named_parameters() if p.requires_grad)

    offloaded.save_pretrained(tmp_path / "a")
    plain.save_pretrained(tmp_path / "b")
    fp_a = BitFitConfig.from_pretrained(tmp_path / "a").base_fingerprint
    assert fp_a is not None and fp_a == BitFitConfig.from_pretrained(tmp_path / "b").base_fingerprint


# ---------------------------------------------------------------------------------------------- errors
def test_unplaced_module_is_a_clear_error(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    base_dir, adapter_dir = dirs
    missing = {k: v for k, v in DEVICE_MAP.items() if k != "classifier"}
    with pytest.raises(ValueError, match=r"does not give any device for the following parameters: classifier"):
        _offloaded(base_dir, tmp_path / "offload", device_map=missing)

    model = _offloaded(base_dir, tmp_path / "offload2")
    peft_map = {k: v for k, v in _peft_device_map().items() if not k.endswith("classifier")}
    config = bitfit_peft.allow_base_mismatch(BitFitConfig.from_pretrained(adapter_dir))
    with pytest.raises(ValueError, match=r"does not give any device for the following parameters"):
        PeftModel.from_pretrained(
            model, adapter_dir, config=config, device_map=peft_map, offload_folder=str(tmp_path / "po")
        )


# ---------------------------------------------------------------------------------------------- no dispatch arguments
# ``PeftModel.from_pretrained(base, adapter)`` with nothing else: the base keeps its own dispatch (hooks, weights maps,
# offload folder), the deltas live in memory on each hooked module's execution device, and no file is written.
def _files(*folders: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for f in folders for p in f.rglob("*"))


@contextlib.contextmanager
def _fingerprint_checked() -> Iterator[None]:
    """Fails if the base fingerprint check is skipped (offloaded values unreadable without the hooks)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Base fingerprint not checked")
        yield


def _still_offloaded(model: torch.nn.Module, n_meta: int) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert set(base.hf_device_map.values()) == {"cpu", "disk"}
    assert sum(p.device.type == "meta" for p in model.parameters()) == n_meta  # nothing materialised
    deltas = [p for n, p in model.named_parameters() if ".bitfit_delta." in n]
    assert deltas and all(p.device.type == "cpu" for p in deltas)  # in memory, on the execution device


def test_from_pretrained_no_arguments_onto_offloaded_base(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    base_dir, adapter_dir = dirs
    model = _offloaded(base_dir, tmp_path / "offload")
    n_meta = sum(p.device.type == "meta" for p in model.parameters())
    with _fingerprint_checked():
        loaded = PeftModel.from_pretrained(model, adapter_dir).eval()
    _still_offloaded(loaded, n_meta)
    assert hasattr(loaded.base_model.model.bert.pooler.dense.base_layer, "_hf_hook")  # PEFT did not strip hooks
    _assert_same(_out(loaded), _reference(base_dir, adapter_dir))


def test_load_adapter_no_arguments_onto_offloaded_base(
    dirs: tuple[Path, Path], more_adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    base_dir, adapter_dir = dirs
    second, _ = more_adapters
    model = _offloaded(base_dir, tmp_path / "offload")
    n_meta = sum(p.device.type == "meta" for p in model.parameters())
    loaded = PeftModel.from_pretrained(model, adapter_dir)
    with _fingerprint_checked():
        loaded.load_adapter(second, adapter_name="task_b")
    loaded.set_adapter("task_b")
    _still_offloaded(loaded, n_meta)
    _assert_same(_out(loaded.eval()), _reference(base_dir, second))
    loaded.set_adapter("default")
    _assert_same(_out(loaded), _reference(base_dir, adapter_dir))
    with torch.no_grad():  # a mixed batch (what the serving engine runs) routes through the hooked modules too
        mixed = loaded(input_ids=IDS, attention_mask=MASK, adapter_names=["default", "task_b"]).logits
    torch.testing.assert_close(mixed[1], _reference(base_dir, second)[0][1], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[0], _reference(base_dir, adapter_dir)[0][0], rtol=0, atol=1e-5)


def test_no_argument_loads_write_no_file(
    dirs: tuple[Path, Path], more_adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    base_dir, adapter_dir = dirs
    second, _ = more_adapters
    offload = tmp_path / "offload"
    model = _offloaded(base_dir, offload)
    folders = (offload, base_dir, adapter_dir, second.parent, tmp_path)
    before = _files(*folders)
    loaded = PeftModel.from_pretrained(model, adapter_dir)
    loaded.load_adapter(second, adapter_name="task_b")
    _out(loaded.eval())
    assert _files(*folders) == before


def test_wrong_base_refused_on_offloaded_base(
    dirs: tuple[Path, Path], more_adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    """The fingerprint reads the disk-offloaded pooler through its hook's weights map; the refused load leaves the
    dispatched model as it was, and it still loads the right adapter."""
    base_dir, adapter_dir = dirs
    _, wrong = more_adapters
    model = _offloaded(base_dir, tmp_path / "offload")
    n_meta = sum(p.device.type == "meta" for p in model.parameters())
    plain = _out(model)
    with pytest.raises(BitFitError, match="trained on a different base model"):
        PeftModel.from_pretrained(model, wrong)
    assert not any(".bitfit_delta." in n for n, _ in model.named_parameters())
    assert sum(p.device.type == "meta" for p in model.parameters()) == n_meta
    _assert_same(_out(model), plain)
    loaded = PeftModel.from_pretrained(model, adapter_dir)
    with pytest.raises(BitFitError, match="trained on a different base model"):
        loaded.load_adapter(wrong, adapter_name="wrong")
    assert list(loaded.peft_config) == ["default"]
    _assert_same(_out(loaded.eval()), _reference(base_dir, adapter_dir))


def test_engine_on_offloaded_base(dirs: tuple[Path, Path], more_adapters: tuple[Path, Path], tmp_path: Path) -> None:
    base_dir, adapter_dir = dirs
    second, _ = more_adapters
    requests = [("a", "hello world"), ("b", "good movie!"), ("__base__", "abc"), ("a", "x y z")]
    tokenizer = make_tiny_tokenizer()
    engines = []
    for base in (AutoModelForSequenceClassification.from_pretrained(base_dir), _offloaded(base_dir, tmp_path / "o")):
        engine = MultiTaskEngine(base, tokenizer=tokenizer, device="cpu")
        engine.add_adapter("a", adapter_dir)
        engine.add_adapter("b", second)
        engines.append(engine)
    want, got = (engine.predict(requests) for engine in engines)
    assert [p.label for p in got] == [p.label for p in want]
    for g, w in zip(got, want, strict=True):
        assert g.probabilities == pytest.approx(w.probabilities, abs=1e-5)
