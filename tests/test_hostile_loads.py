"""Issue 34.1: every load path refuses the same hostile adapter folders the same way, in bounded time.

The five paths: ``PeftModel.from_pretrained``, ``PeftModel.load_adapter``, transformers' ``model.load_adapter``,
:func:`bitfit_peft.hotswap_adapter` and the serving engine's ``add_adapter``. Each refusal is a ``BitFitError`` (the
engine's path errors, which the server maps to HTTP codes, for links and FIFOs), leaves the model as it was and
leaves no trace on a fresh base.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import bitfit_peft
from bitfit_peft import BitFitConfig, BitFitError
from bitfit_peft.serving.errors import EngineError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
QUERY = "base_model.model.bert.encoder.layer.{}.attention.self.query.bitfit_delta"
GENEROUS_S = 5.0  #: a DoS regression bound, not a timing target (benchmarks/hostile_load_times.py measures)


def _trained(seed: int = 0) -> PeftModel:
    model = get_peft_model(make_tiny_model("bert", task="seq_cls", seed=0), BitFitConfig(task_type="SEQ_CLS"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.eval()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return set(now) == set(before) and all(torch.equal(now[k], v) for k, v in before.items())


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    _trained(1).save_pretrained(root / "good")
    _trained(2).save_pretrained(root / "other")
    make_tiny_model("bert", task="seq_cls", seed=0).save_pretrained(root / "base")
    make_tiny_tokenizer().save_pretrained(root / "base")
    return root / "good"


def _copy(good: Path, tmp_path: Path, name: str = "bad") -> Path:
    folder = tmp_path / name
    shutil.copytree(good, folder)
    return folder


def _edit_weights(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS)
    return folder


def _header_file(path: Path, entries: int) -> None:
    """A safetensors file declaring ``entries`` zero-size tensors (a few MB of header, no data)."""
    body = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(entries))
    raw = ("{" + body + "}").encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def _paths(good: Path) -> dict[str, Callable[[Path], object]]:
    """Each load path, as a call loading one folder (and checking the model did not change when it refuses)."""
    base_dir = good.parent / "base"

    def fresh(folder: Path) -> object:
        base = make_tiny_model("bert", task="seq_cls", seed=0)
        before, attributes = _state(base), set(vars(base))
        try:
            return PeftModel.from_pretrained(base, folder)
        except Exception:
            assert _same(base, before) and set(vars(base)) == attributes, "a failed load left a trace on the base"
            raise

    def second(folder: Path) -> object:
        model = PeftModel.from_pretrained(make_tiny_model("bert", task="seq_cls", seed=0), good)
        before = _state(model)
        try:
            return model.load_adapter(folder, adapter_name="second")
        except Exception:
            assert _same(model, before) and list(model.peft_config) == ["default"]
            raise

    def transformers_load(folder: Path) -> object:
        plain = make_tiny_model("bert", task="seq_cls", seed=0)
        before = _state(plain)
        try:
            return plain.load_adapter(str(folder))
        except Exception:
            assert _same(plain, before)
            raise

    def hotswap(folder: Path) -> object:
        model = PeftModel.from_pretrained(make_tiny_model("bert", task="seq_cls", seed=0), good)
        before = _state(model)
        try:
            return bitfit_peft.hotswap_adapter(model, str(folder), "default", torch_device="cpu")
        except Exception:
            assert _same(model, before)
            raise

    def engine(folder: Path) -> object:
        from bitfit_peft.serving.engine import MultiTaskEngine

        eng = MultiTaskEngine(str(base_dir), device="cpu")
        return eng.add_adapter("task", folder)

    return {"from_pretrained": fresh, "load_adapter": second, "transformers": transformers_load,
            "hotswap": hotswap, "engine": engine}


PATHS = ["from_pretrained", "load_adapter", "transformers", "hotswap", "engine"]


def _refused(good: Path, path: str, folder: Path, *words: str) -> float:
    """The load is refused with one line naming the file (and ``words``); returns the seconds it took."""
    start = time.perf_counter()
    with pytest.raises((BitFitError, EngineError)) as err:
        _paths(good)[path](folder)
    seconds = time.perf_counter() - start
    message = str(err.value)
    assert "\n" not in message, message
    if path != "engine":
        assert isinstance(err.value, BitFitError), (type(err.value), message)
    for word in words:
        assert word in message, (word, message)
    return seconds


# ---------------------------------------------------------------------------------------------- confinement
@pytest.mark.parametrize("path", PATHS)
def test_a_weights_file_linked_to_another_adapters_file_is_refused(good: Path, tmp_path: Path, path: str) -> None:
    folder = _copy(good, tmp_path)
    (folder / WEIGHTS).unlink()
    (folder / WEIGHTS).symlink_to(good.parent / "other" / WEIGHTS)
    _refused(good, path, folder, WEIGHTS, "symlink")


@pytest.mark.parametrize("path", PATHS)
def test_a_fifo_weights_file_is_refused_without_blocking(good: Path, tmp_path: Path, path: str) -> None:
    """In a child process: a reader blocked on a FIFO may hold the GIL, so no thread of this process could time out."""
    folder = _copy(good, tmp_path)
    (folder / WEIGHTS).unlink()
    os.mkfifo(folder / WEIGHTS)
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from pathlib import Path; "
              "import test_hostile_loads as t; "
              f"t._refused(Path({str(good)!r}), {path!r}, Path({str(folder)!r}), {WEIGHTS!r}, 'not a regular file'); "
              "print('refused')")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                              check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{path}: loading a FIFO blocked")
    assert proc.returncode == 0 and "refused" in proc.stdout, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- bounds
@pytest.mark.parametrize("path", PATHS)
def test_a_header_of_300k_tensors_is_refused_fast(good: Path, tmp_path: Path, path: str) -> None:
    folder = _copy(good, tmp_path)
    _header_file(folder / WEIGHTS, 300_000)
    assert _refused(good, path, folder, WEIGHTS) < GENEROUS_S


@pytest.mark.parametrize("path", PATHS)
def test_a_config_with_10m_layer_indices_is_refused_fast(good: Path, tmp_path: Path, path: str) -> None:
    folder = _copy(good, tmp_path)
    config = json.loads((folder / CONFIG).read_text())
    text = json.dumps({**config, "layers_to_transform": []}).replace('"layers_to_transform": []',
                                                                        '"layers_to_transform": [' + "1," * 9_999_999
                                                                        + "1]")
    (folder / CONFIG).write_text(text)
    assert _refused(good, path, folder, CONFIG) < GENEROUS_S


@pytest.mark.parametrize("path", PATHS)
def test_a_config_nested_200k_deep_is_a_bitfit_error(good: Path, tmp_path: Path, path: str) -> None:
    folder = _copy(good, tmp_path)
    (folder / CONFIG).write_text("[" * 200_000 + "]" * 200_000)
    _refused(good, path, folder, CONFIG)


@pytest.mark.parametrize("path", ["from_pretrained", "hotswap", "transformers"])
def test_unreadable_files_are_bitfit_errors(good: Path, tmp_path: Path, path: str) -> None:
    folder = _copy(good, tmp_path, "garbage")
    (folder / WEIGHTS).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson")
    _refused(good, path, folder, WEIGHTS, "corrupt")
    if path == "hotswap":  # (PeftModel's paths give PEFT's own error for a config that is not JSON, as for LoRA)
        folder = _copy(good, tmp_path, "badjson")
        (folder / CONFIG).write_text('{"peft_type": "BITFIT",')
        _refused(good, path, folder, CONFIG, "JSON")


# ---------------------------------------------------------------------------------------------- key grammar
def _stack(tensors: dict[str, torch.Tensor], index: torch.Tensor, layers: tuple[int, ...] = (0, 1)) -> None:
    """Replace the query deltas of ``layers`` by a 0.1.0 stacked entry with layer index ``index``."""
    rows = [tensors.pop(QUERY.format(i)) for i in layers]
    tensors[QUERY.format("*") + ".delta"] = torch.stack(rows)
    tensors[QUERY.format("*") + ".layer_index"] = index


AMBIGUOUS: dict[str, Callable[[dict[str, torch.Tensor]], None]] = {
    # a stacked row for layer 0 and a plain 0.1.0 entry for layer 0
    "stacked + plain 0.1.0": lambda t: (_stack(t, torch.tensor([0, 1], dtype=torch.int32)),
                                        t.__setitem__(QUERY.format(0) + ".delta", torch.ones(32))),
    # a stacked row for layer 0 and a new-layout entry for layer 0
    "stacked + new layout": lambda t: (t.__setitem__("keep", t[QUERY.format(0)]),
                                       _stack(t, torch.tensor([0, 1], dtype=torch.int32)),
                                       t.__setitem__(QUERY.format(0), t.pop("keep"))),
    # the loaded adapter's own model key: would override the regular entry
    "adapter name inside a key": lambda t: t.__setitem__(QUERY.format(0) + ".default", torch.full((32,), 9.0)),
    "float layer index": lambda t: _stack(t, torch.tensor([0.0, 1.9])),
    "repeated layer index": lambda t: _stack(t, torch.tensor([1, 1], dtype=torch.int64)),
    "flat 0.1.0 + new layout": lambda t: t.__setitem__(QUERY.format(0) + ".delta", t[QUERY.format(0)].clone()),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", sorted(AMBIGUOUS))
def test_ambiguous_files_are_refused(good: Path, tmp_path: Path, path: str, case: str) -> None:
    folder = _edit_weights(_copy(good, tmp_path), AMBIGUOUS[case])
    _refused(good, path, folder, WEIGHTS)


def test_ambiguous_keys_are_refused_without_a_folder_check() -> None:
    """The key grammar also runs on tensors read past the folder check (a Hub download): ``from_legacy``."""
    from bitfit_peft.files.delta_format import from_legacy

    for case, edit in AMBIGUOUS.items():
        tensors = {QUERY.format(i): torch.zeros(32) for i in (0, 1)}
        edit(tensors)
        with pytest.raises(BitFitError):
            from_legacy(tensors)
            pytest.fail(case)


def test_a_valid_folder_still_loads_on_every_path(good: Path) -> None:
    for path, load in _paths(good).items():
        load(good)
        assert path


# ---------------------------------------------------------------------------------------------- no traces
def test_a_failed_fresh_load_leaves_no_peft_config_on_the_base(good: Path, tmp_path: Path) -> None:
    folder = _edit_weights(_copy(good, tmp_path), lambda t: t.__setitem__(QUERY.format(0), torch.zeros(5)))
    base = make_tiny_model("bert", task="seq_cls", seed=0)
    with pytest.raises(BitFitError, match="shape"):
        PeftModel.from_pretrained(base, folder)
    assert not hasattr(base, "peft_config")


@pytest.mark.parametrize("existing", [False, True])
def test_a_refused_save_leaves_nothing(tmp_path: Path, existing: bool) -> None:
    model = get_peft_model(make_tiny_model("bert"), BitFitConfig(save_dtype="float16"))
    layer = next(iter(model.base_model.bitfit_layers().values()))
    with torch.no_grad():
        layer.delta_of("default")[0] = 1e6
    folder = tmp_path / "out"
    if existing:
        folder.mkdir()
        (folder / "README.md").write_text("my notes\n")
        (folder / "keep.txt").write_text("x")
    with pytest.raises(BitFitError, match="Nothing was written"):
        model.save_pretrained(folder)
    if existing:
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", "keep.txt"]
        assert (folder / "README.md").read_text() == "my notes\n"
    else:
        assert not folder.exists()
