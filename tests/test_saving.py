"""``bitfit_peft.files.atomic_save``: all-or-nothing saves that loading never has to repair.

Killed saves (SIGKILL at random points) and two processes saving to one folder at once must leave the complete old
or new adapter (root and sub-folder adapters from the same save); other files in the folder survive byte for byte;
files get plain-``open()`` modes; stale stages are removed by the next save, and loads change nothing on disk.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import random
import signal
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils.save_and_load import load_peft_weights
from torch import nn

import bitfit_peft
from bitfit_peft import BitFitConfig
from bitfit_peft.files import atomic_save
from bitfit_peft.files.atomic_save import STAGING_PREFIX, save_pretrained, transactional_save

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FORK = multiprocessing.get_context("fork")
# version -> adapter -> (targets, delta value); both versions save both adapters ("extra" goes to extra/)
VERSIONS = {"A": {"default": (["0", "1", "2"], 1.0), "extra": (["3"], 1.5)},
            "B": {"default": (["0", "2", "3"], 2.0), "extra": (["1"], 2.5)}}  # fmt: skip
TRAINER_FILES = {  # what HF Trainer leaves in a checkpoint folder beside the adapter
    "optimizer.pt": os.urandom(200_000),
    "scheduler.pt": b"scheduler",
    "trainer_state.json": b'{"global_step": 500}',
    "runs/Dec01_12-00-00/events.out.tfevents.1.host": b"events",
}


# ---------------------------------------------------------------------------------------------- helpers
def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.LayerNorm(64), nn.Linear(64, 64), nn.Linear(64, 4))


def _model(tag: str) -> PeftModel:
    """Version ``tag``: two BitFit adapters whose targets and delta values differ from the other version's."""
    spec = VERSIONS[tag]
    model = get_peft_model(_base(), BitFitConfig(target_modules=spec["default"][0]))
    model.add_adapter("extra", BitFitConfig(target_modules=spec["extra"][0]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".bitfit_delta." in name:
                param.fill_(spec[name.rsplit(".", 1)[1]][1])
    return model


def _identify(directory: Path) -> str:
    """Load ``directory`` (root and extra/) onto a fresh base with PEFT's plain loaders; the version, or raise."""
    loaded = PeftModel.from_pretrained(_base(), directory)
    loaded.load_adapter(directory / "extra", adapter_name="extra")
    found = {}
    for adapter in ("default", "extra"):
        targets = sorted(loaded.peft_config[adapter].target_modules)
        values = {float(p.detach().unique().item()) for n, p in loaded.named_parameters() if n.endswith(adapter)}
        tags = [t for t, spec in VERSIONS.items() if spec[adapter] == (targets, *values)]
        if len(values) != 1 or not tags:
            raise AssertionError(f"{adapter}: targets {targets} with deltas {values} match no version")
        found[adapter] = tags[0]
    if found["default"] != found["extra"]:
        raise AssertionError(f"mixed versions: {found}")
    return found["default"]


def _plain_save(model: PeftModel, directory: str | Path, **kwargs: Any) -> None:
    """PEFT's own, non-atomic save: the control that the kill and concurrency checks must catch."""
    atomic_save._peft_save()(model, str(directory), **kwargs)


def _stages(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if STAGING_PREFIX in p.name)


def _plant_trainer_files(directory: Path) -> None:
    for rel, content in TRAINER_FILES.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(content)


def _assert_trainer_files(directory: Path) -> None:
    for rel, content in TRAINER_FILES.items():
        assert (directory / rel).read_bytes() == content, rel


def _listing(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (and ``root`` itself) with what a write, move or delete would change."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_ino, st.st_size, st.st_nlink, st.st_mtime_ns,
                                                st.st_ctime_ns)  # fmt: skip
    return out


def _dead_pid() -> int:
    child = FORK.Process(target=os._exit, args=(0,))
    child.start()
    child.join()
    return child.pid


# ---------------------------------------------------------------------------------------------- killed saves
def _save_loop(directory: str, plain: bool) -> None:  # runs in a forked child until SIGKILLed
    torch.set_num_threads(1)
    models = [_model("A"), _model("B")]
    save = _plain_save if plain else save_pretrained
    for i in range(10**9):
        save(models[i % 2], directory)


def _kill_run(tmp_path: Path, plain: bool, kills: int, budget_s: float) -> dict[str, Any]:
    directory = tmp_path / "adapter"
    model_a = _model("A")
    (_plain_save if plain else save_pretrained)(model_a, directory)  # there is always an old version
    _plant_trainer_files(directory)
    t0 = time.perf_counter()
    for _ in range(5):
        save_pretrained(model_a, tmp_path / "timing")
    save_s = (time.perf_counter() - t0) / 5
    rng = random.Random(1234)
    stats: dict[str, Any] = {"kills": 0, "mid_save": 0, "A": 0, "B": 0, "broken": [], "save_s": save_s}
    deadline = time.monotonic() + budget_s
    while stats["kills"] < kills and time.monotonic() < deadline:
        child = FORK.Process(target=_save_loop, args=(str(directory), plain), daemon=True)
        child.start()
        time.sleep(rng.uniform(0.0, 6 * save_s) + 0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        stats["kills"] += 1
        stats["mid_save"] += any(f"{STAGING_PREFIX}{child.pid}-" in s for s in _stages(tmp_path))  # its stage left
        try:
            stats[_identify(directory)] += 1
            _assert_trainer_files(directory)
        except Exception as err:  # noqa: BLE001 - we record every kind of breakage
            stats["broken"].append(f"{type(err).__name__}: {str(err)[:120]}")
            (_plain_save if plain else save_pretrained)(model_a, directory)
            _plant_trainer_files(directory)
    return stats


def test_killed_saves_leave_old_or_new_adapter(tmp_path: Path) -> None:
    stats = _kill_run(tmp_path, plain=False, kills=100, budget_s=12)
    print(f"atomic save under SIGKILL: {stats}")
    assert stats["kills"] >= 30, stats
    assert not stats["broken"], stats
    assert stats["A"] and stats["B"] and stats["mid_save"] >= 5, stats  # kills landed mid-save, around swaps
    save_pretrained(_model("B"), tmp_path / "adapter")  # the next save removes the stages of killed ones
    assert _stages(tmp_path) == [] and _identify(tmp_path / "adapter") == "B"


@pytest.mark.slow
def test_kill_check_catches_peft_plain_save(tmp_path: Path) -> None:
    """Control: PEFT's own save (README, weights, config, extra/ written one after another) gets caught."""
    stats = _kill_run(tmp_path, plain=True, kills=40, budget_s=30)
    print(f"plain save under SIGKILL: {stats['kills']} kills, {len(stats['broken'])} broken: {stats['broken'][:3]}")
    assert stats["broken"], stats


# ---------------------------------------------------------------------------------------------- concurrent saves
def _save_when(directory: str, tag: str, start: Any, plain: bool, saves: int, times: Any) -> None:
    torch.set_num_threads(1)
    model = _model(tag)
    start.wait()
    began = time.monotonic()
    for _ in range(saves):
        (_plain_save if plain else save_pretrained)(model, directory)
    times.put((began, time.monotonic()))


def _concurrent_run(tmp_path: Path, plain: bool, rounds: int, saves: int, until_broken: bool = False) -> dict[str, Any]:
    stats: dict[str, Any] = {"rounds": 0, "overlapped": 0, "A": 0, "B": 0, "broken": []}
    for i in range(rounds):
        if until_broken and stats["broken"]:
            break
        directory = tmp_path / f"round-{i}"
        _plain_save(_model("A" if i % 2 else "B"), directory)
        _plant_trainer_files(directory)
        start, times = FORK.Event(), FORK.Queue()
        args = [(str(directory), tag, start, plain, saves, times) for tag in "AB"]
        children = [FORK.Process(target=_save_when, args=a) for a in args]
        for child in children:
            child.start()
        time.sleep(0.05)  # both have built their model and wait
        start.set()
        for child in children:
            child.join(60)
        spans = [times.get(timeout=5) for _ in children if child.exitcode == 0]
        stats["rounds"] += 1
        stats["overlapped"] += len(spans) == 2 and max(s[0] for s in spans) < min(s[1] for s in spans)
        try:
            assert [c.exitcode for c in children] == [0, 0], [c.exitcode for c in children]
            stats[_identify(directory)] += 1
            _assert_trainer_files(directory)
            assert _stages(tmp_path) == []
        except Exception as err:  # noqa: BLE001
            stats["broken"].append(f"{type(err).__name__}: {str(err)[:120]}")
    return stats


def test_concurrent_saves_end_with_one_complete_adapter(tmp_path: Path) -> None:
    stats = _concurrent_run(tmp_path, plain=False, rounds=20, saves=2)
    print(f"atomic concurrent saves: {stats}")
    assert stats["rounds"] == 20 and not stats["broken"], stats
    assert stats["overlapped"] >= 10, stats  # the saves did run at the same time


@pytest.mark.slow
def test_concurrency_check_catches_peft_plain_save(tmp_path: Path) -> None:
    stats = _concurrent_run(tmp_path, plain=True, rounds=300, saves=2, until_broken=True)  # ~1 in 10 rounds break
    print(f"plain concurrent saves: {len(stats['broken'])} of {stats['rounds']} rounds broken: {stats['broken'][:3]}")
    assert stats["broken"], stats


# ---------------------------------------------------------------------------------------------- other files
def test_files_that_are_not_the_adapters_survive(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoint-500"
    other = get_peft_model(_base(), BitFitConfig(target_modules=["2"]), adapter_name="other")
    _plain_save(other, directory)  # other/ (an adapter this save does not write) + README
    _plant_trainer_files(directory)
    (directory / "README.md").write_text("---\nlicense: mit\n---\n\nMy notes.\n")
    (directory / "latest").symlink_to("runs")
    (directory / "adapter_model.bin").write_bytes(b"stale weights of another format")
    before = {p: (directory / p).read_bytes() for p in ("other/adapter_config.json", "other/adapter_model.safetensors")}
    save_pretrained(_model("A"), directory)
    _assert_trainer_files(directory)
    assert os.readlink(directory / "latest") == "runs"
    assert {p: (directory / p).read_bytes() for p in before} == before
    card = (directory / "README.md").read_text()
    assert "My notes." in card and "license: mit" in card  # PEFT updated the card in place
    assert "bitfit" in card and STAGING_PREFIX not in card  # the BitFit card names the folder, not the stage
    assert not (directory / "adapter_model.bin").exists()  # would shadow nothing, but is not the new adapter
    assert _identify(directory) == "A"
    loaded = PeftModel.from_pretrained(_base(), directory / "other", adapter_name="other")
    assert sorted(loaded.peft_config["other"].target_modules) == ["2"]
    save_pretrained(_model("B"), directory, selected_adapters=["extra"])  # root adapter is not this save's
    assert sorted(json.loads((directory / "adapter_config.json").read_text())["target_modules"]) == ["0", "1", "2"]
    assert sorted(json.loads((directory / "extra" / "adapter_config.json").read_text())["target_modules"]) == ["1"]
    _assert_trainer_files(directory)


def test_save_swaps_the_whole_folder_in_one_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "adapter"
    save_pretrained(_model("A"), directory)
    inode, calls, real = directory.stat().st_ino, [], atomic_save._renameat2
    monkeypatch.setattr(atomic_save, "_renameat2", lambda *a: calls.append(a[2]) or real(*a))
    save_pretrained(_model("B"), directory)
    assert calls == [2] and directory.stat().st_ino != inode  # RENAME_EXCHANGE put a new directory there
    assert _identify(directory) == "B" and sorted(os.listdir(tmp_path)) == ["adapter"]


def test_entries_added_during_a_save_are_kept(tmp_path: Path) -> None:
    directory = tmp_path / "adapter"
    save_pretrained(_model("A"), directory)
    (directory / "runs").mkdir()

    def write(stage: str) -> None:  # another process adds files to the live folder meanwhile
        (directory / "added.txt").write_text("late")
        (directory / "runs" / "late.event").write_text("late")
        atomic_save._peft_save()(_model("B"), stage)

    transactional_save(directory, write)
    assert (directory / "added.txt").read_text() == "late" and (directory / "runs" / "late.event").exists()
    assert _identify(directory) == "B"


def test_new_folder_created_meanwhile_is_merged(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b" / "adapter"

    def write(stage: str) -> None:
        directory.mkdir(parents=True)
        (directory / "trainer_state.json").write_text("{}")
        atomic_save._peft_save()(_model("A"), stage)

    transactional_save(directory, write)
    assert (directory / "trainer_state.json").read_text() == "{}" and _identify(directory) == "A"
    assert _stages(directory.parent) == []


def test_failed_write_leaves_the_old_folder(tmp_path: Path) -> None:
    directory = tmp_path / "adapter"
    save_pretrained(_model("A"), directory)
    before = _listing(directory)

    def write(stage: str) -> None:
        atomic_save._peft_save()(_model("B"), stage)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        transactional_save(directory, write)
    assert _listing(directory) == before and sorted(os.listdir(tmp_path)) == ["adapter"]


# ---------------------------------------------------------------------------------------------- modes
@pytest.fixture
def umask_027() -> Iterator[None]:
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_modes_are_those_of_a_normal_write(tmp_path: Path, umask_027: None) -> None:
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain-dir").mkdir()
    file_mode = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    dir_mode = stat.S_IMODE((tmp_path / "plain-dir").stat().st_mode)
    assert (file_mode, dir_mode) == (0o640, 0o750)
    directory = tmp_path / "adapter"
    for round_ in range(2):  # new folder, then over an existing one
        save_pretrained(_model("AB"[round_]), directory)
        assert stat.S_IMODE(directory.stat().st_mode) == (dir_mode if round_ == 0 else 0o705)
        assert stat.S_IMODE((directory / "extra").stat().st_mode) == dir_mode
        for path in [p for p in directory.rglob("*") if p.is_file()]:
            assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
        directory.chmod(0o705)  # an existing folder keeps its own bits


# ---------------------------------------------------------------------------------------------- loads never write
@pytest.fixture
def read_only_tree(tmp_path: Path) -> Iterator[Path]:
    """A saved adapter with Trainer files, a killed save's stage beside it and a decoy journal, all read-only."""
    parent = tmp_path / "parent"
    directory = parent / "adapter"
    save_pretrained(_model("A"), directory)
    _plant_trainer_files(directory)
    stale = parent / f".adapter{STAGING_PREFIX}{_dead_pid()}-00ff"
    _plain_save(_model("B"), stale / "adapter")
    (parent / "victim").mkdir()
    (parent / "victim" / "adapter_config.json").write_text("{}")
    decoy = {"staging": "../victim", "files": ["adapter_config.json"]}  # the removed design's journal
    (directory / ".bitfit-commit.json").write_text(json.dumps(decoy))
    os.system(f"chmod -R a-w '{parent}'")
    try:
        yield directory
    finally:
        os.system(f"chmod -R u+w '{tmp_path}'")


def test_loads_change_nothing_on_disk(read_only_tree: Path) -> None:
    directory, parent = read_only_tree, read_only_tree.parent
    before = _listing(parent)
    assert _identify(directory) == "A"
    PeftConfig.from_pretrained(str(directory))
    PeftConfig.from_pretrained(str(directory), subfolder="extra")
    load_peft_weights(str(directory), device="cpu")
    load_peft_weights(str(directory / "extra"), device="cpu")
    assert _listing(parent) == before


def test_stale_stages_are_removed_by_the_next_save_only(tmp_path: Path) -> None:
    directory = tmp_path / "adapter"
    save_pretrained(_model("A"), directory)
    ready = FORK.Event()

    def hang(stage: str) -> None:
        atomic_save._peft_save()(_model("B"), stage)
        ready.set()
        time.sleep(60)

    child = FORK.Process(target=transactional_save, args=(str(directory), hang))
    child.start()
    assert ready.wait(30)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    killed = _stages(tmp_path)
    assert len(killed) == 1 and f"{STAGING_PREFIX}{child.pid}-" in killed[0]
    assert _identify(directory) == "A" and _stages(tmp_path) == killed  # loading leaves it
    sleeper = FORK.Process(target=time.sleep, args=(60,), daemon=True)
    sleeper.start()
    live = tmp_path / f".adapter{STAGING_PREFIX}{sleeper.pid}-abcd"
    live.mkdir()
    try:
        save_pretrained(_model("B"), directory)
        assert _stages(tmp_path) == [live.name] and _identify(directory) == "B"  # a running save's stage stays
    finally:
        sleeper.kill()
        sleeper.join()


# ---------------------------------------------------------------------------------------------- fallback
@pytest.mark.parametrize("why", ["no_exchange", "cwd"])
def test_per_file_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    directory = tmp_path / "adapter"
    save_pretrained(_model("A"), directory)
    _plant_trainer_files(directory)
    (directory / "adapter_model.bin").write_bytes(b"stale")
    flags, replaced = [], []
    real_renameat2, real_replace = atomic_save._renameat2, os.replace

    def renameat2(src: str, dst: str, flag: int) -> bool:
        flags.append(flag)
        return False if why == "no_exchange" else real_renameat2(src, dst, flag)

    def replace(src: Any, dst: Any) -> None:
        if not os.path.relpath(dst, directory).startswith(".."):  # (the card is replaced inside the stage)
            replaced.append(os.path.relpath(dst, directory))
        real_replace(src, dst)

    monkeypatch.setattr(atomic_save, "_renameat2", renameat2)
    monkeypatch.setattr(os, "replace", replace)
    if why == "cwd":
        monkeypatch.chdir(directory)
    inode = directory.stat().st_ino
    save_pretrained(_model("B"), directory)
    assert flags == ([2] if why == "no_exchange" else [])
    assert directory.stat().st_ino == inode  # the folder itself was never swapped
    configs = {"adapter_config.json", os.path.join("extra", "adapter_config.json")}
    assert set(replaced[-2:]) == configs  # configs last
    assert all("adapter_model" in r for r in replaced[:2]), replaced  # weights first
    assert _identify(directory) == "B" and not (directory / "adapter_model.bin").exists()
    _assert_trainer_files(directory)
    assert _stages(tmp_path) == [] and _stages(directory) == []


# ---------------------------------------------------------------------------------------------- API
def test_kwargs_reach_peft_and_peft_writes_into_the_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = atomic_save._peft_save()

    def spy(model: PeftModel, directory: str, **kwargs: Any) -> None:
        calls.append((directory, kwargs))
        real(model, directory, **kwargs)

    monkeypatch.setattr(atomic_save, "_peft_save", lambda: spy)
    kwargs = {"selected_adapters": ["default"], "safe_serialization": True, "save_embedding_layers": False}
    save_pretrained(_model("A"), tmp_path / "adapter", **kwargs)
    assert calls[0][1] == kwargs
    stage = Path(calls[0][0])  # same base name, in a hidden sibling of the folder
    assert stage.name == "adapter" and stage.parent.name.startswith(f".adapter{STAGING_PREFIX}{os.getpid()}-")
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_not_main_process_does_what_peft_does(tmp_path: Path) -> None:
    save_pretrained(_model("A"), tmp_path / "ours", is_main_process=False)
    _plain_save(_model("A"), tmp_path / "peft", is_main_process=False)
    assert _listing(tmp_path / "ours").keys() == _listing(tmp_path / "peft").keys()
    assert not list((tmp_path / "ours").rglob("*.json")) and _stages(tmp_path) == []


def test_pickle_format_replaces_safetensors(tmp_path: Path) -> None:
    save_pretrained(_model("A"), tmp_path)
    save_pretrained(_model("B"), tmp_path, safe_serialization=False)
    assert not list(tmp_path.rglob("*.safetensors")) and len(list(tmp_path.rglob("adapter_model.bin"))) == 2
    assert _identify(tmp_path) == "B"


def test_finds_peft_own_save_under_wrappers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrappers that route ``PeftModel.save_pretrained`` to this module must not make it recurse."""
    peft_own = atomic_save._peft_save()
    assert peft_own.__code__.co_filename.endswith(os.path.join("peft", "peft_model.py"))

    @functools.wraps(peft_own)
    def wrapped(self: PeftModel, directory: str, **kwargs: Any) -> None:
        bitfit_peft.save_pretrained(self, directory, **kwargs)

    def closure(original: Callable[..., None]) -> Callable[..., None]:
        def save_pretrained(self: PeftModel, directory: str, **kwargs: Any) -> None:
            original(self, directory, **kwargs)

        return save_pretrained

    monkeypatch.setattr(PeftModel, "save_pretrained", closure(wrapped))
    assert atomic_save._peft_save() is peft_own
    _model("A").save_pretrained(str(tmp_path))
    assert _identify(tmp_path) == "A"
