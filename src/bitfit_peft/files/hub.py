"""Model cards and Hub uploads for BitFit adapters.

- :func:`write_model_card` writes ``README.md`` next to a saved adapter: YAML front matter (``library_name: peft``,
  ``tags`` incl. ``bitfit``, ``base_model``, ``pipeline_tag``) and a short body (trainable parameters, file size,
  a loading snippet that imports ``bitfit_peft`` first). User-written text of an existing card is kept; only the
  section between ``<!-- bitfit-peft:begin -->`` and ``<!-- bitfit-peft:end -->`` is regenerated.
- :func:`push_to_hub` uploads a BitFit ``PeftModel`` with that card. Transformers' ``push_to_hub`` would replace
  PEFT's card by a generic ``library_name: transformers`` one; ours keeps the BitFit card and fails with a clear
  :class:`HubUnreachableError` when the Hub cannot be reached.
- Both are explicit: ``PeftModel.save_pretrained`` / ``push_to_hub`` stay PEFT's own (PEFT's generic card);
  :func:`bitfit_peft.save_pretrained` writes this card too.

Example:
    >>> import torch, bitfit_peft, bitfit_peft.files.hub, tempfile, os
    >>> from peft import get_peft_model
    >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 2)), bitfit_peft.BitFitConfig())
    >>> with tempfile.TemporaryDirectory() as d:
    ...     bitfit_peft.save_pretrained(model, d)
    ...     card = bitfit_peft.files.hub.write_model_card(d)
    ...     "library_name: peft" in card.read_text()
    True
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, constants
from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import safe_open

from bitfit_peft.files import fingerprint as _fingerprint
from bitfit_peft.files.delta_format import LEGACY_DELTA_SUFFIX, LEGACY_INDEX_SUFFIX
from bitfit_peft.files.paths import is_hub_id
from bitfit_peft.names import DELTA_KEY, PEFT_PREFIX, __version__
from bitfit_peft.tasks import task_of
from bitfit_peft.utils import human_bytes

BEGIN = "<!-- bitfit-peft:begin -->"
END = "<!-- bitfit-peft:end -->"
WEIGHTS_NAMES = (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)

class HubUnreachableError(ConnectionError):
    """The Hugging Face Hub (``HF_ENDPOINT``) could not be reached; nothing was uploaded."""


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


def _base_params(model: Any) -> int | None:
    try:
        return sum(
            p.numel() for n, p in model.named_parameters() if ".bitfit_delta." not in n and ".modules_to_save." not in n
        )
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------- card
def _snippet(task_type: str | None, base_model: str, adapter: str, adapter_name: str | None, auto: bool = True) -> str:
    auto_cls = task_of(task_type).auto_model
    lines = [
        "```python",
        "import bitfit_peft  # registers the BITFIT tuner type with PEFT: import it before loading",
        f"from transformers import {auto_cls}",
        "from peft import PeftModel",
        "",
        f'base = {auto_cls}.from_pretrained("{base_model}")',
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
            "",
            f'model = {auto_peft}.from_pretrained("{adapter}")',
            "```",
        ]
    return "\n".join(lines)


def _section(adapters: list[AdapterSummary], base_model: str | None, adapter_ref: str, base_params: int | None) -> str:
    first = adapters[0]
    base_label = base_model or "the base model it was trained on"
    out = [
        BEGIN,
        f"# BitFit adapter for {f'`{base_model}`' if base_model else 'a transformers model'}",
        "",
        "Bias-only fine-tuning ([BitFit](https://arxiv.org/abs/2106.10199)) saved with "
        "[bitfit-peft](https://pypi.org/project/bitfit-peft/) as a PEFT adapter (`peft_type: BITFIT`): only bias "
        "deltas (and any `modules_to_save`, e.g. a classifier head) were trained; the base weights are unchanged.",
        "",
        "| Adapter | Task | Bias terms | Trainable parameters | Bias deltas | Saved modules | File | Size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in adapters:
        share = f" ({100 * a.trainable_params / base_params:.3f}% of {base_params:,})" if base_params else ""
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
    out += ["", "## How to load", ""]
    sub = None if first.path == "." else first.path
    task = first.config.get("task_type")
    has_base = bool(first.config.get("base_model_name_or_path"))
    out.append(_snippet(task, base_label if base_model else "<base model>", adapter_ref, sub, auto=has_base))
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
    hub_base = base_model if is_hub_id(base_model) else None
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
    ref = repo_id or (hub_base and "<this repo id>") or os.path.basename(os.path.abspath(directory))
    card.text = _merge_text(card.text or "", _section(adapters, base_model, ref, base_params))
    return card


def write_model_card(
    source: Any,
    output_dir: str | os.PathLike | None = None,
    *,
    base_model: str | None = None,
    repo_id: str | None = None,
    tags: Iterable[str] = (),
    model: Any = None,
) -> Path:
    """Write ``README.md`` for a saved BitFit adapter and return its path.

    Args:
        source: a directory holding ``adapter_config.json`` + ``adapter_model.safetensors`` (and sub-folders for
            other adapters), or a ``PeftModel``; a model is saved to ``output_dir`` first unless it already
            holds an adapter.
        output_dir: where the card goes (default: ``source`` when it is a directory).
        base_model: Hub id of the base model (default: ``base_model_name_or_path`` of the adapter config; local
            paths are described in the text but left out of the YAML, which the Hub only accepts for Hub ids).
        repo_id: Hub repo id used in the loading snippet (default: the directory name).
        tags: extra tags; ``bitfit`` and ``peft`` are always there.
        model: the ``PeftModel`` the directory was saved from (adds the trainable share of all parameters).

    An existing ``README.md`` keeps its front matter and text; the bitfit-peft section is replaced.
    """
    if isinstance(source, (str, os.PathLike)):
        directory = Path(output_dir or source)
        if output_dir is not None and Path(source) != Path(output_dir):
            raise ValueError("write_model_card(dir): the card goes next to the adapter; omit output_dir.")
    else:
        if output_dir is None:
            raise ValueError("write_model_card(model) needs output_dir (where the adapter is or will be saved).")
        directory = Path(output_dir)
        if not (directory / CONFIG_NAME).is_file():
            source.save_pretrained(directory)
        model = source
    base_params = _base_params(model) if model is not None else None
    readme = directory / "README.md"
    existing = readme.read_text(encoding="utf-8") if readme.is_file() else None
    card = build_model_card(
        directory,
        base_model=base_model,
        repo_id=repo_id,
        tags=tags,
        base_params=base_params,
        existing=existing,
    )
    tmp = readme.with_name(f".README.md.{os.getpid()}.tmp")
    tmp.write_text(str(card), encoding="utf-8")
    os.replace(tmp, readme)
    return readme


# ---------------------------------------------------------------------------------------------- upload
def _unreachable(endpoint: str, err: BaseException) -> HubUnreachableError:
    return HubUnreachableError(
        f"Cannot reach the Hugging Face Hub at {endpoint} ({type(err).__name__}: {err}). Nothing was uploaded. "
        "Check your network / proxy and the HF_ENDPOINT environment variable, or keep the adapter local with "
        "`model.save_pretrained(dir)` and upload it later with `huggingface_hub.upload_folder`."
    )


def push_to_hub(
    model: Any,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    base_model: str | None = None,
    **save_kwargs: Any,
) -> Any:
    """Save ``model``'s adapter(s) with the BitFit model card and upload them in one commit.

    Returns the :class:`huggingface_hub.CommitInfo` (``.oid`` is the new revision). Raises
    :class:`HubUnreachableError` when the Hub cannot be reached.
    """
    try:  # the HTTP client huggingface_hub uses (httpx2 in v2, httpx in v1)
        import httpx2 as http
    except ImportError:  # pragma: no cover
        import httpx as http

    api = HfApi(library_name="bitfit-peft", library_version=__version__)
    try:
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            try:
                existing = api.hf_hub_download(
                    repo_id,
                    "README.md",
                    revision=revision,
                    token=token,
                    cache_dir=os.path.join(tmp, ".cache"),
                )
                Path(tmp, "README.md").write_bytes(Path(existing).read_bytes())
            except (EntryNotFoundError, RevisionNotFoundError):
                pass
            out = Path(tmp, "out")
            if Path(tmp, "README.md").is_file():
                out.mkdir()
                os.replace(Path(tmp, "README.md"), out / "README.md")
            model.save_pretrained(str(out), **save_kwargs)
            write_model_card(str(out), base_model=base_model, repo_id=repo_id, tags=tags or [], model=model)
            if revision is not None and not revision.startswith("refs/pr"):
                api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
            operations = [
                CommitOperationAdd(path_in_repo=p.relative_to(out).as_posix(), path_or_fileobj=str(p))
                for p in sorted(out.rglob("*"))
                if p.is_file()
            ]
            return api.create_commit(
                repo_id,
                operations=operations,
                commit_message=commit_message or "Upload BitFit adapter",
                commit_description=commit_description,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )
    except (http.ConnectError, http.TimeoutException) as err:
        raise _unreachable(constants.ENDPOINT, err) from None
