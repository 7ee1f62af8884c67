"""One base model, many BitFit adapters, one forward per mixed-task batch.

:class:`MultiTaskEngine` loads a base model once and any number of BitFit adapters (local directories or Hub ids)
on top of it. :meth:`~MultiTaskEngine.predict` and :meth:`~MultiTaskEngine.generate` take a list of
``(task, input)`` requests of *different* tasks and run them as one batch, routing every sample to its own
adapter (``adapter_names``) and its own classifier head. Adapters can be added and removed while serving
(every public method is serialised by one re-entrant lock).

Example:
    >>> # engine = MultiTaskEngine("sentence-transformers/all-MiniLM-L6-v2", task_type="SEQ_CLS")
    >>> # engine.add_adapter("sst2", "out/sst2"); engine.add_adapter("spam", "out/spam")
    >>> # engine.predict([("sst2", "what a lovely film"), ("spam", "WIN a free cruise, reply now")])
    >>> # [Prediction(task='sst2', kind='classification', label='positive', ...), Prediction(task='spam', ...)]
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft.utils import ModulesToSaveWrapper
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoTokenizer,
    PreTrainedModel,
)

from .. import BASE_ADAPTER_NAME, BitFitLayer
from .._registration import is_bitfit
from ..delta_format import DELTA_KEY, PEFT_PREFIX
from ..heads import route_heads, routing_of
from ..paths import check_confined, is_hub_id
from ..tasks import auto_model_class, peft_task_type
from ..utils import DTYPES

__all__ = [
    "AdapterInfo",
    "EngineError",
    "Generation",
    "MultiTaskEngine",
    "Prediction",
    "UnknownTaskError",
    "normalize_task_type",
    "validate_adapter_name",
]

TaskType = Literal["SEQ_CLS", "FEATURE_EXTRACTION", "CAUSAL_LM", "SEQ_2_SEQ_LM"]
Request = tuple[str, str] | tuple[str, tuple[str, str]] | tuple[str, str, str]

_ENGINE_TASKS = ("SEQ_CLS", "FEATURE_EXTRACTION", "CAUSAL_LM", "SEQ_2_SEQ_LM")  # TaskType, as a tuple
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_ADAPTER_PREFIX = PEFT_PREFIX
_ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, "bitfit_training.json", "config.json")


class EngineError(ValueError):
    """A request or adapter the engine cannot serve; the message says why."""


class UnknownTaskError(EngineError, KeyError):
    """A request names a task (adapter) that is not loaded."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def normalize_task_type(task_type: str) -> TaskType:
    """``"seq-cls"``, ``"SEQ_CLS"``, ``"embedding"``... -> one of the engine's PEFT task types."""
    resolved = peft_task_type(task_type)
    if resolved in _ENGINE_TASKS:
        return resolved  # type: ignore[return-value]
    raise EngineError(f"Unsupported task type {task_type!r}; use one of {sorted(_ENGINE_TASKS)}.")


def validate_adapter_name(name: str) -> str:
    """Task (adapter) names: a letter, then up to 63 letters, digits, ``_`` or ``-``."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise EngineError(
            f"Invalid adapter name {name!r}: use a letter followed by letters, digits, '_' or '-' (at most 64)."
        )
    return name


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


@dataclass
class AdapterInfo:
    """What :meth:`MultiTaskEngine.adapters` reports for one loaded adapter."""

    name: str
    source: str
    task_type: str | None
    kind: str
    labels: list[str] | None
    num_labels: int | None
    delta_params: int
    delta_bytes: int
    head_bytes: int

    @property
    def total_bytes(self) -> int:
        """Memory this adapter adds on top of the shared base (bias deltas + its own head copy)."""
        return self.delta_bytes + self.head_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes}


@dataclass
class _Task:
    name: str
    internal: str  # the PEFT adapter name: unique per load, so a re-loaded task never meets stale state
    source: str
    task_type: str | None
    kind: str
    labels: list[str] | None
    outputs: int | None = None  # head outputs (SEQ_CLS)
    sizes: tuple[int, int, int] = (0, 0, 0)  # delta params, delta bytes, head bytes: fixed once loaded


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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _labels_from_id2label(id2label: Any) -> list[str] | None:
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        items = sorted((int(k), str(v)) for k, v in id2label.items())
    except (TypeError, ValueError):
        return None
    if [i for i, _ in items] != list(range(len(items))):
        return None
    return [v for _, v in items]


def read_task_metadata(adapter_dir: Path) -> dict[str, Any]:
    """Label names and kind stored next to an adapter.

    Looked up in order: ``bitfit_training.json`` (written by ``bitfit-peft train``: ``label_names``, ``task``),
    a saved head config ``config.json`` (``id2label``, ``problem_type``), then extra ``label_names`` /
    ``id2label`` keys in ``adapter_config.json``.
    """
    meta: dict[str, Any] = {}
    summary = _read_json(adapter_dir / "bitfit_training.json")
    if isinstance(summary.get("label_names"), list) and summary["label_names"]:
        meta["labels"] = [str(x) for x in summary["label_names"]]
    if summary.get("task") == "regression":
        meta["kind"] = "regression"
    for fname in ("config.json", CONFIG_NAME):
        cfg = _read_json(adapter_dir / fname)
        if "labels" not in meta:
            labels = cfg.get("label_names") if isinstance(cfg.get("label_names"), list) else None
            labels = labels or _labels_from_id2label(cfg.get("id2label"))
            if labels:
                meta["labels"] = [str(x) for x in labels]
        if "kind" not in meta and cfg.get("problem_type") == "regression":
            meta["kind"] = "regression"
    return meta


def _strip_prefix(key: str) -> str:
    return key[len(_ADAPTER_PREFIX):] if key.startswith(_ADAPTER_PREFIX) else key


def _head_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the non-delta tensors (``modules_to_save`` heads) in an adapter file, keyed by model path."""
    file = adapter_dir / SAFETENSORS_WEIGHTS_NAME
    if not file.is_file():
        return {}
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(f".{DELTA_KEY}") or f".{DELTA_KEY}." in key:
                    continue
                shapes[_strip_prefix(key)] = tuple(handle.get_slice(key).get_shape())
    except SafetensorError as err:
        raise EngineError(f"{file} is corrupt or truncated ({err}); re-save or re-download the adapter.") from err
    return shapes


def _is_head_key(key: str, heads: Sequence[str]) -> bool:
    """Whether ``key`` names a tensor of one of the ``modules_to_save`` modules ``heads`` (matched like PEFT)."""
    parts = key.split(".")
    paths = [".".join(parts[:i]) for i in range(1, len(parts))]
    return any(p == h or p.endswith("." + h) for p in paths for h in heads)


def _original_tensor(root: nn.Module, dotted: str) -> tuple[nn.Module, str] | None:
    """Module and attribute of ``dotted`` in ``root``, stepping into the *original* module of head wrappers."""
    *path, attr = dotted.split(".")
    module = root
    for part in path:
        if isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        child = module._modules.get(part)
        if child is None:
            return None
        module = child
    if isinstance(module, ModulesToSaveWrapper):
        module = module.original_module
    tensor = getattr(module, attr, None)
    return (module, attr) if isinstance(tensor, torch.Tensor) else None


@contextmanager
def _head_shapes_as(root: nn.Module, shapes: dict[str, tuple[int, ...]]) -> Iterator[None]:
    """Temporarily give the original head tensors the adapter's shapes, so PEFT copies and loads a head of the
    adapter's size (e.g. 4 labels on a 2-label base) instead of failing on a size mismatch."""
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for dotted, shape in shapes.items():
            found = _original_tensor(root, dotted)
            if found is None:
                continue
            tensor = getattr(*found)
            if tuple(tensor.shape) != shape:
                swapped.append((tensor, tensor.data))
                tensor.data = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
        yield
    finally:
        for tensor, data in swapped:
            tensor.data = data


def _sync_linear_sizes(module: nn.Module) -> None:
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            sub.out_features, sub.in_features = sub.weight.shape


def _last_linear_out(module: nn.Module) -> int | None:
    out = None
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            out = sub.weight.shape[0]
    return out


def _param_bytes(params: Iterator[torch.Tensor] | list[torch.Tensor]) -> tuple[int, int]:
    count = nbytes = 0
    for p in params:
        count += p.numel()
        nbytes += p.numel() * p.element_size()
    return count, nbytes


class MultiTaskEngine:
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
    ) -> None:
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
        self._tasks: dict[str, _Task] = {}
        self._retired: set[str] = set()  # removed, but kept until another adapter is loaded (PEFT needs >= 1)
        self._serial = 0
        self._lock = threading.RLock()
        # BitFit layers and head wrappers of the PeftModel, found in one module walk per load: with hundreds of
        # adapters, walking the model (every adapter adds a vector per layer and a head copy) costs milliseconds.
        self._layers: list[BitFitLayer] = []
        self._heads: list[ModulesToSaveWrapper] = []

    # ------------------------------------------------------------------ adapters
    @property
    def lock(self) -> threading.RLock:
        """The engine's re-entrant lock (hold it to make a check-then-predict atomic)."""
        return self._lock

    @property
    def model(self) -> nn.Module:
        """The served model: the ``PeftModel`` once an adapter is loaded, else the bare base."""
        return self._model if self._model is not None else self._base

    def tasks(self) -> list[str]:
        """Names of the loaded adapters (``"__base__"``, the bare base, is always servable too).

        Lock-free snapshot, so health checks and request validation never wait for a running batch.
        """
        return list(self._tasks)

    def has_task(self, name: str) -> bool:
        return name == BASE_ADAPTER_NAME or name in self._tasks

    def add_adapter(
        self,
        name: str,
        source: str | Path,
        *,
        revision: str | None = None,
        label_names: Sequence[str] | None = None,
        allow_hub: bool = True,
        allow_base_mismatch: bool = False,
    ) -> AdapterInfo:
        """Load the BitFit adapter at ``source`` (a local directory or a Hub id) as task ``name``.

        ``allow_base_mismatch=True`` skips the base-model fingerprint check (``bitfit_peft.allow_base_mismatch``),
        to apply an adapter trained on another base on purpose.

        Raises :class:`EngineError` (bad name, duplicate, wrong task type, load failure: the model is left as it
        was) or ``BitFitError`` (adapter trained on another base). Messages name the adapter ``name``, never the
        engine's internal PEFT name.
        """
        validate_adapter_name(name)
        adapter_dir = self._fetch(source, revision=revision, allow_hub=allow_hub)
        for file_name in _ADAPTER_FILES:  # everything the engine reads must lie inside the folder
            check_confined(adapter_dir, file_name)
        peft_cfg = _read_json(adapter_dir / CONFIG_NAME)
        if not is_bitfit(peft_cfg):
            raise EngineError(
                f"{source}: not a BitFit adapter (adapter_config.json peft_type={peft_cfg.get('peft_type')!r})."
            )
        adapter_task = peft_cfg.get("task_type")
        if adapter_task is not None and adapter_task != self.task_type:
            raise EngineError(
                f"{source}: adapter task_type {adapter_task!r} does not match this engine's {self.task_type!r}; "
                "serve it with an engine of that task type."
            )
        meta = read_task_metadata(adapter_dir)
        if label_names is not None:
            meta["labels"] = [str(x) for x in label_names]
        heads = [str(h) for h in (peft_cfg.get("modules_to_save") or []) if isinstance(h, str)]
        shapes = {k: v for k, v in _head_shapes(adapter_dir).items() if _is_head_key(k, heads)}
        with self._lock:
            if name in self._tasks:
                raise EngineError(f"An adapter named {name!r} is already loaded; remove it first or pick a new name.")
            # Internal PEFT name: never a part of "bitfit_", never ending in a head name ("score", "classifier",
            # which PEFT matches by suffix) and fresh on every load.
            self._serial += 1
            internal = f"{name}__{self._serial}"
            try:
                self._load(internal, adapter_dir, shapes, allow_base_mismatch=allow_base_mismatch)
            except Exception as err:
                _rename_in_message(err, internal, name)
                raise
            try:
                task = self._describe(name, internal, str(source), adapter_task, meta)
                task.sizes = self._sizes(internal)
            except Exception:
                self._delete_peft_adapter(internal)
                raise
            self._tasks[name] = task
            for old in sorted(self._retired):
                self._delete_peft_adapter(old)
            self._retired.clear()
            self._invalidate_caches()
            return self._info(task)

    def remove_adapter(self, name: str) -> None:
        """Unload task ``name`` (safe while other threads serve; in-flight batches finish first)."""
        with self._lock:
            if name not in self._tasks:
                raise UnknownTaskError(f"No adapter named {name!r} is loaded; loaded: {sorted(self._tasks)}.")
            task = self._tasks.pop(name)
            self._delete_peft_adapter(task.internal)  # retired instead when it is PEFT's last adapter
            self._invalidate_caches()

    def adapters(self) -> list[AdapterInfo]:
        """Name, task type, labels and memory (delta + head bytes) of every loaded adapter."""
        with self._lock:
            return [self._info(t) for t in self._tasks.values()]

    def _fetch(self, source: str | Path, revision: str | None, allow_hub: bool) -> Path:
        path = Path(source).expanduser()
        if path.is_dir():
            if not (path / CONFIG_NAME).is_file():
                raise EngineError(f"{path} has no adapter_config.json; point at a saved BitFit adapter directory.")
            return path.resolve()
        text = str(source)
        if not is_hub_id(text):
            raise EngineError(f"Adapter {text!r}: no such directory (and not a Hub id like 'user/repo').")
        if not allow_hub:
            raise EngineError(f"Adapter {text!r}: loading from the Hugging Face Hub is disabled.")
        from huggingface_hub import snapshot_download

        try:
            local = snapshot_download(
                text, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]
            )
        except Exception as err:  # noqa: BLE001 - network / auth / missing repo: report, keep serving
            raise EngineError(f"Could not download adapter {text!r} from the Hub: {err}") from err
        return Path(local)

    def _load(
        self, name: str, adapter_dir: Path, shapes: dict[str, tuple[int, ...]], allow_base_mismatch: bool = False
    ) -> None:
        from peft import PeftConfig, PeftModel

        from .. import allow_base_mismatch as _allow_mismatch

        config = None
        if allow_base_mismatch:
            config = _allow_mismatch(PeftConfig.from_pretrained(str(adapter_dir)))
            config.inference_mode = True
        root = self._base
        try:
            with _head_shapes_as(root, shapes):
                if self._model is None:
                    self._model = PeftModel.from_pretrained(root, str(adapter_dir), adapter_name=name, config=config)
                else:
                    if config is not None:  # load_adapter takes no config: register it first, then load the weights
                        self._model.add_adapter(name, config)
                    self._model.load_adapter(str(adapter_dir), adapter_name=name)
        except Exception:
            if self._model is not None and name in self._model.peft_config:
                self._delete_peft_adapter(name)
            raise
        self._model.eval()
        self._scan()
        for wrapper in self._heads:
            if name in wrapper.modules_to_save:
                _sync_linear_sizes(wrapper.modules_to_save[name])
        route_heads(self._heads, routing_of(self._model))

    def _scan(self) -> None:
        modules = list(self.model.modules())
        self._layers = [m for m in modules if isinstance(m, BitFitLayer)]
        self._heads = [m for m in modules if isinstance(m, ModulesToSaveWrapper)]

    def _delete_peft_adapter(self, name: str) -> None:
        model = self._model
        if model is None or name not in model.peft_config:
            return
        remaining = [n for n in model.peft_config if n != name]
        if not remaining:
            self._retired.add(name)
            return
        if name in model.active_adapters:
            model.set_adapter(remaining[0])
        model.delete_adapter(name)

    def _invalidate_caches(self) -> None:
        # Each layer caches its last mixed-batch table, which holds references to the deltas it was built from:
        # drop it on every change, so a removed adapter's tensors are freed.
        for module in self._layers:
            module.drop_cached_tables()

    def _describe(self, name: str, internal: str, source: str, task_type: str | None,
                  meta: dict[str, Any]) -> _Task:
        if self.task_type == "FEATURE_EXTRACTION":
            return _Task(name, internal, source, task_type, "embedding", None)
        if self.task_type in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
            return _Task(name, internal, source, task_type, "generation", None)
        num_labels = self._num_labels(internal)
        labels = meta.get("labels")
        kind = meta.get("kind") or ("regression" if num_labels == 1 and not labels else "classification")
        if kind == "classification":
            labels = labels or [f"LABEL_{i}" for i in range(num_labels)]
            if len(labels) != num_labels:
                raise EngineError(
                    f"Adapter {name!r}: its head has {num_labels} outputs but {len(labels)} label names were found "
                    f"({labels}). Fix the label names (label_names=...) or the head."
                )
        else:
            labels = None
        return _Task(name, internal, source, task_type, kind, labels, outputs=num_labels)

    def _num_labels(self, name: str) -> int:
        """Outputs of the head of the PEFT adapter ``name`` (the base's head if it has none)."""
        for wrapper in self._heads:
            module = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else None
            if module is not None:
                out = _last_linear_out(module)
                if out is not None:
                    return int(out)
        return int(self._base.config.num_labels)

    def _sizes(self, key: str) -> tuple[int, int, int]:
        """Delta params, delta bytes and head bytes of the PEFT adapter ``key``."""
        n_delta, delta_bytes = _param_bytes(
            [layer.delta_of(key) for layer in self._layers if key in layer.bitfit_delta]
        )
        _, head_bytes = _param_bytes(
            [p for w in self._heads if key in w.modules_to_save for p in w.modules_to_save[key].parameters()]
        )
        return n_delta, delta_bytes, head_bytes

    def _info(self, task: _Task) -> AdapterInfo:
        n_delta, delta_bytes, head_bytes = task.sizes
        return AdapterInfo(
            name=task.name,
            source=task.source,
            task_type=task.task_type,
            kind=task.kind,
            labels=task.labels,
            num_labels=len(task.labels) if task.labels else None,
            delta_params=n_delta,
            delta_bytes=delta_bytes,
            head_bytes=head_bytes,
        )

    def memory_report(self) -> dict[str, Any]:
        """Bytes of the shared base and of each adapter (what one more adapter costs)."""
        with self._lock:
            base_params = [p for n, p in self.model.named_parameters()
                           if "bitfit_delta" not in n and "modules_to_save" not in n]
            _, base_bytes = _param_bytes(base_params)
            adapters = {t.name: self._info(t).to_dict() for t in self._tasks.values()}
            return {"base_bytes": base_bytes, "adapters": adapters}

    # ------------------------------------------------------------------ inference
    def _check_tasks(self, tasks: Sequence[str]) -> list[str]:
        unknown = sorted({t for t in tasks if not self.has_task(t)})
        if unknown:
            raise UnknownTaskError(
                f"Unknown task(s) {unknown}; loaded adapters: {sorted(self._tasks)} "
                f"(use {BASE_ADAPTER_NAME!r} for the bare base model)."
            )
        return list(tasks)

    def _peft_names(self, names: list[str]) -> list[str]:
        return [BASE_ADAPTER_NAME if n == BASE_ADAPTER_NAME else self._tasks[n].internal for n in names]

    def _forward(self, names: list[str], **inputs: Any) -> Any:
        if self._model is None:
            return self._base(**inputs)
        return self._model(**inputs, adapter_names=self._peft_names(names))

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
                raise EngineError(f"Task names and texts must be non-empty strings, got {value!r}.")
        return task, text, pair

    def _encode(self, texts: list[str], pairs: list[str | None]) -> dict[str, torch.Tensor]:
        common = {"truncation": True, "max_length": self.max_length, "padding": True, "return_tensors": "pt"}
        if all(p is None for p in pairs):
            batch = self.tokenizer(texts, **common)
        elif all(p is not None for p in pairs):
            batch = self.tokenizer(texts, pairs, **common)
        else:  # single texts and pairs mixed: encode one by one, pad together
            batch = self._encode_mixed(texts, pairs)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _encode_mixed(self, texts: list[str], pairs: list[str | None]) -> Any:
        features = [
            self.tokenizer(t, p, truncation=True, max_length=self.max_length) if p is not None
            else self.tokenizer(t, truncation=True, max_length=self.max_length)
            for t, p in zip(texts, pairs, strict=True)
        ]
        return self.tokenizer.pad(features, padding=True, return_tensors="pt")

    def predict(self, requests: Sequence[Request]) -> list[Prediction]:
        """Classify / regress / embed a list of ``(task, text)`` or ``(task, (text, text_pair))`` in ONE forward.

        Unknown tasks raise :class:`UnknownTaskError` before any compute.
        """
        if self.task_type not in ("SEQ_CLS", "FEATURE_EXTRACTION"):
            raise EngineError(f"predict() serves SEQ_CLS / FEATURE_EXTRACTION engines; this one is "
                              f"{self.task_type}: use generate().")
        parsed = [self._split_request(r) for r in requests]
        if not parsed:
            return []
        with self._lock:
            names = self._check_tasks([p[0] for p in parsed])
            batch = self._encode([p[1] for p in parsed], [p[2] for p in parsed])
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
        base_labels = _labels_from_id2label(getattr(self._base.config, "id2label", None))
        for name, row in zip(names, logits.cpu(), strict=True):
            task = self._tasks.get(name)
            if task is None:  # the bare base: its own (possibly untrained) head
                kind = "regression" if self._base.config.num_labels == 1 else "classification"
                labels = base_labels or [f"LABEL_{i}" for i in range(self._base.config.num_labels)]
            else:
                kind, labels = task.kind, task.labels
            if kind == "regression":
                width = (task.outputs or 1) if task is not None else self._base.config.num_labels
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
    ) -> list[Generation]:
        """Continue each ``(task, prompt)`` with its own adapter, all prompts in ONE ``generate`` call.

        Sampling with ``seed`` is reproducible for the same batch; results of a sample depend on the other
        samples of its batch (they share the random stream).
        """
        if self.task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
            raise EngineError(f"generate() serves CAUSAL_LM / SEQ_2_SEQ_LM engines; this one is {self.task_type}.")
        parsed = [self._split_request(r) for r in requests]
        if any(p[2] is not None for p in parsed):
            raise EngineError("generate() takes (task, prompt) pairs, not text pairs.")
        if not parsed:
            return []
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": int(max_new_tokens),
            "do_sample": bool(do_sample),
            "num_beams": int(num_beams),
            "num_return_sequences": int(num_return_sequences),
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        for key, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)):
            if value is not None:
                gen_kwargs[key] = value
        with self._lock:
            names = self._check_tasks([p[0] for p in parsed])
            side = "left" if self.task_type == "CAUSAL_LM" else "right"
            batch = self.tokenizer(
                [p[1] for p in parsed], padding=True, truncation=True, max_length=self.max_length,
                return_tensors="pt", padding_side=side,
            )
            batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad():
                if self._model is None:
                    out = self._base.generate(**batch, **gen_kwargs)
                else:
                    out = self._model.generate(**batch, **gen_kwargs, adapter_names=self._peft_names(names))
        if self.task_type == "CAUSAL_LM":
            out = out[:, batch["input_ids"].shape[1]:]
        eos = self._eos_ids()
        rows = [_until_eos(row, eos) for row in out.cpu().tolist()]
        n = int(num_return_sequences)
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
        for value in (getattr(self._base.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids


def _rename_in_message(err: BaseException, internal: str, name: str) -> None:
    """Put the user's adapter ``name`` where a message names the internal PEFT name (``name__3``), in place."""
    if len(err.args) == 1 and isinstance(err.args[0], str) and internal in err.args[0]:
        err.args = (err.args[0].replace(repr(internal), repr(name)).replace(internal, name),)


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """New tokens up to and including the first end-of-sequence token (drops the batch's padding after it)."""
    for i, tok in enumerate(tokens):
        if tok in eos:
            return tokens[: i + 1]
    return tokens
