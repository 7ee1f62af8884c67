"""Multi-process training: 2 CPU ranks (gloo) with DDP / ``accelerate launch`` vs one process, same global batch.

Slow (3 interpreter start-ups per test); run with ``--runslow``. The training script is ``tests/ddp_train.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "ddp_train.py"
pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    src = str(HERE.parent / "src")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH", "")])),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _deltas(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("single")
    _run([sys.executable, str(SCRIPT), "--mode", "single", "--out", str(out)], out)
    deltas = _deltas(out / "rank0")
    assert max(v.abs().max().item() for k, v in deltas.items() if k.endswith(".bitfit_delta")) > 1e-3  # trained
    return deltas


def _check_ranks(out: Path, single: dict[str, torch.Tensor]) -> None:
    ranks = [_deltas(out / f"rank{r}") for r in range(2)]
    assert set(ranks[0]) == set(ranks[1]) == set(single)
    for key in single:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)  # identical on every rank
        torch.testing.assert_close(ranks[0][key], single[key], rtol=0, atol=1e-5)


def test_torchrun_ddp_matches_single_process(single: dict[str, torch.Tensor], tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*cmd, str(SCRIPT), "--mode", "ddp", "--out", str(tmp_path)], tmp_path)
    _check_ranks(tmp_path, single)


def test_accelerate_launch_matches_single_process(single: dict[str, torch.Tensor], tmp_path: Path) -> None:
    # On one machine, MULTI_CPU launches through mpirun; the torchrun launcher (MULTI_GPU) plus
    # Accelerator(cpu=True) in the script gives 2 gloo CPU ranks without MPI.
    config = tmp_path / "accelerate.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\n"
        "distributed_type: MULTI_GPU\n"
        "num_processes: 2\nnum_machines: 1\nmachine_rank: 0\n"
        "main_process_ip: 127.0.0.1\n"
        f"main_process_port: {_free_port()}\n"
        "rdzv_backend: static\nsame_network: true\n"
        "mixed_precision: 'no'\nuse_cpu: false\ndowncast_bf16: 'no'\ndebug: false\n"
    )
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    _run([*launcher, str(SCRIPT), "--mode", "accelerate", "--out", str(tmp_path)], tmp_path)
    _check_ranks(tmp_path, single)
