"""One base model, many BitFit adapters, one forward per mixed-task batch.

:class:`MultiTaskEngine` loads a base model once and any number of BitFit adapters (local directories or Hub ids)
on top of it. :meth:`~MultiTaskEngine.predict` and :meth:`~MultiTaskEngine.generate` take a list of
``(task, input)`` requests of *different* tasks and run them as one batch, routing every sample to its own
adapter (``adapter_names``) and its own classifier head. Adapters can be added and removed while serving.

The engine is a façade over two parts that it holds: a :class:`~bitfit_peft.serving.registry.Registry` (names,
fetch, checks, load, evict, the lock; ``registry.py``) and an :class:`~bitfit_peft.serving.inference.Inference`
(encode, forward, classify, generate; ``inference.py``) that is given the registry. This file loads the base and
the tokenizer and keeps the engine's public API.

Example (the packaged MiniLM; ``bitfit-peft train`` writes adapters like ``out/sst2``)::

    engine = MultiTaskEngine("sentence-transformers/all-MiniLM-L6-v2", task_type="SEQ_CLS")
    engine.add_adapter("sst2", "out/sst2")
    engine.add_adapter("spam", "out/spam")
    engine.predict([("sst2", "what a lovely film"), ("spam", "WIN a free cruise, reply now")])
    # [Prediction(task='sst2', kind='classification', label='positive', ...), Prediction(task='spam', ...)]
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from bitfit_peft.compat.quantized import device_map, quantization_config
from bitfit_peft.names import DELTA_KEY
from bitfit_peft.serving.errors import (
    AdapterPathError,
    DuplicateAdapterError,
    EngineError,
    UnknownTaskError,
)
from bitfit_peft.serving.inference import Generation, Inference, Prediction, Request
from bitfit_peft.serving.limits import Limits
from bitfit_peft.serving.loaded import AdapterInfo
from bitfit_peft.serving.registry import Registry, validate_adapter_name
from bitfit_peft.serving.residency import Residency
from bitfit_peft.tasks import auto_model_class, peft_task_type
from bitfit_peft.utils import DTYPES

__all__ = [
    "AdapterInfo",
    "AdapterPathError",
    "DuplicateAdapterError",
    "EngineError",
    "Generation",
    "MultiTaskEngine",
    "Prediction",
    "UnknownTaskError",
    "normalize_task_type",
    "validate_adapter_name",
]

TaskType = Literal["SEQ_CLS", "FEATURE_EXTRACTION", "CAUSAL_LM", "SEQ_2_SEQ_LM"]
_ENGINE_TASKS = ("SEQ_CLS", "FEATURE_EXTRACTION", "CAUSAL_LM", "SEQ_2_SEQ_LM")  # TaskType, as a tuple


def normalize_task_type(task_type: str) -> TaskType:
    """``"seq-cls"``, ``"SEQ_CLS"``, ``"embedding"``... -> one of the engine's PEFT task types."""
    resolved = peft_task_type(task_type)
    if resolved in _ENGINE_TASKS:
        return resolved  # type: ignore[return-value]
    raise EngineError(f"Unsupported task type {task_type!r}; use one of {sorted(_ENGINE_TASKS)}.")


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise EngineError(f"Unsupported dtype {dtype!r}; use one of {sorted(DTYPES)} or 'auto'.")
    return DTYPES[dtype]


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class MultiTaskEngine:
    """Serve many BitFit adapters of one base model, mixing tasks inside a batch.

    A thin façade over its two parts: :attr:`registry` (the adapters: load, remove, residency) and
    :attr:`inference` (``predict`` / ``generate``), which is given the registry.

    Args:
        base: a local model directory, a Hugging Face Hub id, or an already loaded ``PreTrainedModel``.
        task_type: ``SEQ_CLS`` (classification / regression, a head per adapter), ``FEATURE_EXTRACTION``
            (mean-pooled embeddings), ``CAUSAL_LM`` or ``SEQ_2_SEQ_LM`` (``generate``). Aliases such as
            ``"seq-cls"`` or ``"embedding"`` work.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... or ``"auto"``.
        dtype: ``"float32"`` / ``"bfloat16"`` / ``"float16"`` / a ``torch.dtype`` / ``"auto"`` (the checkpoint's)
            for the frozen base; deltas stay fp32.
        tokenizer: a tokenizer, or a path/Hub id to load one from (default: ``base``).
        max_length: inputs are truncated to this many tokens (at most the model's ``max_position_embeddings`` and
            the tokenizer's ``model_max_length``).
        normalize_embeddings: L2-normalise embeddings (sentence-transformers style).
        revision: the base's Hub revision (passed to ``from_pretrained``).
        trust_remote_code: passed to ``from_pretrained`` of the base.
        max_resident: at most this many adapters in memory (least recently used evicted, reloaded on use; see
            ``residency.py``); None: no cap.
        adapter_roots: with ``max_resident``, a request for an unknown task ``name`` loads ``<root>/<name>``
            (loading on demand: an explicit choice, bounded by ``limits.load_timeout_s``).
        quantize: load the base quantized with bitsandbytes (``"nf4"``, ``"fp4"`` or ``"int8"``); adapters trained
            on the full-precision base load onto it (see docs/quantized.md).
        limits: request, batch and head budgets (:class:`~bitfit_peft.serving.limits.Limits`; defaults in
            docs/security.md).
    """

    def __init__(
        self,
        base: str | Path | PreTrainedModel,
        task_type: str = "SEQ_CLS",
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        tokenizer: Any = None,
        max_length: int = 512,
        normalize_embeddings: bool = False,
        revision: str | None = None,
        trust_remote_code: bool = False,
        max_resident: int | None = None,
        adapter_roots: Sequence[str | Path] = (),
        quantize: str | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.limits = limits if limits is not None else Limits()
        residency = Residency(max_resident)  # a bad cap is refused before anything loads
        self.task_type: TaskType = normalize_task_type(task_type)
        self.device = _resolve_device(device)
        if isinstance(base, PreTrainedModel) and tokenizer is None:
            raise EngineError("Pass tokenizer=... when the base is an already loaded model.")
        model, self.base_name = _load_base(base, self.task_type, self.device, _resolve_dtype(dtype), revision,
                                           trust_remote_code, quantize)
        tokenizer = _load_tokenizer(tokenizer if tokenizer is not None else base, revision)
        # Never longer than the model can embed (a longer input would fail the forward: HTTP 500 on the server).
        caps = (getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None))
        max_length = min([int(max_length)] + [x for x in caps if isinstance(x, int) and 0 < x < 1_000_000])
        self.registry = Registry(model, self.task_type, residency=residency, adapter_roots=adapter_roots,
                                 limits=self.limits)
        self.inference = Inference(self.registry, tokenizer, device=self.device, max_length=max_length,
                                   normalize_embeddings=normalize_embeddings)

    # ------------------------------------------------------------------ state
    @property
    def lock(self) -> threading.RLock:
        """The engine's re-entrant lock (hold it to make a check-then-predict atomic)."""
        return self.registry.lock

    @property
    def model(self) -> nn.Module:
        """The served model: the ``PeftModel`` once an adapter is loaded, else the bare base."""
        return self.registry.model

    @property
    def tokenizer(self) -> Any:
        return self.inference.tokenizer

    @property
    def max_length(self) -> int:
        return self.inference.max_length

    @property
    def normalize_embeddings(self) -> bool:
        return self.inference.normalize_embeddings

    @property
    def max_resident(self) -> int | None:
        return self.registry.residency.capacity

    @property
    def adapter_roots(self) -> list[Path]:
        return list(self.registry.roots)

    # ------------------------------------------------------------------ adapters
    def tasks(self) -> list[str]:
        """Names of the loaded adapters (``"__base__"``, the bare base, is always servable too).

        Lock-free snapshot, so health checks and request validation never wait for a running batch.
        """
        return self.registry.names()

    def has_task(self, name: str) -> bool:
        """Whether ``name`` can be served: the base, a resident adapter, or (with a cap) one that loads on use."""
        return self.registry.can_serve(name)

    def adapters(self) -> list[AdapterInfo]:
        """Name, task type, labels and memory (delta + head bytes) of every loaded adapter."""
        return self.registry.infos()

    def add_adapter(
        self,
        name: str,
        source: str | Path,
        *,
        revision: str | None = None,
        label_names: Sequence[str] | None = None,
        allow_hub: bool = True,
        allow_base_mismatch: bool = False,
        hub: bool | None = None,
        within: Sequence[str | Path] | None = None,
        pin: bool = False,
    ) -> AdapterInfo:
        """Load the BitFit adapter at ``source`` (a local directory or a Hub id) as task ``name``.

        ``hub=True``: ``source`` is a Hub id (never read from disk); ``hub=False``: a local folder only. ``within``:
        folders every file read must resolve inside (a server's adapter roots); a relative ``source`` is taken
        relative to them. ``pin=True``: never evicted by ``max_resident`` (and not counted against it).
        ``allow_base_mismatch=True`` skips the base-model fingerprint check. Raises
        :class:`EngineError` (its subclasses :class:`AdapterPathError`, :class:`DuplicateAdapterError`...) or
        ``BitFitError`` (another base); on any error the engine is unchanged. Files are read and checked without
        holding the engine lock.
        """
        return self.registry.add(name, source, revision=revision, label_names=label_names, allow_hub=allow_hub,
                                 allow_base_mismatch=allow_base_mismatch, hub=hub, within=within, pin=pin)

    def remove_adapter(self, name: str) -> None:
        """Unload task ``name`` (safe while other threads serve; in-flight batches finish first)."""
        self.registry.remove(name)

    def memory_report(self) -> dict[str, Any]:
        """Bytes of the shared base and of each adapter (what one more adapter costs)."""
        with self.lock:
            base_bytes = sum(p.numel() * p.element_size() for n, p in self.model.named_parameters()
                             if DELTA_KEY not in n and "modules_to_save" not in n)
            adapters = {info.name: info.to_dict() for info in self.registry.infos()}
            return {"base_bytes": base_bytes, "adapters": adapters}

    # ------------------------------------------------------------------ inference
    def predict(self, requests: Sequence[Request]) -> list[Prediction]:
        """Classify / regress / embed a list of ``(task, text)`` or ``(task, (text, text_pair))`` in ONE forward.

        Unknown tasks raise :class:`UnknownTaskError` before any compute.
        """
        return self.inference.predict(requests)

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
        samples of its batch (they share the random stream). ``streamer``: a ``generate`` streamer (with
        ``num_beams=1``), given every row's new tokens as they are made (``openai_engine.BatchStreamer``).
        """
        return self.inference.generate(requests, max_new_tokens, do_sample=do_sample, num_beams=num_beams,
                                       num_return_sequences=num_return_sequences, temperature=temperature,
                                       top_p=top_p, top_k=top_k, seed=seed, streamer=streamer)


def _load_base(base: str | Path | PreTrainedModel, task_type: str, device: torch.device, dtype: torch.dtype | None,
               revision: str | None, trust_remote_code: bool, quantize: str | None) -> tuple[Any, str]:
    """The frozen base model in eval mode on ``device`` (unless Accelerate dispatched it), and its name."""
    if isinstance(base, PreTrainedModel):
        if quantize is not None:
            raise EngineError("quantize= applies to a base loaded by the engine; this model is loaded already.")
        quantized = getattr(base, "is_quantized", False)  # bitsandbytes models cannot be cast or moved
        model = base if dtype is None or quantized else base.to(dtype)
        name = str(getattr(base.config, "_name_or_path", "") or type(base).__name__)
    else:
        kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if quantize is not None:
            kwargs.update(quantization_config=quantization_config(quantize), device_map=device_map(device))
        model = auto_model_class(task_type).from_pretrained(str(base), **kwargs)
        name = str(base)
    if getattr(model, "hf_device_map", None) or getattr(model, "is_quantized", False):  # placed at load (Accelerate
        model = model.eval()  # offload, bitsandbytes): its hooks move inputs and weights; it cannot be moved
    else:
        model = model.to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, name


def _load_tokenizer(tokenizer: Any, revision: str | None) -> Any:
    """A tokenizer (loaded from a path or Hub id) with a pad token."""
    if isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer
