"""Chat data for ``--task causal-lm``: a ``messages`` column (a list of ``{"role", "content"}`` per row).

Each conversation is rendered with the tokenizer's chat template (``apply_chat_template``) and trained on as one
sequence (loss on every token, like TRL's ``SFTTrainer`` without ``assistant_only_loss``). :func:`is_chat` decides
from the first row; :func:`chat_examples` validates every row; :func:`encode_chat` tokenises.

Example:
    >>> rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    >>> is_chat(rows, "text"), chat_examples(rows, "messages")[0]["messages"][1]["content"]
    (True, 'Hello!')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bitfit_peft.training.sources import DataError

CHAT_COLUMN = "messages"
MAX_MESSAGES = 1024  # per conversation: a bound on what one row may hold


def is_chat(records: Sequence[dict[str, Any]], text_column: str) -> bool:
    """Whether causal-lm rows are conversations: ``--text-column messages``, or no ``text_column`` but a
    ``messages`` column."""
    if not records:
        return False
    first = records[0]
    return text_column == CHAT_COLUMN or (text_column not in first and CHAT_COLUMN in first)


def _message(value: Any, column: str, row: int, turn: int) -> dict[str, str]:
    if not isinstance(value, dict) or not isinstance(value.get("role"), str) or "content" not in value:
        raise DataError(
            f"column {column!r}: row {row}, message {turn} must be an object with a string 'role' and a "
            f"'content' (e.g. {{'role': 'user', 'content': 'Hi'}}), got {value!r:.60}"
        )
    content = value["content"]
    if not isinstance(content, str):
        raise DataError(
            f"column {column!r}: row {row}, message {turn} has a {type(content).__name__} 'content'; "
            "only text content is supported (flatten multimodal parts to a string)"
        )
    return {"role": value["role"], "content": content}


def chat_examples(records: Sequence[dict[str, Any]], column: str = CHAT_COLUMN) -> list[dict[str, Any]]:
    """``[{"messages": [{"role", "content"}, ...]}, ...]`` from the rows' ``column`` (each row checked)."""
    examples = []
    for row, rec in enumerate(records):
        messages = rec.get(column)
        if not isinstance(messages, (list, tuple)) or not messages:
            raise DataError(
                f"column {column!r}: row {row} must hold a non-empty list of messages "
                f"([{{'role': ..., 'content': ...}}, ...]), got {messages!r:.60}"
            )
        if len(messages) > MAX_MESSAGES:
            raise DataError(f"column {column!r}: row {row} holds {len(messages)} messages (at most {MAX_MESSAGES})")
        examples.append({"messages": [_message(m, column, row, i) for i, m in enumerate(messages)]})
    return examples


def encode_chat(examples: Sequence[dict[str, Any]], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """Token features (``input_ids``, ``attention_mask``) of each conversation, rendered with the chat template
    and cut to ``max_length`` tokens."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"the tokenizer of {name!r} has no chat template, so a 'messages' column cannot be rendered; "
            "use a chat / instruct model, or give the data a plain 'text' column"
        )
    features = []
    for ex in examples:
        try:
            text = tokenizer.apply_chat_template(ex["messages"], tokenize=False)
        except Exception as err:  # noqa: BLE001 - jinja errors of the template (e.g. "roles must alternate")
            raise DataError(f"the chat template refused a conversation: {err}".splitlines()[0]) from err
        enc = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)
        features.append({k: list(v) for k, v in enc.items()})
    return features
