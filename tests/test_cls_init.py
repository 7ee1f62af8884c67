"""``initialize_cls_attention``: the first token's mean query is zero afterwards, nothing else changes, and
unsupported models, adapters without a query delta and empty data are refused with the model unchanged."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from bitfit_peft import BitFitConfig
from bitfit_peft.errors import BitFitError
from bitfit_peft.training.cls_init import initialize_cls_attention, last_query_layer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batches(vocab: int, n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (4, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[:2, 6:] = 0  # right padding, as the tokenizers of these models pad
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(4, dtype=torch.long)})
    return out


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_mean_first_token_query_is_zero(tiny_model_factory, arch: str) -> None:
    model = get_peft_model(tiny_model_factory(arch, task="seq_cls"), BitFitConfig(task_type="SEQ_CLS"))
    model.train()
    batches = _batches(model.config.vocab_size)
    before = _state(model)
    name, layer = last_query_layer(model)
    assert initialize_cls_attention(model, batches) == name
    assert model.training  # the mode is restored
    queries: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda m, a, out: queries.append(out[:, 0]))
    model.eval()
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    hook.remove()
    mean = torch.cat(queries).mean(0)
    assert mean.abs().max() < 1e-4 * max(1.0, torch.cat(queries).abs().max().item())
    changed = {k for k, v in _state(model).items() if not torch.equal(v, before[k])}
    assert len(changed) == 1 and name.split("base_model.model.")[-1] in next(iter(changed))  # that delta only


def test_refuses_a_decoder_with_the_model_unchanged(tiny_model_factory) -> None:
    model = get_peft_model(tiny_model_factory("gpt2", task="seq_cls"), BitFitConfig(task_type="SEQ_CLS"))
    before = _state(model)
    with pytest.raises(BitFitError, match="model_type 'gpt2'"):
        initialize_cls_attention(model, _batches(model.config.vocab_size))
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())


def test_refuses_an_adapter_without_a_query_delta(tiny_bert) -> None:
    model = get_peft_model(tiny_bert, BitFitConfig(bias_terms=["intermediate"]))
    with pytest.raises(BitFitError, match="include 'query' in bias_terms"):
        initialize_cls_attention(model, _batches(model.config.vocab_size))


def test_refuses_no_data_with_the_model_unchanged(tiny_model_factory) -> None:
    model = get_peft_model(tiny_model_factory("bert", task="seq_cls"), BitFitConfig(task_type="SEQ_CLS"))
    before = _state(model)
    with pytest.raises(BitFitError, match="no batches given"):
        initialize_cls_attention(model, [])
    with pytest.raises(BitFitError, match="max_examples must be > 0"):
        initialize_cls_attention(model, _batches(model.config.vocab_size), max_examples=0)
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())


def test_max_examples_bounds_the_data_read(tiny_model_factory) -> None:
    """Only the first ``max_examples`` examples count: later batches (here: garbage) are never run."""
    model = get_peft_model(tiny_model_factory("bert", task="seq_cls"), BitFitConfig(task_type="SEQ_CLS"))
    good = _batches(model.config.vocab_size, n=1)
    initialize_cls_attention(model, good + [{"input_ids": "not a tensor"}], max_examples=4)


def test_adapter_name_selects_the_delta(tiny_model_factory) -> None:
    model = get_peft_model(tiny_model_factory("bert", task="seq_cls"), BitFitConfig(task_type="SEQ_CLS"))
    model.add_adapter("other", BitFitConfig(task_type="SEQ_CLS"))
    name, layer = last_query_layer(model, "other")
    initialize_cls_attention(model, _batches(model.config.vocab_size), adapter_name="other")
    assert layer.delta_of("other").abs().sum() > 0 and layer.delta_of("default").abs().sum() == 0
