"""The precomputed-bias fast path: one ``torch._foreach_add`` per model call, then the base ops only.

These pin down the performance contract with op counts (deterministic, unlike timings) and check that the
fast path gives exactly the gradients of the per-layer path, also under gradient checkpointing and in the
low-memory mode.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from conftest import make_tiny_model
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from bitfit_peft import BitFitConfig, BitFitLayer
from bitfit_peft.tuner.lowmem import cast_frozen_base

FOREACH = "aten._foreach_add.List"


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _batch(arch: str) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    batch["labels"] = torch.tensor([0, 1]) if arch == "bert" else ids
    return batch


def _task(arch: str) -> str:
    return "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"


def _bitfit(arch: str, overrides: dict | None = None, **config: Any) -> Any:
    model = get_peft_model(make_tiny_model(arch, **(overrides or {})), BitFitConfig(task_type=_task(arch), **config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bitfit_delta" in name:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def _naive(arch: str) -> torch.nn.Module:
    model = make_tiny_model(arch).train()
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(".bias") or name.startswith(("classifier.", "score.")))
    return model


def _ops(model: torch.nn.Module, batch: dict[str, torch.Tensor], grad: bool) -> Counter[str]:
    torch.manual_seed(0)
    with torch.set_grad_enabled(grad), _CountOps() as counter:
        model(**batch)
    return counter.ops


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("grad", [True, False])
def test_single_adapter_call_runs_the_base_ops_plus_one_foreach(arch: str, grad: bool) -> None:
    """A BitFit forward dispatches exactly the ops of naive bias training, plus one multi-tensor add."""
    batch = _batch(arch)
    naive = _ops(_naive(arch), batch, grad)
    bitfit = _ops(_bitfit(arch), batch, grad)
    assert bitfit[FOREACH] == 1
    del bitfit[FOREACH]
    assert bitfit == naive, (bitfit - naive, naive - bitfit)


def _loss_and_grads(model: Any, batch: dict[str, torch.Tensor], call: Any) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = call(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _peft_call(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def _per_layer_call(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The raw transformers model: no precompute, every layer adds its own delta."""
    return model.base_model.model(**batch).loss


@pytest.mark.parametrize(
    ("arch", "config"),
    [("bert", {}), ("gpt2", {}), ("llama", {"add_missing_bias": True}), ("qwen2", {"bias_terms": ["query"]})],
)
def test_fast_path_gradients_equal_the_per_layer_path(arch: str, config: dict) -> None:
    model = _bitfit(arch, **config)
    model.eval()  # no dropout: both calls must see the same function
    fast_loss, fast = _loss_and_grads(model, _batch(arch), _peft_call)
    slow_loss, slow = _loss_and_grads(model, _batch(arch), _per_layer_call)
    torch.testing.assert_close(fast_loss, slow_loss, rtol=0, atol=0)
    assert fast.keys() == slow.keys() and any("bitfit_delta" in k for k in fast)
    for key in fast:
        torch.testing.assert_close(fast[key], slow[key], rtol=0, atol=1e-7, msg=key)
    assert all(layer._staged_call is None for layer in model.base_model._structure()[0])


def test_fast_path_low_memory_mode_matches_per_layer_path() -> None:
    model = cast_frozen_base(_bitfit("bert")).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_loss, fast = _loss_and_grads(model, _batch("bert"), _peft_call)
        slow_loss, slow = _loss_and_grads(model, _batch("bert"), _per_layer_call)
    torch.testing.assert_close(fast_loss, slow_loss, rtol=0, atol=0)
    for key in fast:
        assert fast[key].dtype == torch.float32, key
        torch.testing.assert_close(fast[key], slow[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_single_adapter(use_reentrant: bool) -> None:
    """Checkpointed blocks re-run their forward during backward (after the call): same gradients."""
    model = _bitfit("bert", {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}).eval()
    _, plain = _loss_and_grads(model, _batch("bert"), _peft_call)
    model.get_base_model().gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    model.train()  # transformers only checkpoints in training mode (dropout is 0 here)
    _, checkpointed = _loss_and_grads(model, _batch("bert"), _peft_call)
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(plain[key], checkpointed[key], rtol=0, atol=1e-6, msg=key)


def test_precomputed_biases_cleared_after_a_failed_call() -> None:
    model = _bitfit("bert").eval()
    layers = model.base_model._structure()[0]
    with pytest.raises(IndexError):  # token id beyond the tiny vocabulary: fails inside the forward
        model(input_ids=torch.tensor([[5, 10_000]]))
    assert all(layer._staged_call is None for layer in layers)
    assert not model.base_model._precomputing


def test_fast_path_follows_set_adapter_disable_and_merge() -> None:
    """The precomputed bias always belongs to the adapter active at call time (no stale state)."""
    model = _bitfit("bert").eval()
    model.add_adapter("other", BitFitConfig(task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bitfit_delta.other"):
                param.fill_(0.05)
    batch = {k: v for k, v in _batch("bert").items() if k != "labels"}
    with torch.no_grad():
        default = model(**batch).logits
        model.set_adapter("other")
        other = model(**batch).logits
        assert not torch.allclose(default, other)
        torch.testing.assert_close(model.base_model.model(**batch).logits, other)
        with model.disable_adapter():
            bare = model(**batch).logits
        model.merge_adapter()
        torch.testing.assert_close(model(**batch).logits, other, rtol=0, atol=1e-5)
        model.unmerge_adapter()
        model.set_adapter("default")
        torch.testing.assert_close(model(**batch).logits, default, rtol=0, atol=0)
    assert isinstance(model.base_model.model.bert.encoder.layer[0].output.dense, BitFitLayer)
    with torch.no_grad():
        torch.testing.assert_close(bare, make_tiny_model("bert")(**batch).logits, rtol=0, atol=0)


def test_module_tree_does_not_grow_with_adapters(tmp_path: Any) -> None:
    """All adapters of a layer share one BiasDeltas bank: loading more adapters adds vectors, not modules."""
    model = _bitfit("bert")
    model.save_pretrained(tmp_path)
    modules_before = sum(1 for _ in model.modules())
    for i in range(3):
        model.load_adapter(tmp_path, adapter_name=f"extra{i}")
    assert sum(1 for _ in model.modules()) - modules_before == 3 * 1  # only the heads' per-adapter copies
    layer = model.base_model._structure()[0][0]
    assert sorted(layer.bitfit_delta.keys()) == ["default", "extra0", "extra1", "extra2"]
    assert all(not layer.delta_of(f"extra{i}").requires_grad for i in range(3))
    torch.testing.assert_close(layer.delta_of("extra2"), layer.delta_of("default"), rtol=0, atol=0)


def _two_task_bert() -> Any:
    model = get_peft_model(make_tiny_model("bert", task="base"), BitFitConfig(task_type="FEATURE_EXTRACTION"))
    model.add_adapter("b", BitFitConfig(task_type="FEATURE_EXTRACTION"))
    model.add_adapter("c", BitFitConfig(task_type="FEATURE_EXTRACTION"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bitfit_delta" in name:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


def test_compiled_mixed_batches_do_not_recompile_per_task_mix() -> None:
    """The layers read one prepared table and one index tensor: a new mix of tasks is new data, not new code."""
    import torch._dynamo

    model = _two_task_bert()
    batch = {k: v for k, v in _batch("bert").items() if k != "labels"}
    mixes = [["default", "b"], ["b", "default"], ["c", "default"], ["b", "c"]]
    with torch.no_grad():
        eager = [model(**batch, adapter_names=m).last_hidden_state for m in mixes]
        torch._dynamo.reset()
        model.get_base_model().compile(backend="eager")
        try:
            model(**batch, adapter_names=mixes[0])  # compiles
            model(**batch, adapter_names=mixes[0])
            with torch._dynamo.config.patch(error_on_recompile=True):
                compiled = [model(**batch, adapter_names=m).last_hidden_state for m in mixes]
        finally:
            torch._dynamo.reset()
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)



def test_calls_nested_in_a_precomputed_call_see_their_own_state() -> None:
    """A model call made while another call's biases are precomputed (a hook, a reference model in a training
    step) must honour disable_adapter / mixed routing / set_adapter, not the outer call's biases."""
    model = _two_task_bert()
    batch = {k: v for k, v in _batch("bert").items() if k != "labels"}
    with torch.no_grad():
        with model.disable_adapter():
            bare = model(**batch).last_hidden_state
        mixed = model(**batch, adapter_names=["b", "c"]).last_hidden_state
        model.set_adapter("c")
        only_c = model(**batch).last_hidden_state
        model.set_adapter("default")
        single = model(**batch).last_hidden_state
        with model.base_model.precomputed_biases():
            with model.disable_adapter():
                torch.testing.assert_close(model(**batch).last_hidden_state, bare, rtol=0, atol=0)
        with model.base_model.precomputed_biases():
            torch.testing.assert_close(model(**batch, adapter_names=["b", "c"]).last_hidden_state, mixed)
        with model.base_model.precomputed_biases():
            model.set_adapter("c")
            torch.testing.assert_close(model(**batch).last_hidden_state, only_c, rtol=0, atol=0)
            model.set_adapter("default")
        torch.testing.assert_close(model(**batch).last_hidden_state, single, rtol=0, atol=0)


class _ToBf16(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16)


def test_precompute_handles_layers_of_different_dtypes() -> None:
    """Layers whose deltas differ in dtype (a partly half-precision model) are precomputed in separate groups."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), _ToBf16(), torch.nn.Linear(4, 3))
    model = get_peft_model(net, BitFitConfig())
    model.base_model.model[2].to(torch.bfloat16)
    with torch.no_grad():
        for _, param in model.named_parameters():
            param.add_(0.1)
    x = torch.randn(2, 4)
    with torch.no_grad():
        first = model.base_model.model[0]
        second = model.base_model.model[2]
        expected = torch.nn.functional.linear(
            torch.nn.functional.linear(x, first.base_layer.weight, first.base_layer.bias + first.delta_of("default"))
            .to(torch.bfloat16),
            second.base_layer.weight,
            second.base_layer.bias + second.delta_of("default"),
        )
        counter = _CountOps()
        with counter:
            out = model(x)
    assert counter.ops[FOREACH] == 2
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_mixed_batch_gathers_all_layers_at_once() -> None:
    """A mixed call gathers every layer's per-sample rows with one index_select; each layer then adds once."""
    model = _two_task_bert()
    batch = {k: v for k, v in _batch("bert").items() if k != "labels"}
    n_layers = len(model.base_model._structure()[0])
    with torch.no_grad():
        model(**batch, adapter_names=["b", "c"])  # builds the cached tables
        with model.disable_adapter():
            bare = _ops(model, batch, False)
        mixed_counter = _CountOps()
        with mixed_counter:
            model(**batch, adapter_names=["b", "c"])
    mixed = mixed_counter.ops
    assert mixed["aten.index_select.default"] - bare["aten.index_select.default"] == 1
    assert mixed["aten.add.Tensor"] - bare["aten.add.Tensor"] == n_layers
