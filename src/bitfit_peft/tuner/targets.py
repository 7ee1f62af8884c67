"""Which modules a BitFit adapter adapts; config regexes are matched in bounded time.

``target_modules`` / ``exclude_modules`` / ``layers_pattern`` come from strangers' ``adapter_config.json`` files, and
backtracking ``re`` (PEFT's matcher) can spend minutes on ``(a+)+$``. :func:`check_config` (run when a config is read)
caps their size and refuses regex shapes that backtrack badly; :func:`resolve_targets` matches with the ``regex``
module under ``PATTERN_TIMEOUT_S`` per match and ``PATTERN_BUDGET_S`` in all, and leaves ``layers_to_transform`` /
``layers_pattern`` to PEFT's ``check_target_module_exists`` on a shadow config holding no pattern.

Example:
    >>> import torch
    >>> from bitfit_peft import BitFitConfig
    >>> from bitfit_peft.tuner.targets import resolve_targets
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    >>> found = resolve_targets(net, BitFitConfig(exclude_modules="1"))
    >>> sorted(found), sorted(found.excluded)
    (['0'], ['1'])
"""

from __future__ import annotations

import importlib
import re
import time
from collections.abc import Callable, Iterable, Iterator
from types import SimpleNamespace
from typing import Any

import regex
import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils import ModulesToSaveWrapper
from torch import nn

from bitfit_peft.errors import BitFitError
from bitfit_peft.tasks import task_of
from bitfit_peft.tuner.base_modules import FUSED_TYPES, can_merge_into
from bitfit_peft.tuner.groups import KNOWN_MODEL_TYPES, group_of, is_norm_module, layer_index
from bitfit_peft.tuner.layer import BitFitLayer

_sre: Any = getattr(re, "_parser", None) or importlib.import_module("sre_parse")  # stdlib's parser: private, stable

PATTERN_TIMEOUT_S = 0.05  #: longest one regex may take on one module name
PATTERN_BUDGET_S = 1.0  #: total regex matching time allowed for one resolution
MAX_PATTERN_CHARS = 2_000
MAX_LIST_ENTRIES = 10_000
MAX_QUANTIFIERS = 8  #: variable-length quantifiers (``*``, ``+``, ``?``, ``{m,n}``) per regex (more: slow backtracking)

#: PEFT adds these heads to modules_to_save for some task types only after the targets are chosen.
_FIX = "use a list of module names or a simpler regex"
_MODULE_PATH = re.compile(r"[A-Za-z_][\w.]*")
_INTERNAL = (".modules_to_save.", ".original_module.", ".base_layer.", ".bitfit_delta.")
_NO_PATTERNS = {"exclude_modules": None, "modules_to_save": None, "target_parameters": None}
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT)}


class Resolution(set[str]):
    """The selected module names, plus ``excluded``: every module name ``exclude_modules`` matched."""

    def __init__(self, targets: Iterable[str] = (), excluded: Iterable[str] = ()) -> None:
        super().__init__(targets)
        self.excluded: frozenset[str] = frozenset(excluded)


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _refuse(field: str, pattern: str, problem: str) -> BitFitError:
    return BitFitError(f"BitFitConfig.{field}: the regex {_short(pattern)} {problem}; {_FIX}.")


def _subpatterns(av: Any) -> Iterator[Any]:
    if isinstance(av, _sre.SubPattern):
        yield av
    elif isinstance(av, (tuple, list)):
        for item in av:
            yield from _subpatterns(item)


def _screen(field: str, pattern: str) -> None:
    """Refuse an over-long regex, or one whose shape can backtrack for minutes in ``re`` (used by PEFT)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise _refuse(field, pattern, f"is {len(pattern)} characters long (over {MAX_PATTERN_CHARS})")
    try:
        tree = _sre.parse(pattern)
    except (re.error, OverflowError, RecursionError):
        return  # invalid: the config's compile check (or regex.compile) says why
    variable, stack = 0, [(tree, False)]  # (sub-pattern, inside a repeated group)
    while stack:
        items, repeated = stack.pop()
        for op, av in items:
            if op in _REPEATS:
                low, high, body = av
                if repeated:
                    raise _refuse(field, pattern, "nests a quantifier inside a repeated group (slow backtracking)")
                variable += high > low
                stack.append((body, high > 1))
            elif op == _sre.BRANCH and repeated:
                raise _refuse(field, pattern, "repeats a group holding '|' (slow backtracking)")
            else:
                stack.extend((sub, repeated) for sub in _subpatterns(av))
    if variable > MAX_QUANTIFIERS:
        raise _refuse(field, pattern, f"has {variable} variable-length quantifiers (over {MAX_QUANTIFIERS})")


def check_config(config: Any) -> None:
    """Bound ``target_modules`` / ``exclude_modules`` and check ``layers_pattern``; raise a one-line
    :class:`BitFitError` naming the field. Values of the wrong type are left to ``BitFitConfig._validate``."""
    for field in ("target_modules", "exclude_modules"):
        value = getattr(config, field, None)
        if isinstance(value, str):
            _screen(field, value)
        elif isinstance(value, (list, tuple, set)) and len(value) > MAX_LIST_ENTRIES:
            raise BitFitError(
                f"BitFitConfig.{field}: {len(value)} entries (over {MAX_LIST_ENTRIES}); list fewer names "
                "(a name also matches as a suffix: 'query' selects every '....query') or use a simpler regex."
            )
    pattern = getattr(config, "layers_pattern", None)
    items = [pattern] if isinstance(pattern, str) else pattern
    if items is not None and not (
        isinstance(items, list) and all(isinstance(p, str) and _MODULE_PATH.fullmatch(p) for p in items)
    ):
        raise BitFitError(
            f"BitFitConfig.layers_pattern: {_short(str(pattern))} is not a module-name path (or a list of them); "
            "pass the name of the ModuleList holding the layers, e.g. 'layers' or 'h' (letters, digits, '_', '.')."
        )


def _matcher(field: str, value: Any, deadline: float) -> Callable[[str], bool] | None:
    """``name -> bool`` by PEFT's rules: a str is a full-match regex (bounded), a list names or dotted suffixes."""
    if value is None:
        return None
    if not isinstance(value, str):
        wanted = frozenset(value)
        return lambda name: any(".".join(parts[i:]) in wanted for parts in [name.split(".")] for i in range(len(parts)))
    try:
        compiled = regex.compile(value)
    except regex.error as err:
        raise _refuse(field, value, f"is not a valid regex ({err})") from None

    def match(name: str) -> bool:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            return compiled.fullmatch(name, timeout=min(PATTERN_TIMEOUT_S, left)) is not None
        except TimeoutError:
            if left < PATTERN_TIMEOUT_S:
                raise _refuse(field, value, f"used up the {PATTERN_BUDGET_S:g} s matching budget") from None
            raise _refuse(field, value, f"took over {PATTERN_TIMEOUT_S:g} s to match module {_short(name)}") from None

    return match


def _in_layers(name: str, config: Any, exact: bool) -> bool:
    """``layers_to_transform`` / ``layers_pattern`` as PEFT applies them (names listed exactly are kept)."""
    wanted = config.layers_to_transform
    if wanted is None or exact or isinstance(config.target_modules, str):
        return True
    if config.target_modules is None and not config.layers_pattern:  # BitFit's rule: the first numeric component
        # (PEFT's default needs a component before the layer list: no layer in LlamaModel's "layers.0.*" or "0.*")
        return layer_index(name) in ([wanted] if isinstance(wanted, int) else wanted)
    if "." not in name:
        return False  # PEFT's layer rules need "<list>.<index>." in the name
    # PEFT skips its layer rules for a name listed exactly, so the shadow lists the leaf (a suffix) instead
    shadow = SimpleNamespace(**_NO_PATTERNS, target_modules=[name.rsplit(".", 1)[1]], layers_to_transform=wanted)
    shadow.layers_pattern = config.layers_pattern
    return bool(check_target_module_exists(shadow, name))


def is_supported(module: nn.Module, name: str) -> bool:
    """Linear / Conv1D / ConvNd, or LayerNorm-like with a weight."""
    norm = is_norm_module(name, module) and isinstance(getattr(module, "weight", None), torch.Tensor)
    return isinstance(module, FUSED_TYPES) or norm


def has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


def resolve_targets(model: nn.Module, config: Any) -> Resolution:
    """The modules ``config`` selects in ``model``, with ``.excluded``; a one-line :class:`BitFitError` if there
    are none, or if a pattern is refused or too slow to match."""
    check_config(config)
    head = set(config.modules_to_save or [])
    head |= set(task_of(config.task_type).heads)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    groups = config.bias_terms if isinstance(config.bias_terms, list) else None
    if groups is not None and config.target_modules is None and model_type not in KNOWN_MODEL_TYPES:
        raise BitFitError(
            f"bias_terms={config.bias_terms} needs a known architecture, but model_type={model_type!r} has no "
            "group mapping. Use bias_terms='all', or name the modules with target_modules=[...] "
            "(e.g. ['query', 'intermediate.dense'])."
        )
    deadline = time.monotonic() + PATTERN_BUDGET_S
    target = _matcher("target_modules", config.target_modules, deadline)
    exclude = _matcher("exclude_modules", config.exclude_modules, deadline)
    listed = frozenset(config.target_modules) if isinstance(config.target_modules, (list, tuple, set)) else ()
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    selected, excluded, unsupported, bias_free = set[str](), set[str](), list[str](), list[str]()
    for name, module in model.named_modules():
        if not name:
            continue
        if exclude is not None and exclude(name):
            excluded.add(name)
            continue
        if isinstance(module, ModulesToSaveWrapper) or any(part in f".{name}." for part in _INTERNAL):
            continue
        if any(name.endswith(h) or name.startswith(h + ".") or f".{h}." in name for h in head):
            continue
        if isinstance(module, BaseTunerLayer):
            if not isinstance(module, BitFitLayer):
                continue
            module = module.get_base_layer()
        if target is not None:
            if not target(name) or not _in_layers(name, config, exact=name in listed):
                continue
            if not is_supported(module, name):
                unsupported.append(f"{name} ({type(module).__name__})")
                continue
        else:
            if not is_supported(module, name) or module is output_embeddings:
                continue
            if not has_bias(module) and not can_merge_into(module):
                continue  # e.g. RMSNorm: a bias there could never be merged; target it explicitly if wanted
            if groups is not None and not set(group_of(name, module)) & set(groups):
                continue
            if not _in_layers(name, config, exact=False):
                continue
        if not has_bias(module) and not config.add_missing_bias:
            bias_free.append(name)
            continue
        selected.add(name)
    if unsupported:
        raise BitFitError(
            f"target_modules selects modules BitFit cannot adapt: {unsupported[:5]}. BitFit supports Linear, "
            "Conv1D, Conv1d/2d/3d and LayerNorm-like modules; narrow target_modules or add exclude_modules."
        )
    if not selected:
        hint = (
            f" {len(bias_free)} matching module(s) have no bias (e.g. {bias_free[0]}); set add_missing_bias=True "
            "to give them a zero-initialised bias delta."
            if bias_free
            else " Check bias_terms / target_modules / exclude_modules / layers_to_transform."
        )
        raise BitFitError(f"BitFit found no bias to tune in {type(model).__name__}.{hint}")
    return Resolution(selected, excluded)
