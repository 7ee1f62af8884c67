"""One base model, many BitFit adapters, one forward per mixed-task batch.

:class:`MultiTaskEngine` loads a base model once and any number of BitFit adapters (local directories or Hub ids)
on top of it. :meth:`~MultiTaskEngine.predict` and :meth:`~MultiTaskEngine.generate` take a list of
``(task, input)`` requests of *different* tasks and run them as one batch, routing every sample to its own
adapter (``adapter_names``) and its own classifier head. Adapters can be added and removed while serving.

The engine is two rooms: ``lifecycle.py`` (fetch, validate, load, evict, names: :class:`AdapterLifecycle`) and
``inference.py`` (encode, forward, classify, generate: :class:`Inference`); this file builds the shared state.

Example:
    >>> # engine = MultiTaskEngine("sentence-transformers/all-MiniLM-L6-v2", task_type="SEQ_CLS")
    >>> # engine.add_adapter("sst2", "out/sst2"); engine.add_adapter("spam", "out/spam")
    >>> # engine.predict([("sst2", "what a lovely film"), ("spam", "WIN a free cruise, reply now")])
    >>> # [Prediction(task='sst2', kind='classification', label='positive', ...), Prediction(task='spam', ...)]
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from bitfit_peft.serving.errors import AdapterPathError, DuplicateAdapterError, EngineError, UnknownTaskError
from bitfit_peft.serving.inference import Generation, Inference, Prediction
from bitfit_peft.serving.lifecycle import AdapterInfo, AdapterLifecycle, Layout, Task, validate_adapter_name
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


class MultiTaskEngine(Residency, AdapterLifecycle, Inference):
    """Serve many BitFit adapters of one base model, mixing tasks inside a batch.

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
        revision / trust_remote_code: passed to ``from_pretrained`` of the base.
        max_resident: at most this many adapters in memory (least recently used evicted, reloaded on use; see
            ``residency.py``); None: no cap.
        adapter_roots: with ``max_resident``, a request for an unknown task ``name`` loads ``<root>/<name>``.
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
    ) -> None:
        if max_resident is not None and (not isinstance(max_resident, int) or max_resident < 1):
            raise EngineError(f"max_resident must be a positive integer or None, got {max_resident!r}.")
        self.max_resident = max_resident
        self.adapter_roots = [Path(r).expanduser().resolve() for r in adapter_roots]
        self._known: dict[str, dict[str, Any]] = {}
        self._last_used: OrderedDict[str, None] = OrderedDict()
        self.task_type: TaskType = normalize_task_type(task_type)
        self.device = _resolve_device(device)
        self.max_length = int(max_length)
        self.normalize_embeddings = normalize_embeddings
        torch_dtype = _resolve_dtype(dtype)
        if isinstance(base, PreTrainedModel):
            model = base
            self.base_name = str(getattr(base.config, "_name_or_path", "") or type(base).__name__)
            if torch_dtype is not None:
                model = model.to(torch_dtype)
        else:
            self.base_name = str(base)
            kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
            if torch_dtype is not None:
                kwargs["dtype"] = torch_dtype
            model = auto_model_class(self.task_type).from_pretrained(str(base), **kwargs)
        if getattr(model, "hf_device_map", None):  # dispatched by Accelerate: keep its placement (offloaded
            model = model.eval()  # modules cannot be moved; its hooks move inputs and weights)
        else:
            model = model.to(self.device).eval()
        for param in model.parameters():
            param.requires_grad_(False)
        self._base: PreTrainedModel = model
        self._model: Any = None  # the PeftModel, created by the first add_adapter
        if tokenizer is None:
            if isinstance(base, PreTrainedModel):
                raise EngineError("Pass tokenizer=... when the base is an already loaded model.")
            tokenizer = str(base)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), revision=revision)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.tokenizer = tokenizer
        # Never longer than the model can embed (a longer input would fail the forward: HTTP 500 on the server).
        limits = (getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None))
        self.max_length = min([self.max_length] + [x for x in limits if isinstance(x, int) and 0 < x < 1_000_000])
        self._tasks: dict[str, Task] = {}
        self._retired: set[str] = set()  # removed, but kept until another adapter is loaded (PEFT needs >= 1)
        self._serial = 0
        self._lock = threading.RLock()
        self._layouts: dict[str, Layout] = {}  # layout key -> where its tensors live (see lifecycle.py)
        self._base_checks: dict[str, bool] = {}  # stored fingerprint -> whether this base matches it
        self._configs: dict[str, Any] = {}  # adapter configs by content: equal configs share one object

    @property
    def lock(self) -> threading.RLock:
        """The engine's re-entrant lock (hold it to make a check-then-predict atomic)."""
        return self._lock

    @property
    def model(self) -> nn.Module:
        """The served model: the ``PeftModel`` once an adapter is loaded, else the bare base."""
        return self._model if self._model is not None else self._base

    def memory_report(self) -> dict[str, Any]:
        """Bytes of the shared base and of each adapter (what one more adapter costs)."""
        with self._lock:
            base_bytes = sum(p.numel() * p.element_size() for n, p in self.model.named_parameters()
                             if "bitfit_delta" not in n and "modules_to_save" not in n)
            adapters = {t.name: self._info(t).to_dict() for t in list(self._tasks.values())}
            return {"base_bytes": base_bytes, "adapters": adapters}
