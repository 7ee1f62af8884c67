"""Adapter files as untrusted input: PEFT's layout, old files, the fingerprint, strict keys, read-only loads.

Every load path is exercised: ``PeftModel.from_pretrained``, ``load_adapter``, transformers' ``model.load_adapter``,
``AutoPeftModel`` and the serving engine.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from peft import AutoPeftModelForSequenceClassification, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

import bitfit_peft
from bitfit_peft import BitFitConfig, BitFitError

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-0.1.0"
WEIGHTS = "adapter_model.safetensors"
BATCH = {"input_ids": torch.tensor([[2, 15, 27, 33, 41, 3]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}


def _trained(seed: int = 0, **config: object) -> PeftModel:
    model = get_peft_model(make_tiny_model("bert", seed=seed), BitFitConfig(task_type="SEQ_CLS", **config))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**BATCH).logits.float()


def _snapshot(model: torch.nn.Module) -> tuple[list, dict]:
    return [type(m) for m in model.modules()], {n: p.detach().clone() for n, p in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, snap: tuple[list, dict]) -> None:
    structure, state = snap
    assert [type(m) for m in model.modules()] == structure
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())


def _listing(*folders: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                st = os.lstat(os.path.join(root, name))
                out[os.path.join(root, name)] = (st.st_mtime_ns, st.st_size, st.st_mode)
    return out


# ---------------------------------------------------------------------------------------------- 0.1.0 files
def _legacy_base() -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(FIXTURE / "base").eval()


def test_legacy_0_1_0_file_loads_unchanged() -> None:
    expected = json.loads((FIXTURE / "expected.json").read_text())
    batch = {k: torch.tensor(expected[k]) for k in ("input_ids", "attention_mask")}
    assert any(".*." in k for k in load_file(FIXTURE / "adapter" / WEIGHTS)), "the fixture must be stacked (0.1.0)"
    model = PeftModel.from_pretrained(_legacy_base(), FIXTURE / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, torch.tensor(expected["logits"]), rtol=0, atol=1e-6)
    second = PeftModel.from_pretrained(_legacy_base(), FIXTURE / "adapter", adapter_name="first")
    second.load_adapter(FIXTURE / "adapter", adapter_name="again")
    second.set_adapter("again")
    with torch.no_grad():
        torch.testing.assert_close(second.eval()(**batch).logits, torch.tensor(expected["logits"]), rtol=0, atol=1e-6)
    plain = _legacy_base()
    plain.load_adapter(str(FIXTURE / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, torch.tensor(expected["logits"]), rtol=0, atol=1e-6)


def test_legacy_fingerprint_still_refuses_another_base() -> None:
    other = make_tiny_model("bert", task="seq_cls", seed=5, num_labels=3)
    with pytest.raises(BitFitError, match="different base model"):
        PeftModel.from_pretrained(other, FIXTURE / "adapter")


# ---------------------------------------------------------------------------------------------- fingerprint
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fingerprint_accepts_a_half_precision_copy_of_the_base(tmp_path: Path, dtype: torch.dtype) -> None:
    model = _trained()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_fingerprint"]["version"] == 3
    half = make_tiny_model("bert", task="seq_cls", seed=0).to(dtype)
    loaded = PeftModel.from_pretrained(half, tmp_path).eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0.05, atol=0.05)


def test_fingerprint_refuses_a_different_base_of_the_same_shapes(tmp_path: Path) -> None:
    _trained(seed=0).save_pretrained(tmp_path)
    for seed, dtype in ((1, torch.float32), (1, torch.bfloat16)):
        other = make_tiny_model("bert", task="seq_cls", seed=seed).to(dtype)
        snap = _snapshot(other)
        with pytest.raises(BitFitError, match="different base model"):
            PeftModel.from_pretrained(other, tmp_path)
        _assert_unchanged(other, snap)
    slightly = make_tiny_model("bert", task="seq_cls", seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a lightly fine-tuned copy (every value moved by ~1 %) is not the same base
        for param in slightly.parameters():
            param.mul_(1 + 0.01 * torch.randn(param.shape, generator=gen))
    with pytest.raises(BitFitError, match="different base model"):
        PeftModel.from_pretrained(slightly, tmp_path)


# ---------------------------------------------------------------------------------------------- strict keys
def _poison(folder: Path, extra: dict[str, torch.Tensor]) -> None:
    tensors = load_file(folder / WEIGHTS)
    save_file({**tensors, **extra}, folder / WEIGHTS)


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.bert.encoder.layer.0.attention.self.query.weight",  # a base weight
        "base_model.model.bert.pooler.dense.bias",  # a base bias that is not a delta
        "base_model.model.bert.encoder.layer.0.attention.self.query.bitfit_delta.other",  # a delta of no adapter
    ],
)
def test_a_file_carrying_a_foreign_key_is_refused_on_every_path(tmp_path: Path, key: str) -> None:
    _trained().save_pretrained(tmp_path)
    shape = make_tiny_model("bert", task="seq_cls").state_dict().get(key.removeprefix("base_model.model."))
    _poison(tmp_path, {key: torch.full(shape.shape if shape is not None else (32,), 7.0)})
    base = make_tiny_model("bert", task="seq_cls")
    snap = _snapshot(base)
    with pytest.raises(BitFitError, match="neither a delta|but names one") as err:
        PeftModel.from_pretrained(base, tmp_path)
    assert key in str(err.value) and "\n" not in str(err.value)
    _assert_unchanged(base, snap)
    holder = _trained()
    snap = _snapshot(holder)
    with pytest.raises(BitFitError, match="neither a delta|but names one"):
        holder.load_adapter(tmp_path, adapter_name="second")
    _assert_unchanged(holder, snap)
    assert list(holder.peft_config) == ["default"]
    plain = make_tiny_model("bert", task="seq_cls")
    snap = _snapshot(plain)
    with pytest.raises(BitFitError, match="neither a delta|but names one"):
        plain.load_adapter(str(tmp_path))
    _assert_unchanged(plain, snap)


@pytest.mark.parametrize("problem", ["missing", "shape", "dtype", "nan"])
def test_broken_deltas_are_refused(tmp_path: Path, problem: str) -> None:
    _trained().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    key = next(k for k in tensors if k.endswith(".bitfit_delta"))
    if problem == "missing":
        del tensors[key]
    elif problem == "shape":
        tensors[key] = torch.zeros(5)
    elif problem == "dtype":
        tensors[key] = tensors[key].to(torch.int32)
    else:
        tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, tmp_path / WEIGHTS)
    base = make_tiny_model("bert", task="seq_cls")
    snap = _snapshot(base)
    with pytest.raises(BitFitError, match="does not fit this model|not a float type"):
        PeftModel.from_pretrained(base, tmp_path)
    _assert_unchanged(base, snap)


# ---------------------------------------------------------------------------------------------- loads only read
def test_every_load_path_reads_only(tmp_path: Path) -> None:
    from bitfit_peft.serving.engine import MultiTaskEngine

    base_dir = tmp_path / "base"
    make_tiny_model("bert", task="seq_cls").save_pretrained(base_dir)
    make_tiny_tokenizer().save_pretrained(base_dir)
    adapter = tmp_path / "adapter"
    model = _trained()
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter)
    reference = _logits(model)
    os.chmod(adapter / WEIGHTS, 0o444)
    os.chmod(adapter / "adapter_config.json", 0o444)
    os.chmod(adapter, 0o555)
    try:
        before = _listing(tmp_path)
        PeftConfig.from_pretrained(str(adapter))
        loaded = PeftModel.from_pretrained(make_tiny_model("bert", task="seq_cls"), adapter).eval()
        loaded.load_adapter(adapter, adapter_name="again")
        plain = make_tiny_model("bert", task="seq_cls")
        plain.load_adapter(str(adapter))
        auto = AutoPeftModelForSequenceClassification.from_pretrained(adapter).eval()
        engine = MultiTaskEngine(str(base_dir), device="cpu")
        engine.add_adapter("task", adapter)
        assert _listing(tmp_path) == before, "a load wrote, moved or deleted a file"
    finally:
        os.chmod(adapter, 0o755)
    for m in (loaded, plain.eval(), auto):
        torch.testing.assert_close(_logits(m), reference, rtol=0, atol=1e-5)


def test_symlinks_out_of_the_adapter_folder_are_refused(tmp_path: Path) -> None:
    _trained().save_pretrained(tmp_path / "real")
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(tmp_path / "real" / "adapter_config.json", evil / "adapter_config.json")
    os.symlink(tmp_path / "real" / WEIGHTS, evil / WEIGHTS)  # points outside the folder
    with pytest.raises(BitFitError, match="is a symlink"):
        PeftModel.from_pretrained(make_tiny_model("bert", task="seq_cls"), evil)
    with pytest.raises(BitFitError, match="is a symlink"):
        make_tiny_model("bert", task="seq_cls").load_adapter(str(evil))
    # the Hugging Face cache layout (snapshots/<rev>/file -> ../../blobs/<hash>) is allowed
    repo = tmp_path / "models--user--repo"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for name in ("adapter_config.json", WEIGHTS):
        shutil.copy(tmp_path / "real" / name, repo / "blobs" / name)
        os.symlink(Path("..", "..", "blobs", name), snap / name)
    PeftModel.from_pretrained(make_tiny_model("bert", task="seq_cls"), snap)


def test_pickle_adapters_load_as_peft_does(tmp_path: Path) -> None:
    model = _trained()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    loaded = PeftModel.from_pretrained(make_tiny_model("bert", task="seq_cls"), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- saving and combining
def test_half_precision_save_that_overflows_is_refused(tmp_path: Path) -> None:
    model = get_peft_model(make_tiny_model("bert"), BitFitConfig(save_dtype="float16"))
    layer = next(iter(model.base_model.bitfit_layers().values()))
    with torch.no_grad():
        layer.delta_of("default")[0] = 1e6
    with pytest.raises(BitFitError, match="overflows float16"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / WEIGHTS).exists()


def test_weighted_adapter_combines_heads_or_refuses() -> None:
    model = _trained()
    model.add_adapter("b", BitFitConfig(task_type="SEQ_CLS"))
    head_a = model.base_model.model.classifier.modules_to_save["default"].weight
    head_b = model.base_model.model.classifier.modules_to_save["b"].weight
    with torch.no_grad():
        head_b.copy_(torch.randn_like(head_b))
    model.base_model.add_weighted_adapter(["default", "b"], [0.25, 0.75], "mix")
    mixed = model.base_model.model.classifier.modules_to_save["mix"].weight
    torch.testing.assert_close(mixed, 0.25 * head_a + 0.75 * head_b)
    for weights in ([float("nan"), 1.0], [float("inf"), 0.0]):
        with pytest.raises(BitFitError, match="finite"):
            model.base_model.add_weighted_adapter(["default", "b"], weights, "bad")
    with pytest.raises(BitFitError, match="overflows"):
        model.base_model.add_weighted_adapter(["default", "b"], [3e38, 3e38], "huge")
    assert "huge" not in model.peft_config and "bad" not in model.peft_config
    headless = get_peft_model(make_tiny_model("bert", task="seq_cls"), BitFitConfig(target_modules=["query"]))
    headless.add_adapter("with_head", BitFitConfig(target_modules=["query"], modules_to_save=["classifier"]))
    with pytest.raises(BitFitError, match="different task heads"):
        headless.base_model.add_weighted_adapter(["default", "with_head"], [0.5, 0.5], "mix")
    assert "mix" not in headless.peft_config


def test_read_only_file_mode_is_a_normal_files_mode(tmp_path: Path) -> None:
    """Saved files get the permissions of any file the user writes (not mkstemp's 0600)."""
    model = _trained()
    bitfit_peft.save_pretrained(model, tmp_path / "a")
    (tmp_path / "plain.txt").write_text("x")
    normal = stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)
    for name in (WEIGHTS, "adapter_config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "a" / name).st_mode) == normal


def test_corrupt_file_and_missing_head_are_named_on_every_path(tmp_path: Path) -> None:
    _trained().save_pretrained(tmp_path / "corrupt")
    (tmp_path / "corrupt" / WEIGHTS).write_bytes(b"garbage")
    for load in (
        lambda: PeftModel.from_pretrained(make_tiny_model("bert", task="seq_cls"), tmp_path / "corrupt"),
        lambda: make_tiny_model("bert", task="seq_cls").load_adapter(str(tmp_path / "corrupt")),
    ):
        with pytest.raises(BitFitError, match="adapter_model.safetensors:? is corrupt or truncated"):
            load()
    _trained().save_pretrained(tmp_path / "headless")
    tensors = load_file(tmp_path / "headless" / WEIGHTS)
    save_file({k: v for k, v in tensors.items() if "classifier" not in k}, tmp_path / "headless" / WEIGHTS)
    base = make_tiny_model("bert", task="seq_cls")
    snap = _snapshot(base)
    with pytest.raises(BitFitError, match="classifier.weight"):
        PeftModel.from_pretrained(base, tmp_path / "headless")
    _assert_unchanged(base, snap)
    with pytest.raises(BitFitError, match="modules_to_save tensor"):
        base.load_adapter(str(tmp_path / "headless"))
    _assert_unchanged(base, snap)
