"""Target selection (``bitfit_peft.tuner.targets``): bounded config regexes, ``layers_pattern``, ``exclude_modules``,
and the same selection as the 0.1.0 implementation (kept below as ``_old_resolve``) on the tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from functools import cache
from pathlib import Path

import peft.tuners.tuners_utils as tuners_utils
import pytest
import torch
from conftest import ARCHS, DEFAULT_TASK, make_tiny_model
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists, inspect_matched_modules
from peft.utils import ModulesToSaveWrapper
from torch import nn

from bitfit_peft import BitFitConfig, BitFitError, BitFitLayer
from bitfit_peft.tuner import targets
from bitfit_peft.tuner.base_modules import FUSED_TYPES, can_merge_into
from bitfit_peft.tuner.groups import KNOWN_MODEL_TYPES, group_of, is_norm_module, layer_index

FIX = "use a list of module names or a simpler regex"

# ---------------------------------------------------------------------------------------------- pathological regexes
# Each case runs in ONE subprocess with a hard timeout, so a regression cannot hang CI. The crafted module names
# make the patterns catastrophic for Python's `re` (before this module: > 20 s each, killed); the last pattern
# passes the static screen and is stopped by the `regex` timeout instead.
SLOW = {
    "nested_plus": r"(a+)+$",
    "ambiguous_alt": r"(x|x?)+y",
    "counted_star": r"(.*a){20}",
    "bert_names": r"([\w.]+)+!",
    "lazy_poly": r".*?a.*?a.*?a.*?a.*?a.*?a.*?a.*?Z",
}
FIELDS = ("target_modules", "exclude_modules")
CASES = [(f"{k}-{f}-{w}", f, SLOW[k]) for k in SLOW for f in FIELDS for w in ("mem", "disk")]
CASES += [("layers_pattern-disk", "layers_pattern", r"(a+)+")]
_SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile, time, warnings
    warnings.filterwarnings("ignore")
    from peft import PeftModel, get_peft_model
    from torch import nn
    from bitfit_peft import BitFitConfig
    def crafted():
        net = nn.Module()
        for name in ("a" * 30 + "b", "x" * 30, "a" * 300, "dense"):
            net.add_module(name, nn.Linear(2, 2))
        return net
    for case_id, field, pattern in json.loads(sys.argv[1]):
        kwargs = {field: pattern, **({"layers_to_transform": [0]} if field == "layers_pattern" else {})}
        start = time.perf_counter()
        try:
            if case_id.endswith("disk"):
                folder = tempfile.mkdtemp()
                with open(folder + "/adapter_config.json", "w") as f:
                    json.dump({"peft_type": "BITFIT", **kwargs}, f)
                PeftModel.from_pretrained(crafted(), folder)
            else:
                get_peft_model(crafted(), BitFitConfig(**kwargs))
            kind, message = "none", ""
        except Exception as err:
            kind, message = type(err).__name__, str(err)
        print(json.dumps([case_id, time.perf_counter() - start, kind, message]), flush=True)
    """
)


@pytest.fixture(scope="module")
def slow_results() -> dict[str, tuple[float, str, str]]:
    cmd = [sys.executable, "-c", _SCRIPT, json.dumps(CASES)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    except subprocess.TimeoutExpired as err:  # keep the cases that finished; the rest fail as "hung"
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
    return {row[0]: tuple(row[1:]) for row in map(json.loads, out.splitlines())}


@pytest.mark.parametrize(("case_id", "field", "pattern"), CASES, ids=[c[0] for c in CASES])
def test_pathological_pattern_refused_fast(slow_results: dict, case_id: str, field: str, pattern: str) -> None:
    assert case_id in slow_results, f"{case_id}: no result within the subprocess's 120 s hard timeout (hung?)"
    seconds, kind, message = slow_results[case_id]
    assert seconds < 5, f"{case_id} took {seconds:.1f} s"
    assert kind == "BitFitError", (kind, message)
    assert "\n" not in message and f"BitFitConfig.{field}" in message and repr(pattern)[:20] in message
    assert FIX in message or "module-name path" in message


def test_timeout_and_budget_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    net = nn.Module()
    net.add_module("a" * 300, nn.Linear(2, 2))
    with pytest.raises(BitFitError, match=r"took over 0.05 s to match module 'aaa.*simpler regex\.$"):
        targets.resolve_targets(net, BitFitConfig(target_modules=SLOW["lazy_poly"]))
    monkeypatch.setattr(targets, "PATTERN_BUDGET_S", 0.0)
    with pytest.raises(BitFitError, match=r"exclude_modules: .* used up the 0 s matching budget"):
        targets.resolve_targets(net, BitFitConfig(exclude_modules="b"))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"target_modules": "a" * 2001}, "2001 characters long (over 2000)"),
        ({"exclude_modules": [f"m{i}" for i in range(10_001)]}, "10001 entries (over 10000)"),
        ({"target_modules": ".*" * 9 + "x"}, "9 variable-length quantifiers (over 8)"),
        ({"exclude_modules": r"(query|key)+"}, "repeats a group holding '|'"),
        ({"layers_pattern": "lay(er)+"}, "layers_pattern: 'lay(er)+' is not a module-name path"),
        ({"layers_pattern": ["layer", "h|x"]}, "layers_pattern"),
        ({"layers_pattern": 3}, "layers_pattern"),
    ],
)
def test_bounds_refused_when_config_is_read(kwargs: dict, words: str) -> None:
    with pytest.raises(BitFitError, match=f"BitFitConfig.{next(iter(kwargs))}") as info:
        BitFitConfig(**kwargs)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_ordinary_regexes_still_accepted() -> None:
    ordinary = [r".*\.(query|value)$", r"model\.layers\.\d+\.self_attn\.(q|v)_proj", r".*(q|v)$"]
    ordinary += [r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$", r"(?:encoder|decoder)\.block\.[01]\..*"]
    for pattern in ordinary:
        BitFitConfig(target_modules=pattern, exclude_modules=pattern)
    for pattern in ("layer", "h", "model.layers", ["layers", "blocks"]):
        BitFitConfig(layers_to_transform=[0], layers_pattern=pattern)


def test_peft_regex_matcher_sees_no_config_pattern_but_tied_module_check(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    original = tuners_utils.match_target_against_key
    monkeypatch.setattr(tuners_utils, "match_target_against_key", lambda p, k: calls.append((p, k)) or original(p, k))
    config = BitFitConfig(target_modules=r".*\.(query|value)", exclude_modules=r".*\.0\..*")
    model = get_peft_model(make_tiny_model("bert"), config)
    assert {k for _, k in calls} <= {"embed_tokens", "lm_head"}  # only BaseTuner._check_tied_modules (known)
    matched = inspect_matched_modules(model.base_model)["matched"]
    expected = ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]
    assert sorted(matched) == sorted(model.base_model._resolved_targets["default"]) == expected


# ---------------------------------------------------------------------------------------------- layers / exclude
def _layers(model: nn.Module) -> list[str]:
    return sorted(n for n, m in model.get_base_model().named_modules() if isinstance(m, BitFitLayer))


def test_layers_pattern_without_target_modules() -> None:
    everything = targets.resolve_targets(make_tiny_model("bert"), BitFitConfig())
    model = get_peft_model(make_tiny_model("bert"), BitFitConfig(layers_to_transform=[0], layers_pattern="layer"))
    assert _layers(model) == sorted(n for n in everything if ".layer.0." in n) and len(_layers(model)) == 8
    with pytest.raises(BitFitError, match="found no bias to tune"):
        get_peft_model(make_tiny_model("bert"), BitFitConfig(layers_to_transform=[0], layers_pattern="nonexistent"))
    llama = make_tiny_model("llama", task="base")  # "layers.0....": PEFT's ^layers\. rule
    config = BitFitConfig(bias_terms=["query"], layers_to_transform=1, layers_pattern="layers", add_missing_bias=True)
    assert sorted(targets.resolve_targets(llama, config)) == ["layers.1.self_attn.q_proj"]


_BERT_Q1 = "bert.encoder.layer.1.attention.self.query"


def test_layers_pattern_with_target_modules() -> None:
    config = BitFitConfig(target_modules=["query", "c_attn"], layers_to_transform=[1], layers_pattern=["layer", "h"])
    assert sorted(targets.resolve_targets(make_tiny_model("bert"), config)) == [_BERT_Q1]
    assert sorted(targets.resolve_targets(make_tiny_model("gpt2"), config)) == ["transformer.h.1.attn.c_attn"]


def test_exclude_modules_list_and_regex() -> None:
    bert = make_tiny_model("bert")
    names = [n for n, _ in bert.named_modules()]
    for exclude in (["LayerNorm"], r".*LayerNorm"):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "You have passed exclude_modules")  # "...but no modules were excluded"
            model = get_peft_model(make_tiny_model("bert"), BitFitConfig(task_type="SEQ_CLS", exclude_modules=exclude))
        assert _layers(model) and not any(n.endswith("LayerNorm") for n in _layers(model))
        assert model.base_model._resolved_targets["default"].excluded == {n for n in names if n.endswith("LayerNorm")}
    found = targets.resolve_targets(bert, BitFitConfig(target_modules=["query", "value"], exclude_modules=r".*\.0\..*"))
    assert sorted(found) == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]


# ---------------------------------------------------------------------------------------------- parity with 0.1.0
_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _is_supported(module: nn.Module, name: str) -> bool:
    if isinstance(module, FUSED_TYPES):
        return True
    return is_norm_module(name, module) and isinstance(getattr(module, "weight", None), torch.Tensor)


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


def _old_resolve(model: nn.Module, config: BitFitConfig) -> set[str]:
    """``BitFitModel.resolve_targets`` as of 0.1.0 (verbatim but for the error type; unbounded ``re``)."""
    head = set(config.modules_to_save or [])
    head |= set(_TASK_HEADS.get(str(getattr(config.task_type, "value", config.task_type)), ()))
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(config.bias_terms, list) and config.target_modules is None and model_type not in KNOWN_MODEL_TYPES:
        raise BitFitError(f"bias_terms={config.bias_terms} needs a known architecture ...")
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    selected: set[str] = set()
    unsupported: list[str] = []
    bias_free: list[str] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, ModulesToSaveWrapper):
            continue
        if isinstance(module, BaseTunerLayer):
            if not isinstance(module, BitFitLayer):
                continue
            module = module.get_base_layer()
        if any(name.endswith(h) or name.startswith(h + ".") or f".{h}." in name for h in head):
            continue
        if any(f".{part}." in f".{name}." for part in ("modules_to_save", "original_module", "base_layer")):
            continue
        if ".bitfit_delta." in f".{name}.":
            continue
        if config.target_modules is not None:
            matched = check_target_module_exists(config, name)
            if not matched or type(matched).__name__ == "_ExcludedModule":
                continue
            if not _is_supported(module, name):
                unsupported.append(f"{name} ({type(module).__name__})")
                continue
        else:
            if not _is_supported(module, name) or module is output_embeddings:
                continue
            if not _has_bias(module) and not can_merge_into(module):
                continue
            if isinstance(config.bias_terms, list) and not set(group_of(name, module)) & set(config.bias_terms):
                continue
            if config.exclude_modules is not None:
                if check_target_module_exists(BitFitConfig(target_modules=config.exclude_modules), name):
                    continue
            if config.layers_to_transform is not None:
                wanted = config.layers_to_transform
                wanted = [wanted] if isinstance(wanted, int) else wanted
                if layer_index(name) not in wanted:
                    continue
        if not _has_bias(module) and not config.add_missing_bias:
            bias_free.append(name)
            continue
        selected.add(name)
    if unsupported:
        raise BitFitError(f"target_modules selects modules BitFit cannot adapt: {unsupported[:5]}.")
    if not selected:
        raise BitFitError("BitFit found no bias to tune" + (f" ({len(bias_free)} without bias)" if bias_free else ""))
    return selected


_Q = ["query", "q_proj", "c_attn", "q", "q_lin"]
_PATTERN = {"bert": "layer", "roberta": "layer", "distilbert": "layer", "vit": "layers", "gpt2": "h", "qwen2": "layers",
            "llama": "layers", "t5": "block"}  # fmt: skip
CONFIGS = {
    "all": {},
    "all+missing": {"add_missing_bias": True},
    "groups": {"bias_terms": ["query", "intermediate"], "add_missing_bias": True},
    "layernorm": {"bias_terms": ["layernorm"]},
    "layers": {"layers_to_transform": [1], "add_missing_bias": True},
    "layer0": {"layers_to_transform": 0},
    "exclude_list": {"exclude_modules": ["LayerNorm", "layer_norm", "ln_1", "final_layer_norm"]},
    "exclude_regex": {"exclude_modules": r".*\.(0|1)\..*(attention|attn|SelfAttention).*", "add_missing_bias": True},
    "targets": {"target_modules": _Q, "add_missing_bias": True},
    "targets_regex": {"target_modules": r".*(query|q_proj|c_attn|\.q|q_lin)", "add_missing_bias": True},
    "targets_layers": {"target_modules": [*_Q, "dense", "o"], "layers_to_transform": [1], "add_missing_bias": True},
    "targets_pattern": {"target_modules": _Q, "layers_to_transform": [0], "layers_pattern": "PATTERN"},
    "targets_exclude": {"target_modules": [*_Q, "LayerNorm"], "exclude_modules": r".*\.0\..*"},
    "exact_names_skip_layers": {
        "target_modules": ["lm_head", "classifier"],
        "layers_to_transform": [1],
        "add_missing_bias": True,
    },
    "unsupported": {"target_modules": ["word_embeddings", "wte", "embed_tokens", "shared"]},
    "save_pooler": {"modules_to_save": ["pooler"], "bias_terms": ["layernorm", "output"]},
}


@cache
def _model(arch: str) -> nn.Module:
    return make_tiny_model(arch)


def _outcome(fn, model: nn.Module, config: BitFitConfig) -> object:  # noqa: ANN001
    try:
        return sorted(fn(model, config))
    except BitFitError as err:
        return str(err).split(" in ")[0].split(":")[0].split(" (")[0]  # the kind of error, not the wording


@pytest.mark.parametrize("arch", ARCHS)
def test_same_selection_as_before(arch: str) -> None:
    task = {"seq_cls": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "seq2seq_lm": "SEQ_2_SEQ_LM"}.get(DEFAULT_TASK[arch])
    model = _model(arch)
    for name, kwargs in CONFIGS.items():
        kwargs = {k: (_PATTERN[arch] if v == "PATTERN" else v) for k, v in kwargs.items()}
        config = BitFitConfig(task_type=task, **kwargs)
        new, old = _outcome(targets.resolve_targets, model, config), _outcome(_old_resolve, model, config)
        assert new == old, f"{arch}/{name}"
        if config.exclude_modules is not None:
            matcher = BitFitConfig(target_modules=config.exclude_modules)
            want = {n for n, _ in model.named_modules() if n and check_target_module_exists(matcher, n)}
            if isinstance(new, list):
                assert targets.resolve_targets(model, config).excluded == want, f"{arch}/{name}"


def test_resolution_survives_copy_and_pickle(tmp_path: Path) -> None:
    import copy
    import pickle

    found = targets.resolve_targets(_model("bert"), BitFitConfig(exclude_modules=["LayerNorm"]))
    for clone in (copy.deepcopy(found), pickle.loads(pickle.dumps(found))):
        assert clone == found and clone.excluded == found.excluded and isinstance(clone, set)


def test_disk_config_with_layers_pattern(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "BITFIT", "layers_pattern": "x+"}))
    with pytest.raises(ValueError, match=r"^BitFitConfig.layers_pattern: 'x\+' is not a module-name path"):
        PeftModel.from_pretrained(make_tiny_model("bert"), str(tmp_path))
