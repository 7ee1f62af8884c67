"""Property tests: random small Conv2d / Linear / LayerNorm stacks under random valid BitFit configs.

Invariants: zero-init adapters leave outputs unchanged; save -> load is exact; merge -> unmerge restores the
base exactly; a mixed batch equals per-adapter runs; ``add_weighted_adapter([a, b], [1, 0])`` equals ``a``.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from torch import nn

from bitfit_peft import BitFitConfig, BitFitError, BitFitLayer

# core: PEFT warns "no modules were excluded" because BitFit resolves exclude_modules itself (reported)
pytestmark = pytest.mark.filterwarnings("ignore:You have passed exclude_modules=.*no modules were excluded")

SETTINGS = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Case:
    base: nn.Module
    x: torch.Tensor
    config: BitFitConfig


@st.composite
def stacks(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    """``[Conv2d]* -> Flatten -> [Linear | LayerNorm]+`` with random sizes and bias on/off; plus an input."""
    layers: list[nn.Module] = []
    batch = draw(st.integers(3, 4))
    channels, side = draw(st.integers(1, 3)), draw(st.integers(2, 4))
    n_conv = draw(st.integers(0, 2))
    if n_conv:
        x_shape: tuple[int, ...] = (batch, channels, side, side)
        for _ in range(n_conv):
            out, kernel = draw(st.integers(1, 4)), draw(st.sampled_from([1, 3]))
            layers.append(nn.Conv2d(channels, out, kernel, padding=kernel // 2, bias=draw(st.booleans())))
            channels = out
        layers.append(nn.Flatten())
        features = channels * side * side
    else:
        features = draw(st.integers(1, 8))
        x_shape = (batch, features)
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            out = draw(st.integers(1, 8))
            layers.append(nn.Linear(features, out, bias=draw(st.booleans())))
            features = out
        else:
            layers.append(nn.LayerNorm(features, bias=draw(st.booleans())))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():  # non-trivial norm affine parameters
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.2)
    return model, torch.randn(x_shape)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    base, x = draw(stacks())
    names = [n for n, m in base.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm))]
    kwargs: dict = {"add_missing_bias": draw(st.booleans())}
    mode = draw(st.sampled_from(["all", "targets", "exclude", "layers"]))
    if mode == "targets":
        kwargs["target_modules"] = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    elif mode == "exclude":
        kwargs["exclude_modules"] = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    elif mode == "layers":
        kwargs["layers_to_transform"] = sorted({int(n) for n in draw(st.lists(st.sampled_from(names), min_size=1))})
    return Case(base, x, BitFitConfig(**kwargs))


def _wrap(case: Case, adapter_name: str = "default", seed: int | None = None) -> PeftModel:
    """``get_peft_model`` on a copy of the base; random deltas when ``seed`` is given."""
    try:
        model = get_peft_model(copy.deepcopy(case.base), copy.deepcopy(case.config), adapter_name=adapter_name)
    except BitFitError as err:
        assert "no bias to tune" in str(err)
        assume(False)
    if seed is not None:
        _randomize(model, adapter_name, seed)
    return model.eval()


def _randomize(model: PeftModel, adapter_name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BitFitLayer) and adapter_name in module.bitfit_delta:
                delta = module.delta_of(adapter_name)
                delta.copy_(torch.randn(delta.shape, generator=gen))


def _deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".bitfit_delta." in n}


def _run(model: nn.Module, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kwargs)


# ---------------------------------------------------------------------------------------------- properties
@SETTINGS
@given(cases())
def test_zero_init_output_equals_base(case: Case) -> None:
    model = _wrap(case)
    torch.testing.assert_close(_run(model, case.x), _run(case.base, case.x), rtol=0, atol=0)
    assert sum(p.requires_grad for p in model.parameters()) >= 1
    assert all(".bitfit_delta." in n for n, p in model.named_parameters() if p.requires_grad)


@SETTINGS
@given(cases(), st.integers(0, 1000))
def test_save_load_round_trip_is_exact(case: Case, seed: int) -> None:
    model = _wrap(case, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = PeftModel.from_pretrained(copy.deepcopy(case.base), tmp).eval()
    want, got = _deltas(model), _deltas(loaded)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    torch.testing.assert_close(_run(loaded, case.x), _run(model, case.x), rtol=0, atol=0)


@SETTINGS
@given(cases(), st.integers(0, 1000))
def test_merge_unmerge_restores_the_base_exactly(case: Case, seed: int) -> None:
    model = _wrap(case, seed=seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = _run(model, case.x)
    model.merge_adapter()
    torch.testing.assert_close(_run(model, case.x), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    after = model.state_dict()
    assert after.keys() == before.keys()  # created biases are removed again
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    torch.testing.assert_close(_run(model, case.x), unmerged, rtol=0, atol=0)


@SETTINGS
@given(cases(), st.integers(0, 1000), st.data())
def test_mixed_batch_equals_per_adapter_runs(case: Case, seed: int, data: st.DataObject) -> None:
    model = _wrap(case, "task_a", seed=seed)
    model.add_adapter("task_b", copy.deepcopy(case.config))
    _randomize(model, "task_b", seed + 1)
    model.eval()
    batch = case.x.shape[0]
    names = data.draw(st.lists(st.sampled_from(["task_a", "task_b", "__base__"]), min_size=batch, max_size=batch))
    mixed = _run(model, case.x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                want = _run(model, case.x[i : i + 1])
        else:
            model.set_adapter(name)
            want = _run(model, case.x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], want, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(cases(), st.integers(0, 1000))
def test_weighted_adapter_one_zero_equals_first(case: Case, seed: int) -> None:
    model = _wrap(case, "task_a", seed=seed)
    other = copy.deepcopy(case.config)
    other.add_missing_bias = True  # b may cover more layers than a
    other.target_modules, other.exclude_modules, other.layers_to_transform = None, None, None
    model.add_adapter("task_b", other)
    _randomize(model, "task_b", seed + 1)
    model.base_model.add_weighted_adapter(["task_a", "task_b"], [1.0, 0.0], "task_c")
    model.eval()
    for module in model.modules():
        if isinstance(module, BitFitLayer) and "task_c" in module.bitfit_delta:
            want = module.delta_of("task_a") if "task_a" in module.bitfit_delta else None
            got = module.delta_of("task_c")
            assert torch.equal(got, want) if want is not None else not got.any()
    model.set_adapter("task_a")
    want = _run(model, case.x)
    model.set_adapter("task_c")
    torch.testing.assert_close(_run(model, case.x), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_without_bias_only_with_add_missing_bias(bias: bool) -> None:
    """A fixed example the strategy also covers: ``LayerNorm(bias=False)`` needs ``add_missing_bias``."""
    base = nn.Sequential(nn.Linear(4, 4, bias=False), nn.LayerNorm(4, bias=bias))
    if bias:
        assert set(get_peft_model(copy.deepcopy(base), BitFitConfig()).base_model.bitfit_layers()) == {"1"}
    else:
        with pytest.raises(BitFitError, match="add_missing_bias=True"):
            get_peft_model(copy.deepcopy(base), BitFitConfig())
