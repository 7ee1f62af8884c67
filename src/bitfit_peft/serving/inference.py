"""Inference over a :class:`~bitfit_peft.serving.registry.Registry`: encode, forward, classify, generate.

Every request names its task; a batch of requests of different tasks runs as ONE forward (or ONE ``generate``),
each sample routed to its own adapter's deltas and head (``adapter_names``). :class:`Inference` is given the
registry and asks it for everything about adapters: which are servable (``require``), their PEFT names, kinds and
labels, loads on first use (``ensure_resident``) and the lock every batch runs under.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from bitfit_peft.serving.adapter_files import labels_from_id2label
from bitfit_peft.serving.encoding import Encoded, encode_inputs, encode_prompts, pad
from bitfit_peft.serving.errors import EngineError
from bitfit_peft.serving.interleave import install_boundaries
from bitfit_peft.serving.registry import Registry
from bitfit_peft.serving.residency import rounds

__all__ = ["Generation", "Inference", "Prediction"]

Request = tuple[str, str] | tuple[str, tuple[str, str]] | tuple[str, str, str]


@dataclass
class Prediction:
    """Result of one :meth:`MultiTaskEngine.predict` request.

    ``kind`` is ``"classification"`` (``label``, ``score`` = its probability, ``probabilities`` per label),
    ``"regression"`` (``value``; a list when the head has several outputs) or ``"embedding"`` (mean-pooled
    ``embedding``).
    """

    task: str
    kind: Literal["classification", "regression", "embedding"]
    label: str | None = None
    score: float | None = None
    probabilities: dict[str, float] | None = None
    value: float | list[float] | None = None
    embedding: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Generation:
    """Result of one :meth:`MultiTaskEngine.generate` request (``num_return_sequences`` texts)."""

    task: str
    texts: list[str]
    token_ids: list[list[int]] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "texts": self.texts}


class Inference:
    """Prediction and generation over the adapters of ``registry`` (see the module docstring).

    Args:
        registry: the adapters and the served model; every batch runs under its lock.
        tokenizer: the base's tokenizer (with a pad token).
        device: where inputs go.
        max_length: inputs are truncated to this many tokens.
        normalize_embeddings: L2-normalise embeddings.
    """

    def __init__(self, registry: Registry, tokenizer: Any, *, device: torch.device, max_length: int,
                 normalize_embeddings: bool = False) -> None:
        self.registry, self.tokenizer, self.device = registry, tokenizer, device
        self.max_length, self.normalize_embeddings = max_length, normalize_embeddings
        #: before each transformer block: cheaper waiting requests may run there (``interleave.py``)
        self._boundaries = install_boundaries(registry.base, self._set_aside)

    @property
    def task_type(self) -> str:
        return self.registry.task_type

    def _forward(self, names: list[str], **inputs: Any) -> Any:
        registry = self.registry
        if registry.peft_model is None:
            return registry.base(**inputs)
        return registry.peft_model(**inputs, adapter_names=registry.peft_names(names))

    @staticmethod
    def _split_request(request: Any) -> tuple[str, str, str | None]:
        if not isinstance(request, (tuple, list)) or len(request) not in (2, 3):
            raise EngineError(f"Each request must be (task, text) or (task, (text, text_pair)), got {request!r}.")
        task, text, *rest = request
        pair = rest[0] if rest else None
        if isinstance(text, (tuple, list)):
            if len(text) != 2 or pair is not None:
                raise EngineError(f"A text pair must have exactly two texts, got {text!r}.")
            text, pair = text
        for value in (task, text) + ((pair,) if pair is not None else ()):
            if not isinstance(value, str) or not value:
                raise EngineError(f"Task names and texts must be non-empty strings, got {str(value)[:80]!r}.")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise EngineError(f"Texts and task names must be valid Unicode: {err.reason} at position "
                                  f"{err.start} (a lone surrogate?).") from err
        return task, text, pair

    def encode(self, requests: Sequence[Request]) -> list[Encoded]:
        """Tokenize ``requests`` (predict) without the lock, each input truncated while tokenizing (``encoding.py``)."""
        parsed = [self._split_request(r) for r in requests]
        return encode_inputs(self.tokenizer, parsed, self.max_length)

    def encode_prompts(self, requests: Sequence[tuple[str, str]], settings: dict[str, Any]) -> list[Encoded]:
        """Tokenize ``(task, prompt)`` requests (generate) without the lock, costed with the generation settings."""
        parsed = [self._split_request(r) for r in requests]
        if any(p[2] is not None for p in parsed):
            raise EngineError("generate() takes (task, prompt) pairs, not text pairs.")
        return encode_prompts(self.tokenizer, [(p[0], p[1]) for p in parsed], self.max_length, settings)

    def predict(self, requests: Sequence[Request]) -> list[Prediction]:
        """Classify / regress / embed a list of ``(task, text)`` or ``(task, (text, text_pair))`` in ONE forward.

        Unknown tasks raise :class:`UnknownTaskError` before any compute.
        """
        self._require_predict()
        return self._in_rounds(self.encode(requests), self.predict_encoded)

    def _in_rounds(self, items: list[Encoded], run: Any) -> list[Any]:
        """``run(items)``, in residency rounds of at most ``max_resident`` adapters when there is a cap."""
        residency = self.registry.residency
        parts = rounds([it.task for it in items], residency.capacity, residency.pinned)
        if len(parts) == 1:
            return run(items)
        results: list[Any] = [None] * len(items)
        for idx in parts:
            for i, out in zip(idx, run([items[i] for i in idx]), strict=True):
                results[i] = out
        return results

    def _require_predict(self) -> None:
        if self.task_type not in ("SEQ_CLS", "FEATURE_EXTRACTION"):
            raise EngineError(f"predict() serves SEQ_CLS / FEATURE_EXTRACTION engines; this one is "
                              f"{self.task_type}: use generate().")

    def predict_encoded(self, items: Sequence[Encoded]) -> list[Prediction]:
        """:meth:`predict` for inputs tokenized already (:meth:`encode`): only padding and the forward hold the lock."""
        self._require_predict()
        if not items:
            return []
        tasks = [it.task for it in items]
        self.registry.ensure_resident(tasks)  # with a cap: evicted adapters load first, unlocked
        with self.registry.lock:
            names = self.registry.require(tasks)
            self.registry.touch(names)
            batch = pad(self.tokenizer, items, self.device)
            with torch.no_grad():
                out = self._forward(names, **batch)
            if self.task_type == "FEATURE_EXTRACTION":
                return self._embeddings(names, out, batch["attention_mask"])
            return self._classify(names, out.logits.float())

    def _embeddings(self, names: list[str], out: Any, mask: torch.Tensor) -> list[Prediction]:
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        pooled = pooled.float()
        if self.normalize_embeddings:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return [Prediction(task=n, kind="embedding", embedding=row.tolist()) for n, row in zip(names, pooled.cpu(),
                                                                                               strict=True)]

    def _classify(self, names: list[str], logits: torch.Tensor) -> list[Prediction]:
        results = []
        config = self.registry.base.config
        base_labels = labels_from_id2label(getattr(config, "id2label", None))
        for name, row in zip(names, logits.cpu(), strict=True):
            adapter = self.registry.get(name)
            if adapter is None:  # the bare base: its own (possibly untrained) head
                kind = "regression" if config.num_labels == 1 else "classification"
                labels = base_labels or [f"LABEL_{i}" for i in range(config.num_labels)]
            else:
                kind, labels = adapter.kind, adapter.labels
            if kind == "regression":
                width = (adapter.outputs or 1) if adapter is not None else config.num_labels
                values = row[:width].tolist()
                results.append(Prediction(task=name, kind="regression", value=values[0] if width == 1 else values))
                continue
            assert labels is not None
            probs = torch.softmax(row[: len(labels)], dim=-1)
            best = int(probs.argmax())
            results.append(
                Prediction(
                    task=name,
                    kind="classification",
                    label=labels[best],
                    score=float(probs[best]),
                    probabilities={lab: float(p) for lab, p in zip(labels, probs.tolist(), strict=True)},
                )
            )
        return results

    def generate(
        self,
        requests: Sequence[tuple[str, str]],
        max_new_tokens: int = 32,
        *,
        do_sample: bool = False,
        num_beams: int = 1,
        num_return_sequences: int = 1,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        streamer: Any = None,
    ) -> list[Generation]:
        """Continue each ``(task, prompt)`` with its own adapter, all prompts in ONE ``generate`` call.

        Sampling with ``seed`` is reproducible for the same batch; results of a sample depend on the other
        samples of its batch (they share the random stream).
        """
        settings = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_beams": num_beams,
                    "num_return_sequences": num_return_sequences, "temperature": temperature, "top_p": top_p,
                    "top_k": top_k, "seed": seed}
        self._require_generate()
        items = self.encode_prompts(requests, settings)
        if streamer is not None:  # one generate call: the streamer maps its rows to the prompts in order
            return self.generate_encoded(items, **settings, streamer=streamer)
        return self._in_rounds(items, lambda part: self.generate_encoded(part, **settings))

    def _require_generate(self) -> None:
        if self.task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
            raise EngineError(f"generate() serves CAUSAL_LM / SEQ_2_SEQ_LM engines; this one is {self.task_type}.")

    def generate_encoded(self, items: Sequence[Encoded], max_new_tokens: int = 32, *, do_sample: bool = False,
                         num_beams: int = 1, num_return_sequences: int = 1, temperature: float | None = None,
                         top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                         streamer: Any = None) -> list[Generation]:
        """:meth:`generate` for prompts tokenized already (:meth:`encode_prompts`); ``streamer``: a ``generate``
        streamer of this one call (with a residency cap, all prompts' adapters must fit at once)."""
        self._require_generate()
        if not items:
            return []
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": int(max_new_tokens),
            "do_sample": bool(do_sample),
            "num_beams": int(num_beams),
            "num_return_sequences": int(num_return_sequences),
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        for key, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("streamer", streamer)):
            if value is not None:
                gen_kwargs[key] = value
        tasks = [it.task for it in items]
        self.registry.ensure_resident(tasks)  # with a cap: evicted adapters load first, unlocked
        with self.registry.lock:
            names = self.registry.require(tasks)
            self.registry.touch(names)
            side = "left" if self.task_type == "CAUSAL_LM" else "right"
            batch = pad(self.tokenizer, items, self.device, side)
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad():
                out = self._generate(names, batch, gen_kwargs)
        if self.task_type == "CAUSAL_LM":
            out = out[:, batch["input_ids"].shape[1]:]
        return self._decode(names, out, int(num_return_sequences))

    @contextmanager
    def _set_aside(self) -> Iterator[None]:
        """Between two blocks of a model call (``interleave.py``): the call's model state put aside and the random
        stream forked while inner requests run, so the call resumes exactly as it was."""
        model = self.registry.peft_model
        cuda = [] if self.device.type != "cuda" else [self.device.index if self.device.index is not None
                                                      else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=cuda), (model.base_model.call_set_aside() if model is not None
                                                    else nullcontext()):
            yield

    def _generate(self, names: list[str], batch: dict[str, torch.Tensor], gen_kwargs: dict[str, Any]) -> Any:
        registry = self.registry
        if registry.peft_model is None:
            return registry.base.generate(**batch, **gen_kwargs)
        return registry.peft_model.generate(**batch, **gen_kwargs, adapter_names=registry.peft_names(names))

    def _decode(self, names: list[str], out: torch.Tensor, n: int) -> list[Generation]:
        """``n`` generated sequences per name, each cut after its first end-of-sequence token."""
        eos = self._eos_ids()
        rows = [_until_eos(row, eos) for row in out.cpu().tolist()]
        return [
            Generation(
                task=name,
                texts=self.tokenizer.batch_decode(rows[i * n:(i + 1) * n], skip_special_tokens=True),
                token_ids=rows[i * n:(i + 1) * n],
            )
            for i, name in enumerate(names)
        ]

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for value in (getattr(self.registry.base.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """New tokens up to and including the first end-of-sequence token (drops the batch's padding after it)."""
    for i, tok in enumerate(tokens):
        if tok in eos:
            return tokens[: i + 1]
    return tokens
