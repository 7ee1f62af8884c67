"""Shared helpers for the benchmark scripts (model shapes, timing, environment, JSON/table output)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from plot_tables import fmt  # one number format for console and markdown tables
from torch.utils._python_dispatch import TorchDispatchMode

REPO_ROOT = Path(__file__).resolve().parents[1]


def ensure_bitfit_importable() -> bool:
    """Make ``import bitfit_peft`` work from a source checkout; return whether it imports."""
    try:
        import bitfit_peft  # noqa: F401
    except ImportError:
        src = str(REPO_ROOT / "src")
        if src not in sys.path:
            sys.path.insert(0, src)
        try:
            import bitfit_peft  # noqa: F401
        except ImportError:
            return False
    return True


def log(*args: Any) -> None:
    """Print with flush (progress output must survive ``timeout`` kills)."""
    print(*args, flush=True)


# --------------------------------------------------------------------------------------------- shapes


@dataclass
class ModelSpec:
    """A randomly initialised model shape plus the batch used to exercise it."""

    name: str
    kind: str  # "bert_cls" | "qwen2_lm"
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    batch: int
    seq: int
    kv_heads: int | None = None
    num_labels: int = 2

    @property
    def task_type(self) -> str:
        return "SEQ_CLS" if self.kind == "bert_cls" else "CAUSAL_LM"


CPU_BERT = ModelSpec("bert-small-cls", "bert_cls", 256, 4, 4, 1024, 8192, batch=8, seq=64)
CPU_QWEN = ModelSpec("qwen2-tiny-lm", "qwen2_lm", 256, 4, 4, 704, 8192, batch=4, seq=64, kv_heads=2)
GPU_BERT_LARGE = ModelSpec("bert-large-cls", "bert_cls", 1024, 24, 16, 4096, 30522, batch=32, seq=128)
GPU_BERT_BASE = ModelSpec("bert-base-cls", "bert_cls", 768, 12, 12, 3072, 30522, batch=64, seq=128)
GPU_QWEN_05B = ModelSpec("qwen2-0.5b-lm", "qwen2_lm", 896, 24, 14, 4864, 151936, batch=8, seq=512, kv_heads=2)


def build_model(spec: ModelSpec, device: torch.device | str = "cpu", seed: int = 0) -> torch.nn.Module:
    """Build a randomly initialised fp32 model for ``spec`` directly on ``device`` (no Hub access)."""
    from transformers import BertConfig, BertForSequenceClassification, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if spec.kind == "bert_cls":
        cfg = BertConfig(
            vocab_size=spec.vocab,
            hidden_size=spec.hidden,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            intermediate_size=spec.intermediate,
            max_position_embeddings=max(512, spec.seq),
            num_labels=spec.num_labels,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        cls: Any = BertForSequenceClassification
    elif spec.kind == "qwen2_lm":
        cfg = Qwen2Config(
            vocab_size=spec.vocab,
            hidden_size=spec.hidden,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads or spec.heads,
            intermediate_size=spec.intermediate,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        cls = Qwen2ForCausalLM
    else:  # pragma: no cover - guarded by the spec constants
        raise ValueError(spec.kind)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = cls(cfg)
    return model.to(device=device, dtype=torch.float32)


def make_batch(spec: ModelSpec, device: torch.device | str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token batch (with labels) for ``spec``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, spec.vocab, (spec.batch, spec.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if spec.kind == "bert_cls":
        batch["labels"] = torch.randint(0, spec.num_labels, (spec.batch,), generator=g)
    else:
        batch["labels"] = ids.clone()
    return {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_warmup(device: torch.device) -> None:
    """Initialise cuBLAS/cuDNN handles and workspaces (fp32 and bf16, fwd+bwd) so no mode pays for them."""
    if device.type != "cuda":
        return
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(256, 256, device=device, dtype=dtype, requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            (a @ a).float().sum().backward()
    sync(device)


def autocast_ctx(device: torch.device, enabled: bool) -> Any:
    """bf16 autocast on ``device`` (CUDA or CPU) when ``enabled``; a null context otherwise."""
    if enabled:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def time_call(fn: Callable[[], Any], device: torch.device, iters: int = 1) -> float:
    """Seconds per call of ``fn`` averaged over ``iters`` back-to-back calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def median(xs: Iterable[float]) -> float:
    vals = list(xs)
    return statistics.median(vals) if vals else float("nan")


def interleaved_timing(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    rounds: int,
    iters: int,
    warmup: int = 1,
    budget_s: float | None = None,
    min_rounds: int = 2,
    errors: dict[str, str] | None = None,
    on_round: Callable[[dict[str, list[float]]], None] | None = None,
) -> dict[str, list[float]]:
    """Round-robin timing: each round times every fn (``iters`` calls), rotating the order per round.

    Stops early after ``min_rounds`` once ``budget_s`` seconds have elapsed. Returns per-round
    seconds-per-call lists keyed like ``fns``. A fn that raises is dropped and its error stored in
    ``errors`` (the other fns keep going). ``on_round`` gets the partial results after every round (to write
    partial JSON that survives a timeout).
    """
    errors = {} if errors is None else errors
    live = list(fns)

    def attempt(name: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as e:  # e.g. OOM or an unsupported pattern
            errors[name] = f"{type(e).__name__}: {e}"
            log(f"  {name} failed: {errors[name][:200]}")
            live.remove(name)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    for name in list(live):
        attempt(name, lambda n=name: [fns[n]() for _ in range(warmup)])
    sync(device)
    out: dict[str, list[float]] = {n: [] for n in live}
    t_start = time.perf_counter()
    for r in range(rounds):
        names = list(live)
        if not names:
            break
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t = attempt(name, lambda n=name: time_call(fns[n], device, iters))
            if t is not None:
                out[name].append(t)
        if on_round is not None:
            on_round({n: ts for n, ts in out.items() if n in live and ts})
        if budget_s is not None and r + 1 >= min_rounds and time.perf_counter() - t_start > budget_s:
            log(f"  time budget reached after {r + 1} rounds")
            break
    return {n: ts for n, ts in out.items() if n in live and ts}


class CountOps(TorchDispatchMode):
    """Counts every aten op dispatched while active (exact and device independent; on a GPU each is a launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------------------------- env / output


def pick_device(gpu: bool) -> torch.device:
    """CUDA device when ``gpu`` (erroring if unavailable), else CPU."""
    if gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu given but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")


def env_info(device: torch.device) -> dict[str, Any]:
    """Device and library versions for the JSON header."""
    import peft
    import transformers

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device_type": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    try:
        from importlib.metadata import version

        info["bitfit_peft"] = version("bitfit-peft")
    except Exception:
        try:
            import bitfit_peft

            info["bitfit_peft"] = getattr(bitfit_peft, "__version__", "src")
        except Exception:
            info["bitfit_peft"] = None
    return info


def write_json(path: str | os.PathLike[str] | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` as pretty JSON (atomic replace) if ``path`` is given."""
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default))
    tmp.replace(p)


def _json_default(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    return str(o)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain fixed-width table."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def make_adamw(params: list[torch.nn.Parameter], lr: float = 1e-4) -> torch.optim.Optimizer:
    """AdamW, fused where supported, else foreach."""
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, foreach=True)


#: a callback that rewrites a benchmark's JSON with what it has so far
Flush = Callable[[], None]


def summarize(
    times: dict[str, list[float]], unit_scale: float, label: str, ref2: str | None = None, quiet: bool = False
) -> dict[str, Any]:
    """Median per pattern, ratio to ``base`` and (with ``ref2``) ``ratio_compiled`` to pattern ``ref2``."""
    ref = median(times["base"]) if times.get("base") else float("nan")
    ref2_t = median(times[ref2]) if ref2 and times.get(ref2) else float("nan")
    res = {}
    rows = []
    for name, ts in times.items():
        med = median(ts)
        entry: dict[str, Any] = {label: med * unit_scale, "rounds": [t * unit_scale for t in ts], "ratio": med / ref}
        row: list[Any] = [name, med * unit_scale, med / ref]
        if ref2:
            entry["ratio_compiled"] = med / ref2_t
            row.append(med / ref2_t)
        res[name] = entry
        rows.append(row)
    if not quiet:
        log(format_table(["pattern", label, "x base"] + ([f"x {ref2}"] if ref2 else []), rows))
    return res
