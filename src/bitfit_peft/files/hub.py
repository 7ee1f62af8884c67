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

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError
from peft.utils.constants import CONFIG_NAME

from bitfit_peft.files.model_card import (  # noqa: F401 - BEGIN, END, AdapterSummary, read_adapters: this API
    BEGIN,
    END,
    AdapterSummary,
    TrainingFacts,
    build_model_card,
    read_adapters,
)
from bitfit_peft.names import __version__


class HubUnreachableError(ConnectionError):
    """The Hugging Face Hub (``HF_ENDPOINT``) could not be reached; nothing was uploaded."""


def _base_params(model: Any) -> int | None:
    try:
        return sum(
            p.numel() for n, p in model.named_parameters() if ".bitfit_delta." not in n and ".modules_to_save." not in n
        )
    except Exception:
        return None


def write_model_card(
    source: Any,
    output_dir: str | os.PathLike | None = None,
    *,
    base_model: str | None = None,
    repo_id: str | None = None,
    tags: Iterable[str] = (),
    model: Any = None,
    training: TrainingFacts | None = None,
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
        training: what the card says about the training run (data, dev metrics; see :class:`TrainingFacts`).

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
        training=training,
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
    training: TrainingFacts | None = None,
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
            write_model_card(
                str(out), base_model=base_model, repo_id=repo_id, tags=tags or [], model=model, training=training
            )
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
