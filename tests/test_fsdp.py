"""Sharded training: 2 CPU ranks (gloo) with FSDP2 (fp32 and bf16 bases), FSDP1 and DeepSpeed ZeRO-2/3 vs one
process, same global batch.

The multi-process tests are slow (one interpreter start-up per rank per test); run them with ``--runslow``. The
training script is ``tests/fsdp_train.py``; rank 0 saves through :func:`bitfit_peft.training.save_sharded_adapter`,
and the folder must load with ``PeftModel.from_pretrained`` (strict BitFit checks) and hold the single-process
deltas.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_train import tiny_base
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from test_ddp import _env as ddp_env
from transformers import AutoModelForSequenceClassification

import bitfit_peft  # noqa: F401  (registers the BITFIT PEFT type)

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "fsdp_train.py"
CONFIGS = HERE.parent / "docs" / "accelerate_configs"
slow = pytest.mark.slow
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env() -> dict[str, str]:
    return {**ddp_env(), "DS_ACCELERATOR": "cpu"}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _ok(cmd: list[str], cwd: Path) -> None:
    proc = _run(cmd, cwd)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _saved(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("single")
    _ok([sys.executable, str(SCRIPT), "--mode", "single", "--out", str(out)], out)
    deltas = _saved(out)
    assert max(v.abs().max().item() for k, v in deltas.items() if k.endswith(".bitfit_delta")) > 1e-3  # trained
    return deltas


def _check(out: Path, single: dict[str, torch.Tensor]) -> None:
    """Rank 0's adapter equals single-process training and loads like any adapter."""
    saved = _saved(out)
    assert set(saved) == set(single)
    for key in single:
        torch.testing.assert_close(saved[key], single[key], rtol=0, atol=1e-5)
    loaded = PeftModel.from_pretrained(tiny_base(), out / "adapter")  # strict checks: keys, shapes, base fingerprint
    reloaded = get_peft_model_state_dict(loaded)
    assert set(reloaded) == set(single)
    for key, value in single.items():
        torch.testing.assert_close(reloaded[key], value, rtol=0, atol=1e-5)


def _memory(out: Path) -> list[dict[str, int]]:
    return [json.loads((out / f"memory{r}.json").read_text()) for r in range(2)]


@slow
@pytest.mark.parametrize("mode", ["fsdp2", "fsdp2-plain"])
def test_fsdp2_matches_single_process(mode: str, single: dict[str, torch.Tensor], tmp_path: Path) -> None:
    _ok([*TORCHRUN, str(SCRIPT), "--mode", mode, "--memory", "--out", str(tmp_path)], tmp_path)
    _check(tmp_path, single)
    for counts in _memory(tmp_path):  # per-parameter sharding: gradients for the trainable shards only
        assert counts["grad_numel"] == counts["trainable_numel"] < counts["param_numel"] // 10


@slow
def test_fsdp2_bf16_base_beside_fp32_deltas(tmp_path: Path) -> None:
    """The mixed-dtype case: a bf16 base, fp32 deltas. torch's per-block recipe puts both in one unit, which FSDP2
    refuses; ``shard_bitfit_model`` keeps them apart, and its result equals, bit for bit, one process that runs the
    two ranks' slices of each batch in turn (same shapes, so the same bf16 arithmetic). The deltas stay fp32 and
    the adapter loads onto a bf16 base."""
    bf16 = ["--bf16-base", "--out"]
    _ok([sys.executable, str(SCRIPT), "--mode", "single", "--accumulate", "2", *bf16, str(tmp_path / "one")], tmp_path)
    _ok([*TORCHRUN, str(SCRIPT), "--mode", "fsdp2", *bf16, str(tmp_path / "fsdp2")], tmp_path)
    plain = _run([*TORCHRUN, str(SCRIPT), "--mode", "fsdp2-plain", *bf16, str(tmp_path / "plain")], tmp_path)
    assert plain.returncode != 0 and "FSDP expects uniform original parameter dtype" in plain.stderr + plain.stdout
    one, sharded = _saved(tmp_path / "one"), _saved(tmp_path / "fsdp2")
    deltas = [k for k in one if k.endswith(".bitfit_delta")]
    assert deltas and {one[k].dtype for k in deltas} == {sharded[k].dtype for k in deltas} == {torch.float32}
    assert max(one[k].abs().max().item() for k in deltas) > 1e-3  # trained
    assert set(sharded) == set(one) and all(torch.equal(sharded[k], one[k]) for k in one)
    loaded = PeftModel.from_pretrained(tiny_base(torch.bfloat16), tmp_path / "fsdp2" / "adapter")  # strict checks
    state = get_peft_model_state_dict(loaded)
    assert all(torch.equal(state[k], one[k]) for k in deltas)


@slow
def test_fsdp1_orig_params_matches_single_process(single: dict[str, torch.Tensor], tmp_path: Path) -> None:
    _ok([*TORCHRUN, str(SCRIPT), "--mode", "fsdp1", "--memory", "--out", str(tmp_path)], tmp_path)
    _check(tmp_path, single)
    for counts in _memory(tmp_path):  # use_orig_params' cost: a gradient for every slot of the rank's flat shard
        assert counts["flat_grad_numel"] == counts["flat_shard_numel"] == counts["param_numel"]
        assert counts["trainable_numel"] < counts["param_numel"] // 10


@slow
def test_fsdp1_flat_params_are_refused(tmp_path: Path) -> None:
    proc = _run([*TORCHRUN, str(SCRIPT), "--mode", "fsdp1-flat", "--out", str(tmp_path)], tmp_path)
    assert proc.returncode != 0
    assert "FSDP1 with use_orig_params=False flattened the BitFit deltas" in proc.stderr + proc.stdout
    assert not (tmp_path / "adapter").exists()


@slow
@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_deepspeed_matches_single_process(
    stage: int, single: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    pytest.importorskip("deepspeed")
    config = CONFIGS / f"deepspeed_zero{stage}.yaml"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    launcher += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port())]
    _ok([*launcher, str(SCRIPT), "--mode", "accelerate", "--out", str(tmp_path)], tmp_path)
    _check(tmp_path, single)


@slow
def test_cli_train_under_accelerate_launch(tmp_path: Path) -> None:
    from conftest import save_tiny_model
    from test_cli_train import _spam_rows, _write_csv

    model = save_tiny_model(tmp_path / "bert", "bert", task="base")
    data = _write_csv(tmp_path / "spam.csv", _spam_rows())
    config = tmp_path / "ddp.yaml"  # the torchrun launcher; train() runs gloo DDP on CPU ranks
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\nnum_machines: 1\n"
        f"machine_rank: 0\nmain_process_ip: 127.0.0.1\nmain_process_port: {_free_port()}\nrdzv_backend: static\n"
        "same_network: true\nmixed_precision: 'no'\nuse_cpu: false\n"
    )
    out = tmp_path / "adapter"
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "-m",
        "bitfit_peft.cli",
    ]
    args = ["train", "-m", str(model), "-d", str(data), "-o", str(out), "--epochs", "1", "--batch-size", "8"]
    proc = _run([*launcher, *args, "--max-length", "24", "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("BitFit result") == 1  # rank 0 reports
    summary = json.loads((out / "bitfit_training.json").read_text())
    assert summary["result"]["epochs_run"] == 1.0
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2)
    loaded = PeftModel.from_pretrained(base, out)  # strict checks
    assert any("bitfit_delta" in n for n, _ in loaded.named_parameters())


def test_helpers_refuse_bad_input() -> None:
    from bitfit_peft.training import block_classes, save_sharded_adapter, shard_bitfit_model

    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no BitFit layers"):
        shard_bitfit_model(plain)
    with pytest.raises(ValueError, match="has no _no_split_modules"):
        block_classes(plain)
    with pytest.raises(ValueError, match="None of the block classes"):
        block_classes(plain, ["BertLayer"])
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        save_sharded_adapter(plain, "unused")
