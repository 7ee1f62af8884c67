"""Settings of the accuracy benchmark: methods, LR grids and the reduced / full / smoke settings."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.accuracy.data import DATASETS  # noqa: E402

from bitfit_peft.training.recipe import RECIPE, Recipe  # noqa: E402

METHODS: tuple[str, ...] = ("full", "bitfit", "bitfit_qi", "lora_r8", "beft")  #: the full / smoke settings' methods
#: a further method of the reduced / gpu_recipe settings: BitFit with the uniform [CLS] init (``cls_init`` schedule)
CLS_METHOD = "bitfit_cls"


def feature_probe_path(setting: str) -> Path:
    """Where ``feature_probe.py`` records its probes for a setting (read by the report's defaults row)."""
    return REPO / "benchmarks" / "accuracy" / "results" / f"cpu_{setting}_feature_probe.json"


#: not trained: the default recipe's ``--cls-init auto`` read off the suite, per task ``CLS_METHOD``'s runs where the
#: frozen-model probe (``feature_probe.py``'s results, the product's rule) turns the init on, else ``bitfit``'s
AUTO_METHOD = "bitfit_auto"
METHOD_LABELS = {
    "full": "Full FT",
    "bitfit": "BitFit (all biases)",
    "bitfit_qi": "BitFit (q + intermediate)",
    CLS_METHOD: "BitFit, uniform [CLS] init",
    AUTO_METHOD: "BitFit, defaults (--cls-init auto)",
    "lora_r8": "LoRA r=8 (q,v)",
    "beft": "BEFT (PEFT, value bias)",
}
METHOD_COLORS = {
    "full": "#1f77b4", "bitfit": "#ff7f0e", "bitfit_qi": "#2ca02c", CLS_METHOD: "#8c564b", "lora_r8": "#d62728",
    "beft": "#9467bd",
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
    #: recipe methods -> overrides of the recipe (e.g. full FT trains its head at its own LR: head factor 1)
    recipe_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: widen each method's LR grid (x2 up / /3 down, at most twice each way) while dev selects an end of it
    extend_grid: bool = False


#: Full fine-tuning's protocol in the reduced setting: the recipe machinery (linear schedule with warm-up, dev
#: evaluation each epoch, best epoch restored) with the usual full-FT choices: head at the same LR, 8 planned
#: epochs, early stopping with patience 3. Its LR comes from the setting's grid.
FULL_FT_PROTOCOL = Recipe(
    learning_rate=1.5e-4, head_lr_factor=1.0, lr_scheduler_type="linear", warmup_ratio=0.1, num_epochs=8.0,
    early_stopping_patience=3,
)  # fmt: skip
#: The product's recipe before issue 15 (the "before" of the before/after comparison in ``docs/accuracy.md``).
RECIPE_V0 = Recipe(
    learning_rate=1e-3, head_lr_factor=3.0, lr_scheduler_type="linear", warmup_ratio=0.0, num_epochs=3.0,
    early_stopping_patience=2,
)  # fmt: skip

KEPT_EPOCH = "best" if RECIPE.restore_best_epoch else "last"  #: which epoch the recipe's runs end with

GRID_FULL = {
    "full": (2e-5, 5e-5, 1e-4),
    "bitfit": (1e-3, 3e-3, 1e-2),
    "bitfit_qi": (1e-3, 3e-3, 1e-2),
    CLS_METHOD: (1e-3, 3e-3, 1e-2),
    "lora_r8": (3e-4, 1e-3, 3e-3),
    "beft": (1e-3, 1e-2, 3e-2),
}
#: one higher LR per method, for ``--extend`` (the first full run picked the top of GRID_FULL for most cells)
GRID_EXTEND = {
    "full": (2e-4,), "bitfit": (3e-2,), "bitfit_qi": (3e-2,), CLS_METHOD: (3e-2,), "lora_r8": (1e-2,), "beft": (1e-1,)
}  # fmt: skip
GRID_REDUCED = {
    "full": (5e-5, 1.5e-4),
    "bitfit": (RECIPE.learning_rate,),  # the default recipe, untuned
    "bitfit_qi": (3e-3, 1e-2),
    CLS_METHOD: (RECIPE.learning_rate,),
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
        methods=("full", "bitfit", CLS_METHOD, "lora_r8", "beft"),
        # full FT: FULL_FT_PROTOCOL at an LR dev-selected from a grid widened until it is inside; BitFit, LoRA and
        # BEFT: the default recipe; bitfit_cls: the recipe plus the uniform [CLS] init (train(cls_attention_init=True))
        recipe_methods=("full", "bitfit", CLS_METHOD, "lora_r8", "beft"),
        recipe_overrides={"full": {"recipe": FULL_FT_PROTOCOL}, CLS_METHOD: {"cls_init": True}},
        extend_grid=True,
        equal_wall=("lora_r8", "beft"),
        # LoRA / BEFT at their LR dev-selected in the run before, one seed each (2 CPU cores)
        grid_override={"full": (5e-5, 1.5e-4, 3e-4), "lora_r8": (3e-3,), "beft": (3e-2,)},
        seeds_override={"lora_r8": 1, "beft": 1},
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
        sweep_methods=("bitfit", CLS_METHOD, "full"),  # the defaults' auto turns the init on for both tasks
        sweep_sizes=(100, 200, 400),
        sweep_seeds=2,
        sweep_grid=False,
        notes=(
            "train subsampled to 400/task, dev 200, test 400 (stratified, fixed seed); batch 16; 2 seeds. "
            "Full FT: linear schedule, warm-up 0.1, 8 planned epochs, dev evaluation each epoch, patience 3, best "
            "epoch restored, head at the same LR; LR dev-selected per task from {5e-5, 1.5e-4, 3e-4}, widened (x2 / "
            "÷3, up to twice) while dev picks an end. "
            f"BitFit: the default recipe, untuned (lr {RECIPE.learning_rate:g}, head x{RECIPE.head_lr_factor:g}, "
            f"{RECIPE.lr_scheduler_type}, warm-up {RECIPE.warmup_ratio:g}, {RECIPE.num_epochs:g} epochs, dev "
            f"evaluation each epoch, early stopping {RECIPE.early_stopping_patience or 'off'}, {KEPT_EPOCH} epoch "
            "kept); BitFit, uniform [CLS] init: the same with `--cls-init`. LoRA r8 and "
            "BEFT: the same recipe with BitFit's wall time per run (steps scaled by measured step times), at the "
            "LR dev-selected in the run before (3e-3, 3e-2), 1 seed. Sweep: BitFit (plain and with the [CLS] init; "
            "the defaults row takes the probe's pick at each size) and full FT at 100/200/400, 2 seeds, at the main "
            "table's LR"
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
# The reduced setting's protocol on all data (GPU): not run yet. Estimated ~90k optimizer steps at batch 32, about
# 1.3x the `full` setting's 72k steps that took 5.7 min on one H200 as six shards (gpu_full.sh).
SETTINGS["gpu_recipe"] = replace(
    SETTINGS["reduced"],
    name="gpu_recipe",
    tasks=DATASETS,
    grid_override={"full": (5e-5, 1e-4, 2e-4), "lora_r8": (3e-3,), "beft": (3e-2,)},
    seeds=3,
    train_cap=None,
    dev_cap=None,
    test_cap=None,
    batch_size=32,
    sweep_sizes=(100, 300, 1000, 3000, None),
    notes=(
        "all data, batch 32. Full FT: the reduced setting's protocol (8 planned epochs, dev each epoch, patience 3, "
        "best epoch restored), LR dev-selected from {5e-5, 1e-4, 2e-4} widened while dev picks an end, 3 seeds. "
        f"BitFit: the default recipe, untuned (lr {RECIPE.learning_rate:g}, head x{RECIPE.head_lr_factor:g}, "
        f"{RECIPE.num_epochs:g} epochs, {KEPT_EPOCH} epoch kept), 3 seeds. LoRA r8 / BEFT: the recipe at BitFit's wall "
        "time per run, 1 seed. Sweep: BitFit and full FT at 100 / 300 / 1000 / 3000 / all, 2 seeds, at the main "
        "table's LR"
    ),
)
