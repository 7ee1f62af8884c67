"""Every ```python block of README.md and docs/*.md runs, or says on its first line why it cannot.

How a page is run:

* Its ```python blocks are collected in order; all blocks of one page share one namespace (like a reader going
  down the page) and run in ONE fresh interpreter (``sys.executable``) whose working directory is an empty
  temporary folder, with a time limit. Tracebacks name the markdown file and its line numbers.
* A block whose first line is a comment starting with ``# Not run in CI:`` plus a reason (e.g.
  ``# Not run in CI: needs a CUDA GPU.``) is skipped; the reason stays visible to readers.
* Blocks that name Hub models or adapters (``"google-bert/bert-base-uncased"``, ``"me/other-bitfit"``, ...) run
  against the loopback Hub of ``tests/hub_server.py``, pre-populated with tiny random models (hidden 32, 2
  layers, from ``conftest.py``) and BitFit adapters under those ids (:data:`HUB_MODELS`, :data:`HUB_ADAPTERS`), so
  the real ``huggingface_hub`` / transformers / PEFT download and upload paths run. The child process gets
  ``HF_ENDPOINT`` (that server), a fresh ``HF_HOME`` and a test token. Pages that name no Hub id run with
  ``HF_HUB_OFFLINE=1``. Nothing reaches the network.
* Files a reader would already have (an adapter folder ``out/sst2`` trained earlier, a ``reviews.csv``) are
  put in the working directory first (:data:`LOCAL_ADAPTERS`, :data:`PAGE_FILES`).

A new Hub id in a block needs a tiny stand-in in :data:`HUB_MODELS` / :data:`HUB_ADAPTERS`. Pages that take more
than 5 s are marked ``slow`` (:data:`SLOW_PAGES`); CI runs them (``--runslow``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "# Not run in CI:"
PYTHON_INFO = {"python", "py", "python3"}

# Pages that take more than 5 s on the shared 2-core box (measured: hub-and-accelerate 5.1-5.4 s, training 9 s,
# serving 12 s, 40 s with a cold torch.compile cache; the others 3.6-4.1 s, of which importing torch,
# transformers and PEFT is 3.7 s).
SLOW_PAGES = {
    "docs/hub-and-accelerate.md",
    "docs/llm.md",  # TRL's import and three tiny trainings: 10-40 s
    "docs/serving.md",
    "docs/training.md",
}
PAGE_TIMEOUT_S = {"docs/serving.md": 900}  # torch.compile on CPU
DEFAULT_TIMEOUT_S = 600

# Hub ids named by the docs -> (tiny architecture, auto class task, seed). Different ids get different weights,
# so an adapter of one refuses another (the base fingerprint check) exactly like on the real Hub.
HUB_MODELS: dict[str, tuple[str, str, int]] = {
    "google-bert/bert-base-uncased": ("bert", "base", 0),
    "google-bert/bert-base-cased": ("bert", "base", 1),
    "sentence-transformers/all-MiniLM-L6-v2": ("bert", "base", 2),
    "google/bert_uncased_L-2_H-128_A-2": ("bert", "base", 3),
    "Qwen/Qwen2.5-0.5B": ("qwen2", "causal_lm", 0),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llama", "causal_lm", 0),
}


@dataclass(frozen=True)
class AdapterSpec:
    base: str  # a HUB_MODELS id
    task_type: str  # SEQ_CLS | CAUSAL_LM
    labels: tuple[str, ...] = ()  # SEQ_CLS label names (written to bitfit_training.json, as `bitfit-peft train` does)
    seed: int = 0


# BitFit adapters the docs load: Hub ids, and local folders (relative to the page's working directory).
HUB_ADAPTERS: dict[str, AdapterSpec] = {
    "someone/bitfit-ag-news": AdapterSpec(
        "sentence-transformers/all-MiniLM-L6-v2", "SEQ_CLS", ("World", "Sports", "Business", "Sci/Tech"), seed=1
    ),
    "me/other-bitfit": AdapterSpec("google-bert/bert-base-uncased", "SEQ_CLS", ("negative", "positive"), seed=2),
}
_MINILM = "sentence-transformers/all-MiniLM-L6-v2"
LOCAL_ADAPTERS: dict[str, dict[str, AdapterSpec]] = {
    "docs/serving.md": {
        "out/sst2": AdapterSpec(_MINILM, "SEQ_CLS", ("negative", "positive"), seed=3),
        "out/spam": AdapterSpec(_MINILM, "SEQ_CLS", ("ham", "spam"), seed=4),
        "out/summarize": AdapterSpec("Qwen/Qwen2.5-0.5B", "CAUSAL_LM", seed=5),
        "out/translate": AdapterSpec("Qwen/Qwen2.5-0.5B", "CAUSAL_LM", seed=6),
    },
    "docs/delta-format.md": {"my-adapter": AdapterSpec("google-bert/bert-base-uncased", "SEQ_CLS", seed=7)},
    "docs/hub-and-accelerate.md": {"adapter": AdapterSpec("google/bert_uncased_L-2_H-128_A-2", "SEQ_CLS", seed=8)},
}


def _reviews_csv() -> str:
    words = ["great", "fine", "dull", "awful", "superb", "weak", "lovely", "boring", "solid", "messy"]
    rows = ["review,stars"]
    for i in range(100):
        stars = 1 + i % 5
        rows.append(f"{words[i % 10]} {words[(3 * i + stars) % 10]} film number {i},{stars}")
    return "\n".join(rows) + "\n"


# Other files a reader of the page already has.
PAGE_FILES: dict[str, dict[str, str]] = {"docs/training.md": {"reviews.csv": _reviews_csv()}}


# ---------------------------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    skip_reason: str | None


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a markdown text, in order (fences may be indented, e.g. inside a list)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        info = m["info"].strip().split()
        lang = info[0].lstrip("{.").rstrip("}").lower() if info else ""
        start, body = i, []
        i += 1
        while i < len(lines):
            close = _FENCE.match(lines[i])
            if close and close["fence"].startswith(fence) and not close["info"].strip():
                break
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i].lstrip())
            i += 1
        i += 1
        if lang in PYTHON_INFO:
            code = textwrap.dedent("\n".join(body)) + "\n"
            first = next((ln.strip() for ln in code.splitlines() if ln.strip()), "")
            reason = first[len(MARKER) :].strip() if first.startswith(MARKER) else None
            blocks.append(Block(start + 1, code, reason))
    return blocks


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p.read_text(encoding="utf-8"))]


def _page_param(page: Path) -> object:
    rel = _rel(page)
    return pytest.param(rel, id=rel, marks=[pytest.mark.slow] if rel in SLOW_PAGES else [])


# ---------------------------------------------------------------------------------------------- the child process
_DRIVER = r"""
import json, sys, time, traceback

spec = json.loads(open(sys.argv[1], encoding="utf-8").read())
namespace = {"__name__": "__main__"}
for block in spec["blocks"]:
    if block["skip_reason"] is not None:
        print(f"@@DOCS-SKIP {block['line']}", flush=True)
        continue
    print(f"@@DOCS-START {block['line']}", flush=True)
    t0 = time.perf_counter()
    try:
        # pad with newlines so that tracebacks give the markdown file's own line numbers (and show its lines)
        exec(compile("\n" * block["line"] + block["code"], spec["path"], "exec"), namespace)
    except BaseException:
        trace = traceback.format_exc()
        with open(spec["error_file"], "w", encoding="utf-8") as f:
            f.write(f"{block['line']}\n{trace}")
        sys.stdout.flush()
        sys.stderr.flush()
        print(f"@@DOCS-FAIL {block['line']}\n{trace}", flush=True)
        sys.exit(1)
    print(f"@@DOCS-OK {block['line']} {time.perf_counter() - t0:.2f}", flush=True)
print("@@DOCS-DONE", flush=True)
"""

_HUB_HINT = (
    "\n(If the block names a Hub id that has no tiny stand-in yet, add one to HUB_MODELS / HUB_ADAPTERS in "
    "tests/test_docs.py.)"
)


def _needs_hub(blocks: list[Block]) -> bool:
    ids = [*HUB_MODELS, *HUB_ADAPTERS]
    return any(
        b.skip_reason is None and ("push_to_hub" in b.code or any(f'"{i}"' in b.code for i in ids)) for b in blocks
    )


def _run_page(rel: str, blocks: list[Block], cwd: Path, env: dict[str, str], timeout: float) -> None:
    spec_path = cwd.parent / "blocks.json"
    driver = cwd.parent / "run_blocks.py"
    error_file = cwd.parent / "error.txt"
    spec_path.write_text(
        json.dumps(
            {
                "path": str(ROOT / rel),
                "error_file": str(error_file),
                "blocks": [{"line": b.line, "code": b.code, "skip_reason": b.skip_reason} for b in blocks],
            }
        ),
        encoding="utf-8",
    )
    driver.write_text(_DRIVER, encoding="utf-8")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(driver), str(spec_path)],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        out, code = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        started = re.findall(r"^@@DOCS-START (\d+)$", out, flags=re.M)
        where = f"block at line {started[-1]}" if started else "before the first block"
        pytest.fail(f"{rel}, {where}: timed out after {timeout:.0f} s\n{_tail(out)}", pytrace=False)
    if code == 0 and "@@DOCS-DONE" in out:
        for kind, line, secs in re.findall(r"^@@DOCS-(OK|SKIP) (\d+) ?([\d.]*)$", out, flags=re.M):  # pytest -rP
            print(f"{rel}:{line}: " + (f"ran in {secs} s" if kind == "OK" else f"skipped ({MARKER} ...)"))
        print(f"{rel}: {len(blocks)} block(s), the interpreter ran {time.perf_counter() - t0:.1f} s")
        return
    if error_file.exists():  # the block's traceback, apart from progress bars and logs on stdout / stderr
        line, _, trace = error_file.read_text(encoding="utf-8").partition("\n")
        error = next((ln for ln in reversed(trace.splitlines()) if ln.strip()), "(no traceback)")
        hint = _HUB_HINT if re.search(r"RepositoryNotFound|LocalEntryNotFound|OfflineModeIsEnabled", trace) else ""
        output = _tail(out[: out.find("@@DOCS-FAIL")], 20)
        pytest.fail(
            f"{rel}, block at line {line}: {error}\n\n{_tail(trace, 80)}{hint}\n\n--- last output before it:\n{output}",
            pytrace=False,
        )
    started = re.findall(r"^@@DOCS-START (\d+)$", out, flags=re.M)
    where = f"block at line {started[-1]}" if started else "before the first block"
    pytest.fail(f"{rel}, {where}: the interpreter exited with {code}\n{_tail(out)}", pytrace=False)


def _tail(text: str, n: int = 60) -> str:
    lines = [ln for ln in text.splitlines() if not ln.startswith("@@DOCS-")]
    return "\n".join(lines[-n:])


# ---------------------------------------------------------------------------------------------- fixtures
def _files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _save_adapter(spec: AdapterSpec, base_dir: Path, out: Path) -> None:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import bitfit_peft
    from bitfit_peft import BitFitConfig

    if spec.task_type == "SEQ_CLS":
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=max(2, len(spec.labels)))
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.name_or_path = spec.base  # recorded as base_model_name_or_path, as if loaded from the Hub
    torch.manual_seed(spec.seed)
    peft_model = get_peft_model(model, BitFitConfig(task_type=spec.task_type, init_weights=False))
    bitfit_peft.save_pretrained(peft_model, out, save_embedding_layers=False)  # no Hub lookup of the base
    if spec.labels:
        summary = {"task": "seq-cls", "base_model": spec.base, "label_names": list(spec.labels)}
        (out / "bitfit_training.json").write_text(json.dumps(summary, indent=2) + "\n")


@dataclass
class DocsFixtures:
    hub_repos: dict[str, dict[str, bytes]]  # repo id -> files
    local: dict[str, dict[str, Path]]  # page -> {relative path in the working dir: built folder}


@pytest.fixture(scope="session")
def docs_fixtures(tmp_path_factory: pytest.TempPathFactory) -> DocsFixtures:
    from conftest import save_tiny_model
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no load reports ("classifier.weight MISSING") for the stand-ins
    hf_logging.disable_progress_bar()
    try:
        return _build_fixtures(tmp_path_factory.mktemp("docs-fixtures"), save_tiny_model)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _build_fixtures(root: Path, save_tiny_model: Callable[..., Path]) -> DocsFixtures:
    bases = {}
    for repo_id, (arch, task, seed) in HUB_MODELS.items():
        bases[repo_id] = save_tiny_model(root / "models" / repo_id.replace("/", "--"), arch, task=task, seed=seed)
    hub_repos = {repo_id: _files_of(folder) for repo_id, folder in bases.items()}
    for repo_id, spec in HUB_ADAPTERS.items():
        folder = root / "hub-adapters" / repo_id.replace("/", "--")
        _save_adapter(spec, bases[spec.base], folder)
        hub_repos[repo_id] = _files_of(folder)
    local: dict[str, dict[str, Path]] = {}
    for page, adapters in LOCAL_ADAPTERS.items():
        for rel, spec in adapters.items():
            folder = root / "local" / page.replace("/", "--") / rel
            _save_adapter(spec, bases[spec.base], folder)
            local.setdefault(page, {})[rel] = folder
    return DocsFixtures(hub_repos, local)


GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def _child_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "PYTHONPATH"}
    env.update(
        HF_HOME=str(home),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",  # tiny models: one thread is fastest on a shared box
        MPLBACKEND="Agg",
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONPATH=str(ROOT / "src"),  # this checkout's package (a worktree's, not the one installed in the venv)
    )
    return env


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("page", [_page_param(p) for p in PAGES_WITH_CODE])
def test_page_code_blocks_run(page: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    blocks = python_blocks((ROOT / page).read_text(encoding="utf-8"))
    if all(b.skip_reason is not None for b in blocks):
        pytest.skip(f"every python block of {page} is marked '{MARKER} ...'")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for rel, content in PAGE_FILES.get(page, {}).items():
        (cwd / rel).parent.mkdir(parents=True, exist_ok=True)
        (cwd / rel).write_text(content, encoding="utf-8")
    env = _child_env(tmp_path / "hf_home")
    timeout = PAGE_TIMEOUT_S.get(page, DEFAULT_TIMEOUT_S)
    needs_hub = _needs_hub(blocks)
    fixtures: DocsFixtures | None = None
    if page in LOCAL_ADAPTERS or needs_hub:
        fixtures = request.getfixturevalue("docs_fixtures")
        for rel, folder in fixtures.local.get(page, {}).items():
            shutil.copytree(folder, cwd / rel)
    if fixtures is None or not needs_hub:
        _run_page(page, blocks, cwd, env, timeout)
        return

    from hub_server import HubServer, Repo

    with HubServer() as hub:
        for repo_id, files in fixtures.hub_repos.items():
            repo = Repo(repo_id)
            repo.commit("main", {".gitattributes": GITATTRIBUTES, **files}, "upload tiny stand-in")
            hub.repos[repo_id] = repo
        env.update(HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_ENDPOINT=hub.url, HF_TOKEN="hf_local_test_token")
        _run_page(page, blocks, cwd, env, timeout)
        assert not hub.unknown, f"{page}: requests the test Hub does not implement: {hub.unknown}"


def test_skip_markers_are_well_formed() -> None:
    """A skipped block says why on its first line; a misspelt marker would silently run (or not)."""
    problems = []
    for page in PAGES:
        for block in python_blocks(page.read_text(encoding="utf-8")):
            first = next((ln.strip() for ln in block.code.splitlines() if ln.strip()), "")
            if block.skip_reason == "":
                problems.append(f"{_rel(page)}:{block.line}: '{MARKER}' needs a reason after the colon")
            elif block.skip_reason is None and re.match(r"#\s*not\s+run", first, flags=re.I):
                problems.append(f"{_rel(page)}:{block.line}: write the marker exactly as '{MARKER} <reason>'")
            elif block.skip_reason is None and MARKER in block.code:
                problems.append(f"{_rel(page)}:{block.line}: '{MARKER}' only counts on the block's first line")
    assert not problems, "\n".join(problems)


def test_python_blocks_parser() -> None:
    text = textwrap.dedent(
        """\
        # Title

        ```python
        x = 1
        ```

        ```bash
        echo no
        ```

        * a list item:

            ```python
            # Not run in CI: needs a CUDA GPU.
            y = x + 1
            ```

        ~~~py
        z = 3
        ~~~
        """
    )
    blocks = python_blocks(text)
    assert [b.line for b in blocks] == [3, 13, 18]
    assert blocks[0].code == "x = 1\n" and blocks[0].skip_reason is None
    assert blocks[1].skip_reason == "needs a CUDA GPU." and blocks[1].code.startswith("# Not run")
    assert blocks[2].code == "z = 3\n"


def test_every_page_with_python_is_collected() -> None:
    names = {_rel(p) for p in PAGES_WITH_CODE}
    assert "README.md" in names and "docs/index.md" in names
    assert SLOW_PAGES <= names, SLOW_PAGES - names
    assert set(LOCAL_ADAPTERS) | set(PAGE_FILES) <= names


def test_changelog_newest_release_is_the_package_version() -> None:
    """``CHANGELOG.md``'s newest ``## [x.y.z] - date`` is ``bitfit_peft.__version__`` (the wheel's version too)."""
    from importlib.metadata import version

    import bitfit_peft

    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert releases and releases[0] == bitfit_peft.__version__, (releases[:2], bitfit_peft.__version__)
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()
    assert version("bitfit-peft") == bitfit_peft.__version__  # the installed metadata (pip install -e . re-run?)
