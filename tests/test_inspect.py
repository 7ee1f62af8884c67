"""``bitfit_peft.bias_report`` and ``bitfit-peft inspect`` on a tiny random BERT with hand-set deltas."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import typer
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification
from typer.testing import CliRunner

import bitfit_peft
from bitfit_peft.bias_report import BiasChangeReport, bias_change_report, plot_bias_heatmap
from bitfit_peft.cli.report import register

H, FF = 8, 16  # hidden and intermediate (feed-forward) size
P = "bert.encoder.layer"


def _set(model: torch.nn.Module, path: str, values: torch.Tensor) -> None:
    layer = model.base_model.model.get_submodule(path)
    with torch.no_grad():
        layer.delta_of("default").copy_(values)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, torch.nn.Module, Path]:
    """(PeftModel with known deltas, untouched copy of its base, saved adapter dir)."""
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=FF,
        max_position_embeddings=16,
    )  # fmt: skip
    base = BertForSequenceClassification(cfg)
    with torch.no_grad():
        base.bert.encoder.layer[0].attention.self.query.bias.fill_(0.5)  # b0 for the relative change
    base_copy = copy.deepcopy(base)
    model = get_peft_model(base, bitfit_peft.BitFitConfig(task_type="SEQ_CLS"))
    _set(model, f"{P}.0.attention.self.query", torch.tensor([0.25, -0.25] * (H // 2)))
    _set(model, f"{P}.1.intermediate.dense", torch.tensor([0.5] * (FF // 2) + [0.0] * (FF // 2)))
    _set(model, f"{P}.0.attention.output.LayerNorm", torch.full((H,), 0.1))
    _set(model, f"{P}.0.output.LayerNorm", torch.full((H,), -0.3))
    _set(model, f"{P}.0.attention.self.value", torch.tensor([math.nan, math.inf] + [0.2] * (H - 2)))
    _set(model, "bert.pooler.dense", torch.full((H,), 1e-5))  # tiny: prunable at 1e-4, not at 1e-6
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(str(out))
    return model, base_copy, out


def _check_numbers(r: BiasChangeReport) -> None:
    assert r.n_vectors == 18  # 8 per block x 2 + embeddings LayerNorm + pooler
    assert r.n_params == 2 * (4 * H + 2 * H + FF + H) + H + H == 160
    assert r.nbytes == 160 * 4
    assert r.layers == [0, 1, None]
    assert r.kinds == ["query", "key", "value", "attention_output", "intermediate", "output", "layernorm", "other"]
    assert r.cell(0, "query") == pytest.approx(0.25)
    assert r.cell(1, "query") == 0.0
    assert r.cell(1, "intermediate") == pytest.approx(0.25)  # (8 * 0.5 + 8 * 0) / 16
    assert r.cell(0, "layernorm") == pytest.approx(0.2)  # two vectors: (8 * 0.1 + 8 * 0.3) / 16
    assert r.cell(0, "value") == pytest.approx(0.2)  # NaN and Inf left out of the mean
    assert r.cell(None, "other") == pytest.approx(1e-5)
    assert r.cell(None, "query") != r.cell(None, "query")  # NaN: no query bias outside the blocks
    assert (r.n_nan, r.n_inf) == (1, 1)
    assert r.nonfinite_vectors == [f"{P}.0.attention.self.value"]
    by_name = {v.name: v for v in r.vectors}
    q0 = by_name[f"{P}.0.attention.self.query"]
    assert (q0.layer, q0.kind, q0.numel, q0.max_abs) == (0, "query", H, 0.25)
    assert by_name[f"{P}.1.intermediate.dense"].max_abs == 0.5
    grid = r.grid()
    assert grid[r.kinds.index("intermediate")][1] == pytest.approx(0.25)
    total_abs = 8 * 0.25 + 8 * 0.5 + 8 * 0.1 + 8 * 0.3 + 6 * 0.2 + 8 * 1e-5
    assert r.mean_abs == pytest.approx(total_abs / (160 - 2))


def _prunable(r: BiasChangeReport) -> set[str]:
    return {v.name for v in r.prunable}


def test_report_from_loaded_model(adapted: tuple) -> None:
    model, _, _ = adapted
    r = bias_change_report(model, tolerance=1e-4)
    _check_numbers(r)
    # 18 vectors - 5 non-zero ones (q0, i1, two LN0, v0 with NaN); the 1e-5 pooler counts at 1e-4
    assert len(r.prunable) == 13 and "bert.pooler.dense" in _prunable(r)
    assert r.prunable_bytes == 13 * 0 + sum(v.nbytes for v in r.prunable)
    strict = bias_change_report(model, tolerance=1e-6)
    assert len(strict.prunable) == 12 and "bert.pooler.dense" not in _prunable(strict)
    q0 = next(v for v in r.vectors if v.name == f"{P}.0.attention.self.query")
    assert q0.rel_change == pytest.approx(0.25 / 0.5)


def test_report_from_adapter_dir_matches_model(adapted: tuple) -> None:
    model, base, out = adapted
    from_dir = bias_change_report(str(out), tolerance=1e-4)
    _check_numbers(from_dir)
    from_model = bias_change_report(model, tolerance=1e-4)
    assert _prunable(from_dir) == _prunable(from_model)
    assert [(v.name, v.kind, v.layer) for v in from_dir.vectors] == sorted(
        (v.name, v.kind, v.layer) for v in from_model.vectors
    )
    with_base = bias_change_report(str(out), base=base)
    q0 = next(v for v in with_base.vectors if v.name == f"{P}.0.attention.self.query")
    assert q0.rel_change == pytest.approx(0.5)
    assert from_dir.to_dict()["grid"][0][2] is None  # NaN -> null in JSON


def test_heatmap_png(adapted: tuple, tmp_path: Path) -> None:
    model, _, _ = adapted
    path = plot_bias_heatmap(bias_change_report(model), tmp_path / "sub" / "heat.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        bias_change_report(str(tmp_path))  # a directory without adapter_model.safetensors
    with pytest.raises(FileNotFoundError):
        bias_change_report(str(tmp_path / "does" / "not" / "exist"))
    with pytest.raises(ValueError):
        bias_change_report(str(tmp_path), tolerance=-1.0)
    with pytest.raises(ValueError, match="no BitFit deltas"):
        bias_change_report(torch.nn.Linear(2, 2))


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command()
    def noop() -> None:  # a second command so typer keeps "inspect" as a sub-command
        pass

    return app


def test_cli_local_dir(adapted: tuple, tmp_path: Path) -> None:
    _, _, out = adapted
    png, js = tmp_path / "h.png", tmp_path / "r.json"
    res = CliRunner().invoke(
        _app(), ["inspect", str(out), "--plot", str(png), "--tolerance", "1e-4", "--json", str(js)]
    )
    assert res.exit_code == 0, res.output
    assert "intermediate" in res.output and "2.50e-01" in res.output
    assert "1 / 1" in res.output  # NaN / Inf counts
    assert "13 vector(s)" in res.output
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert '"n_vectors": 18' in js.read_text()


def test_cli_hub_id_uses_snapshot_download(adapted: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, out = adapted
    calls = []

    def fake_snapshot_download(repo_id: str, revision: str | None = None, allow_patterns: list | None = None):
        calls.append((repo_id, revision, tuple(allow_patterns or ())))
        return str(out)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    res = CliRunner().invoke(_app(), ["inspect", "someone/bitfit-adapter", "--revision", "v1"])
    assert res.exit_code == 0, res.output
    assert calls == [("someone/bitfit-adapter", "v1", ("adapter_config.json", "adapter_model.safetensors"))]


def test_cli_error_exit_code(tmp_path: Path) -> None:
    res = CliRunner().invoke(_app(), ["inspect", str(tmp_path)])
    assert res.exit_code == 2
    assert "adapter_model.safetensors" in res.output.replace("\n", "")


def test_registered_on_main_app(adapted: tuple) -> None:
    cli = pytest.importorskip("bitfit_peft.cli")
    names = {c.name or c.callback.__name__ for c in cli.app.registered_commands}
    if "inspect" not in names:
        pytest.skip("inspect not registered on bitfit_peft.cli.app yet")
    _, _, out = adapted
    res = CliRunner().invoke(cli.app, ["inspect", str(out)])
    assert res.exit_code == 0, res.output


def test_prunable_matches_core_prune_tolerance(adapted: tuple, tmp_path: Path) -> None:
    """What the report calls prunable is exactly what a save with ``prune_tolerance`` leaves out."""
    model, _, _ = adapted
    cfg = model.peft_config["default"]
    if not hasattr(cfg, "prune_tolerance"):
        pytest.skip("core has no prune_tolerance")
    cfg.prune_tolerance = 1e-4
    try:
        model.save_pretrained(str(tmp_path))
    finally:
        cfg.prune_tolerance = None
    kept = {v.name for v in bias_change_report(str(tmp_path)).vectors}
    expected = {v.name for v in bias_change_report(model, tolerance=1e-4).vectors} - _prunable(
        bias_change_report(model, tolerance=1e-4)
    )
    assert kept == expected
