"""Settings of the accuracy benchmark: methods, LR grids and the reduced / full / smoke settings."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.accuracy.data import DATASETS  # noqa: E402

from bitfit_peft.training.recipe import RECIPE  # noqa: E402

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
    #: trained with :func:`recipe_schedule` (BitFit's default recipe: head LR factor, epochs, dev early stopping)
    recipe_methods: tuple[str, ...] = ()
    #: recipe methods whose step budget is scaled to BitFit's wall time per run (measured step times per task)
    equal_wall: tuple[str, ...] = ()
    #: methods -> LR grid overriding ``lr_grid`` and seeds overriding ``seeds`` (a CPU run that must stay short)
    grid_override: dict[str, tuple[float, ...]] = field(default_factory=dict)
    seeds_override: dict[str, int] = field(default_factory=dict)


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
    "bitfit": (RECIPE.learning_rate,),  # the default recipe, untuned
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
        methods=("full", "bitfit", "lora_r8", "beft"),
        recipe_methods=("bitfit", "lora_r8", "beft"),
        equal_wall=("lora_r8", "beft"),
        # 2 shared CPU cores: full FT at the LR dev-selected from {5e-5, 1.5e-4} in every task of the run before
        # (CPU runs reproduce exactly), LoRA / BEFT at their LR dev-selected there, one seed each
        grid_override={"full": (1.5e-4,), "lora_r8": (3e-3,), "beft": (3e-2,)},
        seeds_override={"full": 1, "lora_r8": 1, "beft": 1},  # full FT seed 1: from the run before
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
        sweep_methods=("bitfit",),  # full FT sweep points: the run before (same protocol, deterministic)
        sweep_sizes=(100, 200, 400),
        sweep_seeds=2,
        sweep_grid=False,
        notes=(
            "train subsampled to 400/task, dev 200, test 400 (stratified, fixed seed); batch 16; 2 seeds. "
            "Full FT: 2 epochs = 50 steps (sweep: 30 steps), lr 1.5e-4 (dev-selected from {5e-5, 1.5e-4} in the "
            "run before, every task). "
            f"BitFit: the default recipe, untuned (lr {RECIPE.learning_rate:g}, head x{RECIPE.head_lr_factor:g}, "
            f"{RECIPE.lr_scheduler_type}, warm-up {RECIPE.warmup_ratio:g}, {RECIPE.num_epochs:g} epochs, dev "
            f"evaluation each epoch, patience {RECIPE.early_stopping_patience}, best epoch restored). LoRA r8 and "
            "BEFT: the same recipe with BitFit's wall time per run (steps scaled by measured step times), at the "
            "LR dev-selected in the run before (3e-3, 3e-2), 1 seed. Sweep: BitFit at 100/200/400, 2 seeds; full "
            "FT sweep points from the run before"
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
        recipe_methods=("bitfit", "bitfit_qi", "lora_r8", "beft"),
        equal_wall=("lora_r8", "beft"),
    ),
}
