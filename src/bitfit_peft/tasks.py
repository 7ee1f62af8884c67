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


def peft_task_type(name: str) -> str | None:
    """``"seq-cls"``, ``"SEQ_CLS"``, ``"embedding"``... -> PEFT's task type, or None if unknown."""
    key = str(name).strip()
    if key.upper() in TASKS:
        return key.upper()
    return ALIASES.get(key.lower())


def auto_model_class(task_type: Any) -> Any:
    """The transformers Auto class for ``task_type``."""
    return getattr(transformers, task_of(task_type).auto_model)
