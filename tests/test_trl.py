"""BitFit with TRL: ``SFTTrainer``, ``DPOTrainer`` and ``GRPOTrainer`` given ``peft_config=BitFitConfig(...)``.

For each trainer, on a tiny random Llama (no biases: ``add_missing_bias=True``) and a tiny GPT-2 (its own biases):
only the bias deltas train (every base weight is bit-identical after training), ``trainer.save_model`` writes a
bias-only adapter, and that adapter loads back onto a fresh base with the trained outputs. TRL's checkpoints get the
BitFit card from :class:`~bitfit_peft.training.BitFitCardCallback`, and :func:`bitfit_peft.save_pretrained` turns
TRL's generic card into the BitFit one. CPU-safe settings throughout (TRL's defaults want bf16 and a GPU).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import bitfit_peft  # noqa: E402
from bitfit_peft import BitFitConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# TRL defaults that fail or crawl on CPU: bf16=None -> True ("Your setup doesn't support bf16/gpu"), gradient
# checkpointing on (slower, no memory to save here); learning rates meant for full fine-tuning (1e-6 .. 2e-5).
CPU = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", disable_tqdm=True)
STEPS = 3


def _reward(completions: list[str], **_: Any) -> list[float]:
    """Longer completions score higher (anything with some spread across a group)."""
    return [float(len(c)) for c in completions]


def _trainer(kind: str, model: Any, tokenizer: Any, out: Path, **extra: Any) -> Any:
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    common = dict(output_dir=str(out), max_steps=STEPS, learning_rate=1e-2, per_device_train_batch_size=4, **CPU)
    common.update(save_strategy="no", logging_steps=1)
    common.update(extra.pop("args", {}))
    config = BitFitConfig(task_type="CAUSAL_LM", add_missing_bias=True)
    if kind == "sft":
        data = datasets.Dataset.from_dict({"text": ["the cat sat on the mat.", "a dog ran in the park."] * 4})
        return SFTTrainer(
            model=model, args=SFTConfig(**common), train_dataset=data, processing_class=tokenizer,
            peft_config=config, **extra,
        )  # fmt: skip
    if kind == "dpo":
        pairs = {"prompt": ["the cat"] * 8, "chosen": [" sat."] * 8, "rejected": [" ran."] * 8}
        data = datasets.Dataset.from_dict(pairs)
        return DPOTrainer(
            model=model, args=DPOConfig(**common), train_dataset=data, processing_class=tokenizer,
            peft_config=config, **extra,
        )  # fmt: skip
    data = datasets.Dataset.from_dict({"prompt": ["the cat", "a dog"] * 4})
    args = GRPOConfig(**common, num_generations=4, max_completion_length=6)
    return GRPOTrainer(
        model=model, reward_funcs=_reward, args=args, train_dataset=data, processing_class=tokenizer,
        peft_config=config, **extra,
    )  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo"])
def test_trl_trains_biases_only_and_saves_a_bias_only_adapter(
    kind: str, arch: str, tiny_model_factory: Callable[..., Any], tiny_tokenizer: Any, tmp_path: Path
) -> None:
    from peft import PeftModel

    torch.manual_seed(0)
    trainer = _trainer(kind, tiny_model_factory(arch, task="causal_lm"), tiny_tokenizer, tmp_path / "run")
    model = trainer.model
    assert isinstance(model, PeftModel) and bitfit_peft.names.is_bitfit(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("bitfit_delta" in n for n in trainable), sorted(trainable)[:5]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    trainer.train()

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable, sorted(changed - trainable)[:5]  # every base weight untouched
    assert len(changed) >= len(trainable) // 2  # the deltas did move

    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert shapes and all(len(s) == 1 for s in shapes.values()), shapes  # vectors only: bias deltas
    assert sum(s[0] for s in shapes.values()) == sum(before[n].numel() for n in trainable)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "BITFIT"

    model.eval()
    batch = tiny_tokenizer(["the cat sat"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
        torch.manual_seed(0)
        loaded = PeftModel.from_pretrained(tiny_model_factory(arch, task="causal_lm"), str(out)).eval()
        torch.testing.assert_close(loaded(**batch).logits, expected)


def test_trl_checkpoints_get_the_bitfit_card(
    tiny_model_factory: Callable[..., Any], tiny_tokenizer: Any, tmp_path: Path
) -> None:
    from bitfit_peft.training import BitFitCardCallback

    out = tmp_path / "run"
    args = {"save_strategy": "steps", "save_steps": STEPS}
    trainer = _trainer("sft", tiny_model_factory("llama", task="causal_lm"), tiny_tokenizer, out, args=args,
                       callbacks=[BitFitCardCallback()])  # fmt: skip
    trainer.train()
    card = (out / f"checkpoint-{STEPS}" / "README.md").read_text()
    assert "- bitfit" in card and "library_name: peft" in card and "import bitfit_peft" in card
    trl_card = (out / "README.md").read_text()  # TRL's own card in output_dir: generic
    assert "bitfit" not in trl_card.lower() and "TRL" in trl_card

    bitfit_peft.save_pretrained(trainer.model, out)  # the final adapter: BitFit card, TRL's text kept
    card = (out / "README.md").read_text()
    assert "- bitfit" in card and "import bitfit_peft" in card and "TRL" in card


def test_llm_page_shows_each_trl_trainer_with_bitfit() -> None:
    """docs/llm.md (in the nav, linked from the README and the docs index) has a runnable block per trainer;
    tests/test_docs.py runs them."""
    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "llm.md").read_text()
    for trainer in ("SFTTrainer", "DPOTrainer", "GRPOTrainer"):
        assert f"trainer = {trainer}(" in page
    assert page.count("peft_config=bitfit()") >= 3 and "use_cpu=True" in page
    assert "llm.md" in (root / "mkdocs.yml").read_text()
    assert "docs/llm.md" in (root / "README.md").read_text() and "(llm.md)" in (root / "docs" / "index.md").read_text()
