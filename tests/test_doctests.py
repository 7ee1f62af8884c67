"""Every module's ``>>>`` examples run: one test per module of the installed ``bitfit_peft`` package.

Modules are discovered at test time (``pkgutil.walk_packages`` over ``bitfit_peft.__path__``), so the test follows
modules that move into subpackages. A module whose import fails because an *optional* dependency (an extra of
``bitfit-peft``, e.g. ``ray`` for ``serving.ray_serve``) is missing is skipped with the reason; any other import
error fails. ``__main__`` modules are left out: importing one runs the CLI.

Examples that are only a comment (``>>> # model(**batch)``) are not examples to :mod:`doctest`: they never run.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.metadata
import pkgutil
import re
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

import bitfit_peft

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
#: the discovery must find at least this many modules with examples (33 files had ``>>>`` lines in issue 29)
MIN_MODULES_WITH_EXAMPLES = 25


def _module_names() -> list[str]:
    names = [bitfit_peft.__name__]
    # onerror: a subpackage that cannot be imported is still yielded by name, and fails (or skips) in its own test
    for info in pkgutil.walk_packages(bitfit_peft.__path__, prefix=f"{bitfit_peft.__name__}.", onerror=lambda _: None):
        if info.name.rsplit(".", 1)[-1] != "__main__":
            names.append(info.name)
    return sorted(names)


MODULES = _module_names()


@cache
def _optional_imports() -> dict[str, str]:
    """Top-level import name -> extra, for the optional dependencies of the installed ``bitfit-peft``."""
    found: dict[str, str] = {}
    for req in importlib.metadata.requires("bitfit-peft") or []:
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        if extra:
            dist = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req)
            assert dist is not None, req
            for name in _import_names(dist.group(0)):
                found.setdefault(name, extra.group(1))
    return found


def _import_names(dist: str) -> set[str]:
    names = {re.sub(r"[-.]+", "_", dist).lower()}
    try:
        top_level = importlib.metadata.distribution(dist).read_text("top_level.txt") or ""
    except importlib.metadata.PackageNotFoundError:
        return names  # not installed: its import name is (nearly always) the normalised distribution name
    return names | {line.strip() for line in top_level.splitlines() if line.strip()}


def _import(name: str) -> ModuleType:
    """Import ``name``; skip if an optional dependency is missing, fail on any other import error."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        missing = (err.name or "").split(".")[0]
        extra = _optional_imports().get(missing.lower())
        if extra is None:
            raise
        pytest.skip(f"{name}: optional dependency {missing!r} is not installed (pip install 'bitfit-peft[{extra}]')")


def _doctests(module: ModuleType) -> list[doctest.DocTest]:
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, module.__name__)
    return sorted((t for t in tests if t.examples), key=lambda t: (t.lineno or 0, t.name))


@pytest.mark.parametrize("name", MODULES)
def test_module_examples(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _import(name)
    monkeypatch.chdir(tmp_path)  # examples that save files write them here, not into the checkout
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS, verbose=False)
    for test in _doctests(module):
        runner.run(test, out=report.append)
    assert runner.failures == 0, f"{runner.failures} of {runner.tries} examples failed:\n" + "".join(report)


def test_discovery_finds_examples() -> None:
    """The discovery cannot silently find nothing: most modules carry examples."""
    assert f"{bitfit_peft.__name__}.training" in MODULES, MODULES
    with_examples = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0].lower() in _optional_imports():
                continue
            raise
        if _doctests(module):
            with_examples.append(name)
    assert len(with_examples) >= MIN_MODULES_WITH_EXAMPLES, with_examples
