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


def test_a_disk_offloaded_last_layer_gets_the_same_init(tmp_path) -> None:
    """With a ``device_map`` that puts the last layer on disk (its query weight is ``meta`` until Accelerate's hook
    loads it), the init equals the one on the same model held in memory."""
    from conftest import make_tiny_model
    from transformers import AutoModelForSequenceClassification

    base_dir = tmp_path / "base"
    make_tiny_model("bert", task="seq_cls").save_pretrained(base_dir)
    device_map = {"bert.embeddings": "cpu", "bert.encoder.layer.0": "cpu", "bert.encoder.layer.1": "disk",
                  "bert.pooler": "disk", "classifier": "cpu"}  # fmt: skip
    offloaded = AutoModelForSequenceClassification.from_pretrained(
        base_dir, device_map=device_map, offload_folder=str(tmp_path / "offload"), low_cpu_mem_usage=True
    )
    assert offloaded.bert.encoder.layer[1].attention.self.query.weight.device.type == "meta"
    deltas = []
    for base in (AutoModelForSequenceClassification.from_pretrained(base_dir), offloaded):
        model = get_peft_model(base, BitFitConfig(task_type="SEQ_CLS"))
        initialize_cls_attention(model, _batches(model.config.vocab_size))
        deltas.append(last_query_layer(model)[1].delta_of("default").detach().clone())
    assert deltas[0].abs().max() > 0
    torch.testing.assert_close(deltas[1], deltas[0], rtol=0, atol=1e-6)


def test_probe_accuracy_separates_what_is_linear_and_not_noise() -> None:
    from bitfit_peft.training.cls_init import probe_accuracy

    g = torch.Generator().manual_seed(0)
    x, x_dev = torch.randn(200, 8, generator=g), torch.randn(100, 8, generator=g)
    y, y_dev = (x[:, 3] > 0).long(), (x_dev[:, 3] > 0).long()
    assert probe_accuracy(x, y, x_dev, y_dev, 1e-3) > 95
    noise = torch.randint(0, 2, (100,), generator=g)
    assert probe_accuracy(x, y, x_dev, noise, 1e-3) < 70


def test_auto_decision_says_why_it_does_not_apply(tiny_model_factory) -> None:
    from bitfit_peft.training.cls_init import auto_cls_init

    bert = get_peft_model(tiny_model_factory("bert", task="seq_cls"), BitFitConfig(task_type="SEQ_CLS"))
    batches = _batches(bert.config.vocab_size)
    assert auto_cls_init(bert, "regression", batches, batches) == {
        "enable": False, "reason": "the probe needs class labels; task 'regression'"}  # fmt: skip
    gpt2 = get_peft_model(tiny_model_factory("gpt2", task="seq_cls"), BitFitConfig(task_type="SEQ_CLS"))
    got = auto_cls_init(gpt2, "seq-cls", batches, batches)
    assert got["enable"] is False and "model_type 'gpt2'" in got["reason"]
    probe = auto_cls_init(bert, "seq-cls", batches, batches)
    assert set(probe) == {"enable", "min_gap", "min_dev", "first_token", "mean_pooled", "num_train", "num_dev"}
    assert probe["num_dev"] == 12 < probe["min_dev"] and probe["enable"] is False  # too few dev examples to decide
    before = _state(bert)
    auto_cls_init(bert, "seq-cls", batches, batches)
    assert all(torch.equal(v, before[k]) for k, v in _state(bert).items())  # probing changes nothing


def test_auto_probe_refuses_float_labels_and_no_data(tiny_model_factory) -> None:
    from bitfit_peft.training.cls_init import probe_first_token

    model = get_peft_model(tiny_model_factory("bert", task="seq_cls"), BitFitConfig(task_type="SEQ_CLS"))
    floats = [{**b, "labels": b["labels"].float()} for b in _batches(model.config.vocab_size)]
    with pytest.raises(BitFitError, match="needs integer class labels"):
        probe_first_token(model, floats, floats)
    with pytest.raises(BitFitError, match="no batches given"):
        probe_first_token(model, [], [])


def test_auto_decides_on_the_gap_between_the_probes() -> None:
    from bitfit_peft.training.cls_init import AUTO_MIN_DEV, AUTO_MIN_GAP, FirstTokenProbe

    def probe(first: float, mean: float, dev: int = AUTO_MIN_DEV) -> bool:
        return FirstTokenProbe(first_token=first, mean_pooled=mean, num_train=400, num_dev=dev).enable

    assert probe(44.0, 75.0) and probe(59.5, 72.5)  # the suite's trec and movie
    assert not probe(91.0, 93.5) and not probe(96.0, 96.5)  # bbc and sms
    assert not probe(50.0, 50.0 + AUTO_MIN_GAP) and probe(50.0, 50.1 + AUTO_MIN_GAP)
    assert not probe(44.0, 75.0, dev=AUTO_MIN_DEV - 1)
