"""How much did each bias move? The BitFit paper's Fig. 1 for any BitFit adapter.

For every bias vector ``b`` the adapter changed, the reported quantity is the paper's average absolute change
``(1/dim(b)) * ||b0 - bF||_1 = mean(|delta|)``. Vectors are grouped by layer index and bias kind
(query, key, value, attention_output, intermediate, output, layernorm, other); a cell of the layer x kind grid
is the element-weighted mean over the vectors in it (e.g. the two LayerNorms of a BERT block).

Works from an adapter directory (or Hub id) alone — only ``adapter_model.safetensors`` is read — or from a
loaded :class:`peft.PeftModel`. NaN/Inf entries are counted and left out of the means. A vector is *prunable*
at ``tolerance`` when it is finite and ``mean |delta| < tolerance`` — the rule ``BitFitConfig.prune_tolerance``
applies when saving, so the report tells what a save with that tolerance would drop.

Example:
    >>> from bitfit_peft.bias_report import bias_change_report, plot_bias_heatmap
    >>> report = bias_change_report("out/my-adapter")            # doctest: +SKIP
    >>> report.cell(0, "query")                                    # doctest: +SKIP
    0.0123
    >>> plot_bias_heatmap(report, "bias_change.png")               # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import huggingface_hub
import torch
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file
from transformers import AutoModel

from bitfit_peft.files.delta_format import from_legacy
from bitfit_peft.files.paths import is_hub_id
from bitfit_peft.files.validate import check_plain_file, read_config, read_header
from bitfit_peft.names import DEFAULT_TOLERANCE, DELTA_KEY, PEFT_PREFIX
from bitfit_peft.tuner.groups import BIAS_GROUPS, layer_index, primary_group

if TYPE_CHECKING:  # pragma: no cover
    from peft import PeftModel
    from torch import nn

__all__ = [
    "BIAS_KINDS",
    "DEFAULT_TOLERANCE",
    "BiasChangeReport",
    "VectorStat",
    "bias_change_report",
    "plot_bias_heatmap",
    "resolve_adapter_dir",
]

#: Row order of the report and heatmap (fused groups such as ``query/key/value`` go just before ``other``).
BIAS_KINDS: tuple[str, ...] = (*BIAS_GROUPS, "other")
ADAPTER_FILE = SAFETENSORS_WEIGHTS_NAME
_DELTA_SUFFIX = f".{DELTA_KEY}"


@dataclass(frozen=True)
class VectorStat:
    """Statistics of one bias delta vector."""

    name: str  #: module path inside the base model, e.g. ``bert.encoder.layer.0.attention.self.query``
    layer: int | None  #: transformer block index parsed from ``name`` (None: embeddings, pooler, ...)
    kind: str  #: bias kind (group) for reporting
    numel: int
    nbytes: int
    dtype: str
    abs_sum: float  #: sum of |delta| over finite entries
    mean_abs: float  #: paper's (1/dim(b)) * ||b0 - bF||_1 over finite entries (NaN if none is finite)
    max_abs: float  #: max |delta| over finite entries (NaN if none is finite)
    n_nan: int
    n_inf: int
    rel_change: float | None = None  #: mean|delta| / mean|b0| when the base bias is known and non-zero
    prunable: bool = False

    @property
    def n_finite(self) -> int:
        return self.numel - self.n_nan - self.n_inf


@dataclass
class BiasChangeReport:
    """Per-vector statistics plus the layer x kind grid of the paper's Fig. 1."""

    source: str
    adapter_name: str
    tolerance: float
    vectors: list[VectorStat] = field(default_factory=list)
    task_type: str | None = None  #: the adapter's task (``adapter_config.json``)
    labels: list[str] | None = None  #: its head's label names, by index (``id2label`` of ``adapter_config.json``)

    # ---------------------------------------------------------------- totals
    @property
    def n_vectors(self) -> int:
        return len(self.vectors)

    @property
    def n_params(self) -> int:
        return sum(v.numel for v in self.vectors)

    @property
    def nbytes(self) -> int:
        """Size of all deltas in bytes (as stored)."""
        return sum(v.nbytes for v in self.vectors)

    @property
    def n_nan(self) -> int:
        return sum(v.n_nan for v in self.vectors)

    @property
    def n_inf(self) -> int:
        return sum(v.n_inf for v in self.vectors)

    @property
    def nonfinite_vectors(self) -> list[str]:
        return [v.name for v in self.vectors if v.n_nan or v.n_inf]

    @property
    def prunable(self) -> list[VectorStat]:
        """Finite vectors with ``mean |delta| < tolerance`` (``BitFitConfig.prune_tolerance`` drops these)."""
        return [v for v in self.vectors if v.prunable]

    @property
    def prunable_bytes(self) -> int:
        return sum(v.nbytes for v in self.prunable)

    @property
    def mean_abs(self) -> float:
        """Mean |delta| over all finite entries of all vectors."""
        n = sum(v.n_finite for v in self.vectors)
        return sum(v.abs_sum for v in self.vectors) / n if n else math.nan

    # ---------------------------------------------------------------- grid
    @property
    def layers(self) -> list[int | None]:
        """Layer indices present, ascending; ``None`` (vectors outside the blocks) last."""
        idx = sorted({v.layer for v in self.vectors if v.layer is not None})
        return idx + ([None] if any(v.layer is None for v in self.vectors) else [])

    @property
    def kinds(self) -> list[str]:
        """Bias kinds present, in :data:`BIAS_KINDS` order (unknown/fused kinds before ``other``)."""
        present = {v.kind for v in self.vectors}
        known = [k for k in BIAS_KINDS[:-1] if k in present]
        extra = sorted(present - set(BIAS_KINDS))
        return known + extra + (["other"] if "other" in present else [])

    def cell(self, layer: int | None, kind: str) -> float:
        """Element-weighted mean |delta| of the vectors at (layer, kind); NaN if there are none."""
        vs = [v for v in self.vectors if v.layer == layer and v.kind == kind]
        n = sum(v.n_finite for v in vs)
        return sum(v.abs_sum for v in vs) / n if n else math.nan

    def grid(self) -> list[list[float]]:
        """``grid()[i][j]`` = :meth:`cell` for ``kinds[i]`` and ``layers[j]``."""
        return [[self.cell(layer, kind) for layer in self.layers] for kind in self.kinds]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (NaN becomes None)."""

        def clean(x: Any) -> Any:
            return None if isinstance(x, float) and not math.isfinite(x) else x

        return {
            "source": self.source,
            "adapter_name": self.adapter_name,
            "task_type": self.task_type,
            "labels": self.labels,
            "tolerance": self.tolerance,
            "n_vectors": self.n_vectors,
            "n_params": self.n_params,
            "nbytes": self.nbytes,
            "n_nan": self.n_nan,
            "n_inf": self.n_inf,
            "mean_abs": clean(self.mean_abs),
            "prunable": [v.name for v in self.prunable],
            "prunable_bytes": self.prunable_bytes,
            "kinds": self.kinds,
            "layers": self.layers,
            "grid": [[clean(x) for x in row] for row in self.grid()],
            "vectors": [{k: clean(x) for k, x in asdict(v).items()} for v in self.vectors],
        }

    def to_json(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


# -------------------------------------------------------------------- building blocks
def _vector_stat(
    name: str,
    delta: torch.Tensor,
    kind: str,
    tolerance: float,
    base_bias: torch.Tensor | None = None,
) -> VectorStat:
    d = delta.detach().to("cpu")
    nbytes = d.numel() * d.element_size()
    dtype = str(d.dtype).removeprefix("torch.")
    d = d.double().flatten()
    finite = torch.isfinite(d)
    n_nan = int(torch.isnan(d).sum())
    n_inf = int(torch.isinf(d).sum())
    a = d[finite].abs()
    abs_sum = float(a.sum())
    mean_abs = abs_sum / a.numel() if a.numel() else math.nan
    max_abs = float(a.max()) if a.numel() else math.nan
    rel = None
    if base_bias is not None and base_bias.numel() == d.numel():
        b0 = base_bias.detach().to("cpu").double().abs().mean()
        if float(b0) > 0 and not math.isnan(mean_abs):
            rel = mean_abs / float(b0)
    return VectorStat(
        name=name,
        layer=layer_index(name),
        kind=kind,
        numel=d.numel(),
        nbytes=nbytes,
        dtype=dtype,
        abs_sum=abs_sum,
        mean_abs=mean_abs,
        max_abs=max_abs,
        n_nan=n_nan,
        n_inf=n_inf,
        rel_change=rel,
        prunable=bool(n_nan == 0 and n_inf == 0 and (a.numel() == 0 or mean_abs < tolerance)),
    )


def resolve_adapter_dir(adapter: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A local adapter directory: ``adapter`` itself if it is a directory, else a Hub snapshot of it.

    Only ``adapter_config.json`` and ``adapter_model.safetensors`` are downloaded (and cached) via
    :func:`huggingface_hub.snapshot_download`.
    """
    path = Path(adapter).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.name.endswith(".safetensors"):
        return path.parent
    name = str(adapter)
    if not is_hub_id(name):
        raise FileNotFoundError(f"adapter directory {name!r} does not exist (and it is not a Hub id like 'user/repo')")

    patterns = [CONFIG_NAME, ADAPTER_FILE]
    local = huggingface_hub.snapshot_download(repo_id=name, revision=revision, allow_patterns=patterns)
    return Path(local)


def _read_adapter_file(adapter_dir: Path) -> dict[str, torch.Tensor]:
    file = check_plain_file(adapter_dir, ADAPTER_FILE)
    if file is None:
        raise FileNotFoundError(f"{adapter_dir / ADAPTER_FILE} not found (a BitFit adapter saves its deltas there)")
    read_header(file)  # the bounds every load path checks
    return from_legacy(load_file(str(file)), str(file))  # 0.1.0 files (stacked "layer.*." keys) -> PEFT's layout


def _read_config(adapter_dir: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict, read with the loaders' bounds ({} when missing, refused or not a JSON
    object: the report still shows the deltas)."""
    try:
        return read_config(adapter_dir / CONFIG_NAME, lenient=True) or {}
    except (OSError, ValueError):  # BitFitError (a refused file) is a ValueError
        return {}


def _base_biases(base: str | nn.Module) -> dict[str, torch.Tensor]:
    """``{module path: bias}`` of a base model (a module, or a local path / Hub id loaded with AutoModel)."""
    if isinstance(base, (str, os.PathLike)):
        base = AutoModel.from_pretrained(str(base))
    return {n.removesuffix(".bias"): p for n, p in base.named_parameters() if n.endswith(".bias")} | {
        n.removesuffix(".bias"): b for n, b in base.named_buffers() if n.endswith(".bias")
    }


def _match_base(name: str, biases: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Find ``name``'s base bias, allowing the base to lack leading components (BertModel vs BertFor...)."""
    parts = name.split(".")
    for i in range(len(parts)):
        hit = biases.get(".".join(parts[i:]))
        if hit is not None:
            return hit
    return None


def _report_from_file(
    adapter_dir: Path, source: str, base: str | nn.Module | None, tolerance: float, adapter_name: str
) -> BiasChangeReport:
    tensors = _read_adapter_file(adapter_dir)
    base_biases = _base_biases(base) if base is not None else {}
    base_modules = dict(base.named_modules()) if base is not None and not isinstance(base, str) else {}
    config = _read_config(adapter_dir)
    id2label = config.get("id2label") if isinstance(config.get("id2label"), dict) else {}
    labels = [str(v) for _, v in sorted(id2label.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)]
    report = BiasChangeReport(source=source, adapter_name=adapter_name, tolerance=tolerance,
                              task_type=config.get("task_type"), labels=labels or None)  # fmt: skip
    for key in sorted(tensors):
        if not key.endswith(_DELTA_SUFFIX):
            continue  # modules_to_save (classifier head) etc.
        name = key.removeprefix(PEFT_PREFIX).removesuffix(_DELTA_SUFFIX)
        kind = primary_group(name, _match_module(name, base_modules))
        b0 = _match_base(name, base_biases) if base_biases else None
        report.vectors.append(_vector_stat(name, tensors[key], kind, tolerance, b0))
    if not report.vectors:
        raise ValueError(f"{adapter_dir / ADAPTER_FILE} holds no BitFit deltas ('*.bitfit_delta' keys)")
    return report


def _match_module(name: str, modules: dict[str, nn.Module]) -> nn.Module | None:
    parts = name.split(".")
    for i in range(len(parts)):
        hit = modules.get(".".join(parts[i:]))
        if hit is not None:
            return hit
    return None


def _report_from_model(model: nn.Module, tolerance: float, adapter_name: str | None) -> BiasChangeReport:
    if adapter_name is None:
        active = getattr(model, "active_adapter", "default")
        adapter_name = active[0] if isinstance(active, (list, tuple)) else str(active)
    report = BiasChangeReport(source=type(model).__name__, adapter_name=adapter_name, tolerance=tolerance)
    for name, module in model.named_modules():
        deltas = getattr(module, "bitfit_delta", None)
        if deltas is None or not hasattr(deltas, "keys") or adapter_name not in deltas.keys():
            continue
        path = name.removeprefix(PEFT_PREFIX)
        kind = getattr(module, "bias_group", None) or primary_group(path)
        original = getattr(module, "original_bias", None)
        b0 = original() if callable(original) else getattr(getattr(module, "base_layer", None), "bias", None)
        report.vectors.append(_vector_stat(path, deltas[adapter_name], kind, tolerance, b0))
    if not report.vectors:
        raise ValueError(f"the model has no BitFit deltas for adapter {adapter_name!r}")
    return report


def bias_change_report(
    adapter: str | os.PathLike[str] | PeftModel | nn.Module,
    base: str | nn.Module | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    adapter_name: str | None = None,
    revision: str | None = None,
) -> BiasChangeReport:
    """Per-layer, per-kind average absolute bias change of a BitFit adapter (the paper's Fig. 1).

    Args:
        adapter: adapter directory, Hub id, or a loaded model holding BitFit layers (e.g. a ``PeftModel``).
        base: optional base model (module, local path or Hub id) for files: adds each vector's relative
            change ``mean|delta| / mean|b0|`` and exact norm detection. A loaded model already knows its base.
        tolerance: a finite vector is reported prunable when ``mean |delta| < tolerance`` (the rule of
            ``BitFitConfig.prune_tolerance``).
        adapter_name: which adapter of a loaded model (default: the active one); for files, saved keys carry
            no adapter name, so this only labels the report.
        revision: Hub revision, for Hub ids.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> from peft import get_peft_model
        >>> from bitfit_peft import BitFitConfig
        >>> cfg = BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)
        >>> model = get_peft_model(BertModel(cfg), BitFitConfig(bias_terms=["query"]))
        >>> for n, p in model.named_parameters():
        ...     if "bitfit_delta" in n:
        ...         _ = p.data.fill_(0.5)
        >>> r = bias_change_report(model)
        >>> r.kinds, r.layers, r.cell(1, "query"), r.n_params
        (['query'], [0, 1], 0.5, 16)
    """
    if tolerance < 0 or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    if not isinstance(adapter, (str, os.PathLike)):
        return _report_from_model(adapter, tolerance, adapter_name)
    adapter_dir = resolve_adapter_dir(adapter, revision=revision)
    if isinstance(base, (str, os.PathLike)):
        base = AutoModel.from_pretrained(str(base))
    return _report_from_file(adapter_dir, str(adapter), base, tolerance, adapter_name or "default")


# -------------------------------------------------------------------- plotting
def _layer_label(layer: int | None) -> str:
    return "–" if layer is None else str(layer)


def plot_bias_heatmap(
    report: BiasChangeReport,
    path: str | os.PathLike[str],
    title: str | None = None,
    annotate: bool | None = None,
) -> Path:
    """Write a PNG heatmap: rows = bias kinds, columns = layers (like the paper's Fig. 1).

    Empty cells (no such bias in that layer) are grey. Vectors outside the transformer blocks
    (embeddings, pooler) form the last column, labelled ``–``.

    >>> plot_bias_heatmap(report, "fig1.png")   # doctest: +SKIP
    PosixPath('fig1.png')
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array(report.grid(), dtype=float).reshape(len(report.kinds), len(report.layers))
    masked = np.ma.masked_invalid(grid)
    n_rows, n_cols = grid.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * n_cols + 2.5), max(2.5, 0.45 * n_rows + 1.5)))
    cmap = plt.get_cmap("Blues").with_extremes(bad="#dddddd")
    image = ax.imshow(masked, aspect="auto", cmap=cmap, vmin=0.0)
    ax.set_xticks(range(n_cols), [_layer_label(x) for x in report.layers])
    ax.set_yticks(range(n_rows), report.kinds)
    ax.set_xlabel("layer")
    ax.set_title(title or f"BitFit bias change: {report.source}", fontsize=10)
    cbar = fig.colorbar(image, ax=ax)
    cbar.set_label(r"$\frac{1}{\dim b}\,\|b_0 - b_F\|_1$")
    if annotate is None:
        annotate = n_cols * n_rows <= 120
    if annotate and masked.count():
        top = float(masked.max()) or 1.0
        for i in range(n_rows):
            for j in range(n_cols):
                if not np.ma.is_masked(masked[i, j]):
                    v = float(grid[i, j])
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                            color="white" if v > 0.6 * top else "black")  # fmt: skip
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def kinds_present(reports: Iterable[BiasChangeReport]) -> list[str]:
    """Union of kinds over several reports, in :data:`BIAS_KINDS` order."""
    present = {k for r in reports for k in r.kinds}
    return [k for k in BIAS_KINDS if k in present] + sorted(present - set(BIAS_KINDS))
