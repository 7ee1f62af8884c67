"""Configuration of a BitFit adapter."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils import PeftType

from bitfit_peft.files.fingerprint import check_stored
from bitfit_peft.names import SAVE_DTYPE_NAMES
from bitfit_peft.tuner.groups import BIAS_GROUPS
from bitfit_peft.tuner.targets import check_config
from bitfit_peft.utils import DTYPES

BiasTerms = Literal["all"] | list[str]
SAVE_DTYPES = {name: DTYPES[name] for name in SAVE_DTYPE_NAMES}


@dataclass
class BitFitConfig(PeftConfig):
    """Configuration for :class:`bitfit_peft.BitFitModel` (bias-only fine-tuning, arXiv 2106.10199).

    Args:
        bias_terms: ``"all"`` (default): every bias of every Linear / Conv1D / ConvNd / LayerNorm-like module of
            the backbone, as in the paper; or a list of named groups, resolved per architecture:
            ``query``, ``key``, ``value``, ``attention_output``, ``intermediate``, ``output``, ``layernorm``
            (``["query", "intermediate"]`` is the paper's b_q + b_m2 subset). See ``bitfit_peft.tuner.groups``.
        target_modules: PEFT-style override: module names (exact or name suffix) or one regex (full match).
            Takes precedence over ``bias_terms``.
        exclude_modules: modules never targeted (same syntax).
        layers_to_transform: only these layer indices (int or list of ints).
        layers_pattern: name of the ModuleList holding the layers (used with ``layers_to_transform``).
        add_missing_bias: targeted layers without a bias (Llama, T5, Qwen2 ``o_proj``...) get a zero-initialised
            delta, so outputs are unchanged at init; merging such an adapter creates the bias parameter.
        modules_to_save: extra modules trained and saved in full (the classifier head is added automatically
            for ``task_type="SEQ_CLS"`` / ``"TOKEN_CLS"``).
        init_weights: zero-initialise the deltas (default). ``False`` draws small random deltas (tests only).
        save_dtype: dtype of the deltas in the saved file: ``"float32"`` (default), ``"bfloat16"`` or
            ``"float16"`` (half the size; deltas are loaded back into fp32).
        prune_tolerance: if set, delta vectors whose mean absolute value is below it are left out of the saved
            file and load as zero (the paper finds changes concentrate in a few vectors). ``None`` keeps all.
        base_fingerprint: filled in on save: identifies the base model the deltas were trained on (any dtype of
            it); see ``bitfit_peft.files.fingerprint``.
        num_labels: filled in on save for a task with a head (``SEQ_CLS``, ``TOKEN_CLS``): the head's size, so that
            the adapter folder describes its task. ``PeftModel.from_pretrained`` sizes the base's head from it (see
            ``bitfit_peft.compat.task_head``).
        id2label: filled in on save with ``num_labels``: the label names (``{"0": "ham", "1": "spam"}``).

    Example:
        >>> from bitfit_peft import BitFitConfig
        >>> BitFitConfig(task_type="SEQ_CLS", bias_terms=["query", "intermediate"]).bias_terms
        ['query', 'intermediate']
    """

    bias_terms: str | list[str] = field(
        default="all",
        metadata={"help": "'all' or a list of bias groups: " + ", ".join(BIAS_GROUPS)},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names (exact/suffix) or a regex; overrides bias_terms."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex never targeted."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer ModuleList, used with layers_to_transform."}
    )
    add_missing_bias: bool = field(
        default=False, metadata={"help": "Give bias-free targeted layers a zero-initialised bias delta."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained and saved in full besides the bias deltas."}
    )
    init_weights: bool = field(default=True, metadata={"help": "Zero-initialise the deltas."})
    save_dtype: str = field(
        default="float32", metadata={"help": "Dtype of the saved deltas: float32, bfloat16 or float16."}
    )
    prune_tolerance: float | None = field(
        default=None, metadata={"help": "Drop delta vectors with mean |delta| below this from the saved file."}
    )
    base_fingerprint: dict | str | None = field(
        default=None, metadata={"help": "Fingerprint of the base model's targeted modules (set on save)."}
    )

    num_labels: int | None = field(
        default=None, metadata={"help": "Size of the task head the adapter was trained with (set on save)."}
    )
    id2label: dict[str, str] | None = field(
        default=None, metadata={"help": "Label names of the task head, by index (set on save)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.BITFIT
        self._validate()
        if isinstance(self.target_modules, list):
            self.target_modules = sorted(set(self.target_modules))

    def _validate(self) -> None:
        def fail(field_name: str, problem: str, fix: str) -> None:
            raise ValueError(f"BitFitConfig.{field_name}: {problem}. {fix}")

        if isinstance(self.bias_terms, str):
            if self.bias_terms != "all":
                fail("bias_terms", f"got {self.bias_terms!r}", "Use 'all' or a list of group names.")
        elif isinstance(self.bias_terms, (list, tuple, set)):
            terms = list(self.bias_terms)
            if not terms or not all(isinstance(t, str) for t in terms):
                fail(
                    "bias_terms",
                    "must be a non-empty list of group names",
                    f"Choose from {list(BIAS_GROUPS)}.",
                )
            unknown = sorted(set(terms) - set(BIAS_GROUPS))
            if unknown:
                fail(
                    "bias_terms",
                    f"unknown group(s) {unknown}",
                    f"Known groups: {list(BIAS_GROUPS)}; to pick modules by name use target_modules instead.",
                )
            self.bias_terms = list(dict.fromkeys(terms))
        else:
            fail("bias_terms", f"must be 'all' or a list, got {type(self.bias_terms).__name__}", "")

        check_config(self)  # pattern/list sizes, regexes that backtrack badly, layers_pattern a module-name path
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, set):
                value = sorted(value)
                setattr(self, name, value)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as err:
                    fail(name, f"invalid regex {value!r} ({err})", "Pass a valid regex or a list of names.")
            elif not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
                fail(name, f"must be a list of module names or a regex string, got {value!r}", "")
        ltt = self.layers_to_transform
        if ltt is not None:
            items = [ltt] if isinstance(ltt, int) else ltt
            if not isinstance(items, list) or not all(isinstance(i, int) and i >= 0 for i in items):
                fail("layers_to_transform", f"got {ltt!r}", "Pass a non-negative int or a list of them.")
            if isinstance(self.target_modules, str):
                fail(
                    "layers_to_transform",
                    "cannot be combined with a regex target_modules",
                    "Encode the layer indices in the regex, or pass target_modules as a list.",
                )
        for name in ("add_missing_bias", "init_weights", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                fail(name, f"must be a bool, got {getattr(self, name)!r}", "")
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, list) and all(isinstance(m, str) for m in self.modules_to_save)
        ):
            fail("modules_to_save", f"must be a list of module names, got {self.modules_to_save!r}", "")
        if self.save_dtype not in SAVE_DTYPES:
            fail("save_dtype", f"got {self.save_dtype!r}", f"Use one of {sorted(SAVE_DTYPES)}.")
        tol = self.prune_tolerance
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0):
            fail("prune_tolerance", f"must be a number >= 0 or None, got {tol!r}", "")
        self._validate_labels(fail)
        fp = self.base_fingerprint
        if fp is not None and not isinstance(fp, (str, dict)):
            fail(
                "base_fingerprint",
                f"must be a fingerprint object (version 2 or 3) or a 0.1.0 'sha256:' string, got {str(fp)[:60]!r}",
                "Remove it from adapter_config.json to skip the check.",
            )
        check_stored(fp)  # finite, bounded numbers: a stored norm of 1e30 or inf would accept any base

    def _validate_labels(self, fail: Callable[[str, str, str], None]) -> None:
        """``num_labels`` a positive int, ``id2label`` index -> name (keys as strings, in index order)."""
        n = self.num_labels
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            fail("num_labels", f"must be a positive int or None, got {n!r}", "")
        if self.id2label is not None:
            if not isinstance(self.id2label, dict) or not all(str(k).isdigit() for k in self.id2label):
                fail("id2label", f"must map label indices to names, got {str(self.id2label)[:60]!r}", "")
            self.id2label = {str(k): str(v) for k, v in sorted(self.id2label.items(), key=lambda kv: int(kv[0]))}


def allow_base_mismatch(config: BitFitConfig) -> BitFitConfig:
    """Mark ``config`` so loading skips the base-model fingerprint check (intentional transfer)."""
    config._skip_fingerprint = True
    return config
