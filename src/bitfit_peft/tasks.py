"""The one table of task types: PEFT's ``task_type``, the transformers Auto class, the ``AutoPeftModel`` class, the
Hub ``pipeline_tag``, and the head modules PEFT puts into ``modules_to_save`` for it; plus the user spellings.

Example:
    >>> TASKS["SEQ_CLS"].pipeline_tag, peft_task_type("seq-cls"), auto_model_class("CAUSAL_LM").__name__
    ('text-classification', 'SEQ_CLS', 'AutoModelForCausalLM')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import transformers


@dataclass(frozen=True)
class Task:
    """What bitfit-peft knows about one PEFT task type."""

    auto_model: str  #: transformers Auto class that loads a base for it
    auto_peft: str | None  #: PEFT's AutoPeftModel class (None: no such class)
    pipeline_tag: str | None  #: Hub pipeline tag for the model card
    heads: tuple[str, ...] = ()  #: head modules PEFT adds to ``modules_to_save`` after the targets are chosen


TASKS: dict[str | None, Task] = {
    "SEQ_CLS": Task(
        "AutoModelForSequenceClassification",
        "AutoPeftModelForSequenceClassification",
        "text-classification",
        ("classifier", "score"),
    ),
    "TOKEN_CLS": Task(
        "AutoModelForTokenClassification",
        "AutoPeftModelForTokenClassification",
        "token-classification",
        ("classifier", "score"),
    ),
    "CAUSAL_LM": Task("AutoModelForCausalLM", "AutoPeftModelForCausalLM", "text-generation"),
    "SEQ_2_SEQ_LM": Task("AutoModelForSeq2SeqLM", "AutoPeftModelForSeq2SeqLM", "text2text-generation"),
    "QUESTION_ANS": Task(
        "AutoModelForQuestionAnswering", "AutoPeftModelForQuestionAnswering", "question-answering", ("qa_outputs",)
    ),
    "FEATURE_EXTRACTION": Task("AutoModel", "AutoPeftModelForFeatureExtraction", "feature-extraction"),
    None: Task("AutoModel", None, None),
}

#: user spellings (CLI, engine, ``bitfit-peft train --task``) -> PEFT task type
ALIASES: dict[str, str] = {
    "seq_cls": "SEQ_CLS",
    "seq-cls": "SEQ_CLS",
    "classification": "SEQ_CLS",
    "regression": "SEQ_CLS",
    "token_cls": "TOKEN_CLS",
    "token-cls": "TOKEN_CLS",
    "feature_extraction": "FEATURE_EXTRACTION",
    "feature-extraction": "FEATURE_EXTRACTION",
    "embedding": "FEATURE_EXTRACTION",
    "embeddings": "FEATURE_EXTRACTION",
    "causal_lm": "CAUSAL_LM",
    "causal-lm": "CAUSAL_LM",
    "seq_2_seq_lm": "SEQ_2_SEQ_LM",
    "seq2seq_lm": "SEQ_2_SEQ_LM",
    "seq2seq-lm": "SEQ_2_SEQ_LM",
    "seq2seq": "SEQ_2_SEQ_LM",
}


def task_of(task_type: Any) -> Task:
    """The :class:`Task` of a PEFT task type (a ``TaskType`` member, its string, or None)."""
    key = getattr(task_type, "value", task_type)
    return TASKS.get(None if key is None else str(key), TASKS[None])


def with_task_heads(modules_to_save: list[str] | None, task_type: Any) -> list[str] | None:
    """``modules_to_save`` plus the head modules of ``task_type`` that it lacks (as ``PeftModelFor<task>`` adds)."""
    missing = [h for h in task_of(task_type).heads if h not in (modules_to_save or [])]
    return [*(modules_to_save or []), *missing] if missing else modules_to_save


def head_labels(model_config: Any, adapter_config: Any) -> tuple[int | None, dict[str, str] | None]:
    """``(num_labels, id2label)`` an adapter records on save: its own when set (a loaded adapter), else the model
    config's, for a task with a head (None, None otherwise)."""
    if getattr(adapter_config, "num_labels", None) is not None:
        return adapter_config.num_labels, adapter_config.id2label
    if not task_of(getattr(adapter_config, "task_type", None)).heads or model_config is None:
        return None, None
    num = getattr(model_config, "num_labels", None)
    id2label = getattr(model_config, "id2label", None) or {}
    regression = num == 1 or getattr(model_config, "problem_type", None) == "regression"  # a value, not labels
    names = {str(k): str(v) for k, v in id2label.items()} if len(id2label) == num and not regression else None
    return (num if isinstance(num, int) else None), names


def peft_task_type(name: str) -> str | None:
    """``"seq-cls"``, ``"SEQ_CLS"``, ``"embedding"``... -> PEFT's task type, or None if unknown."""
    key = str(name).strip()
    if key.upper() in TASKS:
        return key.upper()
    return ALIASES.get(key.lower())


def auto_model_class(task_type: Any) -> Any:
    """The transformers Auto class for ``task_type``."""
    return getattr(transformers, task_of(task_type).auto_model)
