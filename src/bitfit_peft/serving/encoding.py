"""Tokenizing requests before they reach the engine lock, bounded in tokens and in characters.

Each input is tokenized on its own (never padded to a batch here) and truncated while tokenizing: texts and text
pairs are first cut to ``max_length x CHARS_PER_TOKEN`` characters, so tokenizing a 20,000-character pair costs no
more than a ``max_length`` one, then truncated to the model's limit. A pair is never handed whole to the
tokenizer's own pair truncation (``longest_first`` in the Rust tokenizers keeps every overflowing piece and pairs
them: 14 s for 64 pairs of 2,000 characters): with a fast tokenizer each side is encoded alone, cut in characters
to its longest-first share, and only then tokenized as a pair (:func:`_trimmed_pairs`).
The result, an :class:`Encoded` per input, carries its cost (``limits.py``); the engine only pads and runs it,
under its lock.

Example:
    >>> from transformers import AutoTokenizer  # doctest: +SKIP
    >>> encode_inputs(tokenizer, [("sst2", "a fine film", None)], max_length=8)[0].cost  # doctest: +SKIP
    5
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bitfit_peft.serving.limits import CHARS_PER_TOKEN, generate_cost, predict_cost

__all__ = ["Encoded", "encode_inputs", "encode_prompts", "pad"]

_KEPT = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Encoded:
    """One tokenized input: its task, its (unpadded) features and its cost."""

    task: str
    features: dict[str, list[int]] = field(repr=False)
    cost: int


def _cut(text: str, max_length: int) -> str:
    return text[: max_length * CHARS_PER_TOKEN]


def _tokenize(tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int) -> list[dict[str, list]]:
    cut = [_cut(t, max_length) for t in texts]
    cut_pairs = None if pairs is None else [_cut(p, max_length) for p in pairs]
    out = tokenizer(cut, cut_pairs, truncation=True, max_length=max_length, padding=False)
    keys = [k for k in _KEPT if k in out]
    return [{k: list(out[k][i]) for k in keys} for i in range(len(cut))]


def _split(la: int, lb: int, budget: int) -> tuple[int, int]:
    """Longest-first truncation of two lengths to ``budget`` tokens, in one step."""
    if la + lb <= budget:
        return la, lb
    half = budget // 2
    if la <= half:
        return la, budget - la
    if lb <= half:
        return budget - lb, lb
    return half, budget - half


@functools.lru_cache(maxsize=8)
def _plain_backend(tokenizer: Any) -> Any:
    """A private copy of the Rust tokenizer without truncation or padding (the shared one carries whatever the last
    call set, e.g. ``tokenizer.json``'s own truncation)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    plain = type(backend).from_str(backend.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain


def _trimmed_pairs(tokenizer: Any, texts: list[str], pairs: list[str], max_length: int) -> tuple[list, list]:
    """Both sides cut (in characters, at a token boundary) to about their longest-first share of ``max_length``.

    With a fast tokenizer each side is encoded alone (linear) and cut after its last kept token's offset; the
    tokenizer's own pair truncation then trims at most a few tokens. Without one, the character cut only."""
    texts, pairs = [_cut(t, max_length) for t in texts], [_cut(p, max_length) for p in pairs]
    backend = _plain_backend(tokenizer)
    if backend is None:
        return texts, pairs
    budget = max(max_length - tokenizer.num_special_tokens_to_add(pair=True), 2)
    firsts = backend.encode_batch(texts, add_special_tokens=False)
    seconds = backend.encode_batch(pairs, add_special_tokens=False)
    for i, (a, b) in enumerate(zip(firsts, seconds, strict=True)):
        na, nb = _split(len(a.offsets), len(b.offsets), budget)
        texts[i] = texts[i][: a.offsets[na - 1][1]] if na else texts[i][:1]
        pairs[i] = pairs[i][: b.offsets[nb - 1][1]] if nb else pairs[i][:1]
    return texts, pairs


def encode_inputs(tokenizer: Any, parsed: Sequence[tuple[str, str, str | None]], max_length: int) -> list[Encoded]:
    """``(task, text, text_pair or None)`` inputs as :class:`Encoded` (single texts and pairs tokenized apart)."""
    singles = [i for i, p in enumerate(parsed) if p[2] is None]
    doubles = [i for i, p in enumerate(parsed) if p[2] is not None]
    features: list[dict[str, list]] = [{}] * len(parsed)
    if singles:
        for i, feats in zip(singles, _tokenize(tokenizer, [parsed[i][1] for i in singles], None, max_length),
                            strict=True):
            features[i] = feats
    if doubles:
        pairs = [str(parsed[i][2]) for i in doubles]
        texts = [parsed[i][1] for i in doubles]
        encoded = _tokenize(tokenizer, *_trimmed_pairs(tokenizer, texts, pairs, max_length), max_length)
        for i, feats in zip(doubles, encoded, strict=True):
            features[i] = feats
    return [Encoded(p[0], f, predict_cost(f["input_ids"])) for p, f in zip(parsed, features, strict=True)]


def encode_prompts(tokenizer: Any, prompts: Sequence[tuple[str, str]], max_length: int,
                   settings: dict[str, Any]) -> list[Encoded]:
    """``(task, prompt)`` pairs as :class:`Encoded`, each costed with the generation ``settings``."""
    feats = _tokenize(tokenizer, [p[1] for p in prompts], None, max_length)
    fan = {k: int(settings.get(k) or 1) for k in ("num_beams", "num_return_sequences")}
    new = int(settings.get("max_new_tokens", 32))
    return [Encoded(task, f, generate_cost([len(f["input_ids"])], new, **fan))
            for (task, _), f in zip(prompts, feats, strict=True)]


def pad(tokenizer: Any, items: Sequence[Encoded], device: torch.device, side: str = "right") -> dict[str, torch.Tensor]:
    """The padded batch of ``items`` on ``device`` (keys the model takes: ids, mask, token types)."""
    batch = tokenizer.pad([dict(it.features) for it in items], padding=True, return_tensors="pt", padding_side=side)
    return {k: v.to(device) for k, v in batch.items() if k in _KEPT}
