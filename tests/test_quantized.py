"""BitFit on bitsandbytes 4-bit (NF4, FP4) and 8-bit bases and torchao int8 weight-only bases, on CPU.

Two things that went wrong on quantized bases, each checked here on a tiny Llama (no biases, so
``add_missing_bias=True`` as a QLoRA user would set it):

- ``merge_and_unload`` created the missing biases in the *weight's* dtype, ``uint8`` / ``int8`` for a quantized
  weight, so every merged delta was truncated (max logit error 0.4-0.7);
- the base fingerprint sampled a 4-bit weight's raw bytes, which bitsandbytes repacks on a CPU's first no-grad
  forward, so a load after the model had run was refused; and an adapter trained on the full-precision base
  could never load onto its quantized copy (or the reverse).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import bitfit_peft
from bitfit_peft.compat.quantized import SCHEMES as QUANT_SCHEMES
from bitfit_peft.compat.quantized import quantization_config, weight_sample
from bitfit_peft.errors import BitFitError

#: every --quantize scheme, plus single-quantized NF4 (the CLI's nf4 uses double quantization)
SCHEME_NAMES = sorted([*QUANT_SCHEMES, "nf4-single"])
CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def _save_base(path: Path, seed: int) -> Path:
    """A tiny Llama (+ the tiny tokenizer) whose shapes bitsandbytes' CPU kernels take (rows a multiple of 32)."""
    from conftest import make_tiny_tokenizer

    torch.manual_seed(seed)
    LlamaForCausalLM(CONFIG).save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_base(tmp_path_factory.mktemp("llama"), 0)


@pytest.fixture(scope="module")
def other_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_base(tmp_path_factory.mktemp("other"), 1)


def _load(path: Path, scheme: str | None) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if scheme is None:
            return AutoModelForCausalLM.from_pretrained(path)
        if scheme == "nf4-single":
            pytest.importorskip("bitsandbytes")
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        else:
            pytest.importorskip(QUANT_SCHEMES[scheme][0])
            config = quantization_config(scheme)
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


def _adapted(base: torch.nn.Module) -> torch.nn.Module:
    config = bitfit_peft.BitFitConfig(task_type="CAUSAL_LM", add_missing_bias=True, init_weights=False)
    return get_peft_model(base, config)


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_merge_into_a_quantized_base_is_exact(base_dir: Path, scheme: str) -> None:
    model = _adapted(_load(base_dir, scheme))
    before = _logits(model)  # the first forward: bitsandbytes may repack 4-bit weights for the CPU here
    assert torch.equal(before, _logits(model)), "the base is not deterministic run to run"
    model.merge_adapter()
    assert torch.equal(_logits(model), before)
    model.unmerge_adapter()
    assert torch.equal(_logits(model), before)
    merged = model.merge_and_unload()
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert q_proj.bias is not None and q_proj.bias.is_floating_point(), q_proj.bias
    assert torch.equal(_logits(merged), before)


def _snapshot(weight: torch.Tensor) -> list[torch.Tensor]:
    """Copies of what a weight holds: torchao's dequantized values, else the raw data and bitsandbytes' scales."""
    if hasattr(type(weight), "dequantize") and type(weight).dequantize is not torch.Tensor.dequantize:
        return [weight.dequantize().clone()]
    state = getattr(weight, "quant_state", None)
    return [weight.data.clone()] + ([state.absmax.clone()] if state is not None else [])


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_fingerprint_sample_is_stable_and_reads_without_writing(base_dir: Path, scheme: str) -> None:
    model = _load(base_dir, scheme)
    linear = model.model.layers[0].mlp.down_proj
    first, quantized = weight_sample(linear, linear.weight, 16)
    assert quantized and first is not None and first.dtype == torch.float32
    with torch.no_grad():
        model(input_ids=IDS)  # may repack the weight (4-bit on an AVX512-BF16 CPU) or move int8 row scales
    raw = _snapshot(linear.weight)  # not state_dict(): bitsandbytes would unpack a CPU-packed weight for it
    again, _ = weight_sample(linear, linear.weight, 16)
    after = _snapshot(linear.weight)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(raw, after, strict=True)), "weight changed"
    torch.testing.assert_close(again, first, rtol=0.02, atol=1e-3)  # repacking rounds the scales to bf16
    full = _load(base_dir, None).model.layers[0].mlp.down_proj.weight.detach().reshape(-1)[:16]
    assert (first - full).norm() < 0.35 * full.norm()  # the dequantized values, not the packed bytes


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_adapter_moves_between_a_base_and_its_quantized_copy(
    base_dir: Path, other_base_dir: Path, tmp_path: Path, scheme: str
) -> None:
    """Trained on the full-precision base, it loads onto the quantized copy, also after that has run (and the
    reverse); a different base of the same shapes is still refused."""
    full = _adapted(_load(base_dir, None))
    full.save_pretrained(tmp_path / "from_full")
    quantized = _adapted(_load(base_dir, scheme))
    _logits(quantized)  # the model has served
    quantized.save_pretrained(tmp_path / "from_quantized")

    served = _load(base_dir, scheme)
    _logits(served)
    loaded = PeftModel.from_pretrained(served, tmp_path / "from_full")
    _logits(loaded)
    loaded.load_adapter(tmp_path / "from_quantized", adapter_name="again")  # a hot load after serving
    PeftModel.from_pretrained(_load(base_dir, None), tmp_path / "from_quantized")
    with pytest.raises(BitFitError, match="different base model"):
        PeftModel.from_pretrained(_load(other_base_dir, scheme), tmp_path / "from_full")
    with pytest.raises(BitFitError, match="different base model"):
        PeftModel.from_pretrained(_load(other_base_dir, None), tmp_path / "from_quantized")


@pytest.mark.parametrize("scheme", ["nf4", "int8", "torchao-int8"])
def test_train_and_serve_on_a_quantized_base(tmp_path: Path, scheme: str) -> None:
    """``train(quantize=...)`` / ``bitfit-peft train --quantize`` trains on the quantized base, and the adapter serves
    from ``MultiTaskEngine(quantize=...)`` and from the full-precision base alike."""
    from bitfit_peft.serving import MultiTaskEngine
    from bitfit_peft.training import load_trained, train

    pytest.importorskip(QUANT_SCHEMES[scheme][0])
    model_dir = _save_base(tmp_path / "llama", 0)
    data = tmp_path / "lm.csv"
    data.write_text("text\n" + "".join(f"hello world number {i}\n" for i in range(16)))
    result = train(model=str(model_dir), data=str(data), task="causal-lm", add_missing_bias=True, quantize=scheme,
                   output_dir=tmp_path / "out", num_epochs=1, eval_before=False, batch_size=8, max_length=16,
                   quiet=True)  # fmt: skip
    assert result.bias_params > 0
    summary = json.loads((tmp_path / "out" / "bitfit_training.json").read_text())
    assert summary["quantize"] == scheme
    trained = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for t in trained.values()), "nothing was trained"

    engine = MultiTaskEngine(model_dir, task_type="CAUSAL_LM", device="cpu", quantize=scheme)
    engine.add_adapter("lm", tmp_path / "out")
    (mixed, base) = engine.generate([("lm", "hello world"), ("__base__", "hello world")], max_new_tokens=3)
    single = engine.generate([("lm", "hello world")], max_new_tokens=3)[0]
    assert mixed.token_ids == single.token_ids
    engine.add_adapter("again", tmp_path / "out")  # a hot load after serving
    assert engine.generate([("again", "hello world")], max_new_tokens=3)[0].token_ids == single.token_ids
    model, _, _ = load_trained(tmp_path / "out")  # onto the full-precision base named in the summary
    assert not getattr(model.base_model.model, "is_quantized", False)


def test_quantize_options_fail_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bitfit_peft.cli import app
    from bitfit_peft.serving import EngineError, MultiTaskEngine
    from bitfit_peft.training import TrainArgs
    from bitfit_peft.training.args import OptionError

    with pytest.raises(OptionError, match="quantize must be one of nf4, fp4, int8"):
        TrainArgs.create(quantize="q3")
    model_dir = _save_base(tmp_path / "llama", 0)
    res = CliRunner().invoke(app, ["serve", "--base", str(model_dir), "--task-type", "CAUSAL_LM", "--quantize", "q3"])
    assert res.exit_code == 2 and "Unknown quantization scheme 'q3'" in res.output, res.output
    res = CliRunner().invoke(app, ["train", "--quantize", "q3"])
    assert res.exit_code == 2 and "q3" in res.output, res.output
    with pytest.raises(EngineError, match="quantize= applies to a base loaded by the engine"):
        MultiTaskEngine(_load(model_dir, None), task_type="CAUSAL_LM", tokenizer=str(model_dir), quantize="nf4")


@pytest.mark.parametrize("scheme", ["nf4", "int8", "torchao-int8"])
def test_mixed_batches_hotswap_and_merged_reload(base_dir: Path, tmp_path: Path, scheme: str) -> None:
    for name, seed in (("first", 1), ("second", 2)):
        torch.manual_seed(seed)
        _adapted(_load(base_dir, scheme)).save_pretrained(tmp_path / name)
    model = PeftModel.from_pretrained(_load(base_dir, scheme), tmp_path / "first", adapter_name="first")
    model.load_adapter(tmp_path / "second", adapter_name="second")
    singles = {}
    for name in ("first", "second"):
        model.set_adapter(name)
        singles[name] = _logits(model)
    with torch.no_grad(), model.disable_adapter():
        bare = _logits(model)
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=["first", "second"]).logits.float()
        generated = model.generate(input_ids=IDS, adapter_names=["second", "first"], max_new_tokens=3, do_sample=False)
    assert torch.equal(mixed[0], singles["first"][0]) and torch.equal(mixed[1], singles["second"][1])
    assert not torch.equal(singles["first"], bare)
    model.set_adapter("first")
    with torch.no_grad():
        alone = model.generate(input_ids=IDS[1:], max_new_tokens=3, do_sample=False)
    assert torch.equal(generated[1], alone[0])

    bitfit_peft.hotswap_adapter(model, tmp_path / "second", "first")
    assert torch.equal(_logits(model), singles["second"])

    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")  # with its quantization config
    expected = _logits(merged)  # after the save: reading state_dict() unpacks a CPU-repacked 4-bit weight (lossy)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu")
    assert getattr(reloaded, "is_quantized", False)
    assert torch.equal(_logits(reloaded), expected)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_gradient_checkpointing_after_kbit_preparation_gives_the_same_gradients(base_dir: Path, scheme: str) -> None:
    """QLoRA's recipe with BitFit: ``prepare_model_for_kbit_training`` (with gradient checkpointing) changes no
    gradient, and every delta gets one."""
    from peft import prepare_model_for_kbit_training

    grads = {}
    for checkpointing in (False, True):
        base = prepare_model_for_kbit_training(_load(base_dir, scheme), use_gradient_checkpointing=checkpointing)
        model = get_peft_model(base, bitfit_peft.BitFitConfig(task_type="CAUSAL_LM", add_missing_bias=True))
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert grads[checkpointing] and all(g.abs().sum() > 0 for g in grads[checkpointing].values())
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[True].items():
        torch.testing.assert_close(grad, grads[False][name], rtol=1e-4, atol=1e-6)
