"""Start BitFit from "the first token attends uniformly": a data-dependent init of one query-bias delta.

``*ForSequenceClassification`` heads of BERT-style encoders read the first token (``[CLS]`` / ``<s>``), but
sentence encoders trained for mean pooling (all-MiniLM and most sentence-transformers checkpoints) barely use it:
a linear probe of MiniLM-L6's ``[CLS]`` state scores 44 % on trec where the mean-pooled state scores 75 %. Bias
shifts route the sentence into that token only slowly. :func:`initialize_cls_attention` sets the query-bias delta
of the last layer so that the first token's mean query over some training batches is zero: its attention is then
uniform over the sentence, so training starts from (nearly) a mean-pooled sentence vector. The base weights are
untouched and the delta stays trainable, so the adapter file and everything downstream are unchanged.

It helps where the first token serves the task badly and costs a little where it serves it well, so
``cls_attention_init="auto"`` (:func:`auto_cls_init`, the default of :func:`~bitfit_peft.training.train`) first fits
two linear probes on the frozen model (:func:`probe_first_token`) and turns the init on only where the mean-pooled
state beats the first token's by more than :data:`AUTO_MIN_GAP` dev points, with at least :data:`AUTO_MIN_DEV` dev
examples. The accuracy suite's figures for the init and the threshold are in ``docs/accuracy.md``.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from peft import get_peft_model
    >>> from bitfit_peft import BitFitConfig
    >>> cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    ...                  intermediate_size=32)
    >>> model = get_peft_model(BertForSequenceClassification(cfg), BitFitConfig(task_type="SEQ_CLS"))
    >>> initialize_cls_attention(model, [{"input_ids": torch.randint(0, 50, (4, 7))}])
    'base_model.model.bert.encoder.layer.1.attention.self.query'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from bitfit_peft.errors import BitFitError
from bitfit_peft.tuner.layer import BitFitLayer, layers_holding

#: Model types whose sequence-classification head reads the first token and whose attention scores are plain
#: ``q . k`` (a zero query gives uniform attention). DeBERTa's relative-position terms and decoder-only models
#: (their heads read the last token) do not qualify.
FIRST_TOKEN_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "data2vec-text", "megatron-bert", "distilbert"}
)
_QUERY = re.compile(r"\.(\d+)\.attention\.(?:self\.query|q_lin)$")
_NOT_INPUTS = ("labels", "label")


def last_query_layer(model: nn.Module, adapter_name: str = "default") -> tuple[str, BitFitLayer]:
    """``(name, layer)`` of the last encoder layer's query projection holding a BitFit delta of ``adapter_name``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FIRST_TOKEN_MODEL_TYPES:
        raise BitFitError(
            f"cls_attention_init needs an encoder whose head reads the first token "
            f"({', '.join(sorted(FIRST_TOKEN_MODEL_TYPES))}); got model_type {model_type!r}: train without it"
        )
    found = [(int(m.group(1)), name, layer) for name, layer in layers_holding(model, adapter_name).items()
             if (m := _QUERY.search(name))]  # fmt: skip
    if not found:
        raise BitFitError(
            f"cls_attention_init: adapter {adapter_name!r} has no query-bias delta; "
            "include 'query' in bias_terms or train without it"
        )
    _, name, layer = max(found, key=lambda t: t[0])
    if layer.merged:
        raise BitFitError(f"cls_attention_init: {name} has a merged adapter; call unmerge_adapter() first")
    return name, layer


def _input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its input embeddings' device (CPU when they are offloaded: Accelerate's hooks
    move inputs to the execution device of every module they guard)."""
    get = getattr(model, "get_input_embeddings", None)
    weight = getattr(get() if get else None, "weight", None)
    return weight.device if weight is not None and weight.device.type != "meta" else torch.device("cpu")


def _model_inputs(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k not in _NOT_INPUTS}


@torch.no_grad()
def initialize_cls_attention(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], adapter_name: str = "default", max_examples: int = 2048
) -> str:
    """Set the last layer's query-bias delta so that the mean first-token query over ``batches`` is zero.

    Args:
        model: a PEFT model with a BitFit adapter ``adapter_name`` on a supported encoder
            (:data:`FIRST_TOKEN_MODEL_TYPES`); its modules may be spread or offloaded by a ``device_map``.
        batches: model inputs (``input_ids``, ``attention_mask``, ...; labels are ignored), e.g. training batches.
        adapter_name: the adapter whose delta is set (it must be the active one).
        max_examples: stop after this many examples (the mean settles long before).

    Returns:
        The name of the query module whose delta was set. On any error the model is left unchanged.
    """
    name, layer = last_query_layer(model, adapter_name)
    if not max_examples > 0:
        raise BitFitError(f"max_examples must be > 0, got {max_examples}")
    seen: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["input"]
        seen.append(x[:, 0].detach())

    device = _input_device(model)
    was_training = model.training
    hook = layer.register_forward_pre_hook(grab, with_kwargs=True)
    model.eval()
    try:
        count = 0
        for batch in batches:
            model(**_model_inputs(batch, device))
            count += len(seen[-1])
            if count >= max_examples:
                break
    finally:
        hook.remove()
        model.train(was_training)
    if not seen:
        raise BitFitError("cls_attention_init: no batches given; pass some training batches")
    mean_first = torch.cat([s.float().cpu() for s in seen])[:max_examples].mean(0)
    base = layer.get_base_layer()
    if base.weight.device.type == "meta":  # offloaded: Accelerate's hook loads the weight for the layer's own forward
        target = -base(mean_first[None].to(device=seen[0].device, dtype=seen[0].dtype))[0].float()
    else:  # in fp32 whatever the base dtype
        target = -(base.weight.float() @ mean_first.to(base.weight.device))
        original = layer.original_bias()
        if original is not None:
            target = target - original.float().to(target.device)
    delta = layer.delta_of(adapter_name)
    if not torch.isfinite(target).all():
        raise BitFitError("cls_attention_init: the first token's states are not finite; check the inputs")
    delta.copy_(target.to(device=delta.device, dtype=delta.dtype))
    return name


# ---------------------------------------------------------------------------------- cls_attention_init="auto"
#: ``cls_attention_init="auto"`` turns the init on when a linear probe of the mean-pooled last hidden state beats
#: one of the first token's by more than this many points of dev accuracy (accuracy suite, MiniLM-L6: trec 31 and
#: movie 13 -> on; bbc 2.5 and sms 0.5 -> off; see ``docs/accuracy.md``).
AUTO_MIN_GAP = 5.0
#: ... and only with at least this many dev examples (on fewer, 5 points is a handful of examples: it stays off).
AUTO_MIN_DEV = 100
PROBE_L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)  #: L2 strengths tried per probe; the best dev accuracy counts


@dataclass(frozen=True)
class FirstTokenProbe:
    """Dev accuracy (%) of linear probes on the frozen model's last hidden state, fitted on training examples."""

    first_token: float  #: on the first token's state (what the classification head reads)
    mean_pooled: float  #: on the mean over the tokens
    num_train: int
    num_dev: int

    @property
    def enable(self) -> bool:
        """Whether ``cls_attention_init="auto"`` turns the init on."""
        return self.num_dev >= AUTO_MIN_DEV and self.mean_pooled - self.first_token > AUTO_MIN_GAP


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, x_dev: torch.Tensor, y_dev: torch.Tensor, l2: float) -> float:
    """Dev accuracy (%) of a logistic regression (L-BFGS, standardised features, L2 penalty ``l2``) fitted on ``x``."""
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z, z_dev = (x - mu) / sd, (x_dev - mu) / sd
    lin = nn.Linear(x.shape[1], int(max(y.max(), y_dev.max())) + 1)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(z), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return 100 * float((lin(z_dev).argmax(-1) == y_dev).float().mean())


@torch.no_grad()
def frozen_features(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], max_examples: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first-token states, mean-pooled states, labels) of the model's last hidden layer, in fp32 on the CPU."""
    device = _input_device(model)
    first, mean, labels = [], [], []
    was_training = model.training
    model.eval()
    try:
        count = 0
        for batch in batches:
            label = batch.get("labels", batch.get("label"))
            if label is None or label.is_floating_point():
                raise BitFitError("cls_attention_init='auto' needs integer class labels in the batches")
            hidden = model(**_model_inputs(batch, device), output_hidden_states=True).hidden_states[-1].float().cpu()
            mask = batch.get("attention_mask", torch.ones(hidden.shape[:2])).cpu().unsqueeze(-1).float()
            first.append(hidden[:, 0])
            mean.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
            labels.append(label.cpu().long())
            count += len(label)
            if count >= max_examples:
                break
    finally:
        model.train(was_training)
    if not labels:
        raise BitFitError("cls_attention_init='auto': no batches given; pass training and dev batches")
    return torch.cat(first)[:max_examples], torch.cat(mean)[:max_examples], torch.cat(labels)[:max_examples]


def probe_first_token(
    model: nn.Module,
    train_batches: Iterable[Mapping[str, Any]],
    dev_batches: Iterable[Mapping[str, Any]],
    max_examples: int = 2048,
) -> FirstTokenProbe:
    """Fit the two probes of :class:`FirstTokenProbe` on up to ``max_examples`` training and dev examples each.

    The model is only run (in eval mode, no gradients); nothing in it changes, and the probes start from zero
    weights, so the result does not depend on the random state.
    """
    first, mean, y = frozen_features(model, train_batches, max_examples)
    first_dev, mean_dev, y_dev = frozen_features(model, dev_batches, max_examples)
    return FirstTokenProbe(
        first_token=max(probe_accuracy(first, y, first_dev, y_dev, l2) for l2 in PROBE_L2_GRID),
        mean_pooled=max(probe_accuracy(mean, y, mean_dev, y_dev, l2) for l2 in PROBE_L2_GRID),
        num_train=len(y),
        num_dev=len(y_dev),
    )


def auto_cls_init(
    model: nn.Module,
    task: str,
    train_batches: Iterable[Mapping[str, Any]],
    dev_batches: Iterable[Mapping[str, Any]],
    adapter_name: str = "default",
) -> dict[str, Any]:
    """Decide ``cls_attention_init="auto"``: ``{"enable": bool, ...}`` with the probe's figures, or the reason
    the init does not apply (another task, model type or bias selection: then ``enable`` is False)."""
    if task != "seq-cls":
        return {"enable": False, "reason": f"the probe needs class labels; task {task!r}"}
    try:
        last_query_layer(model, adapter_name)
    except BitFitError as exc:
        return {"enable": False, "reason": str(exc)}
    probe = probe_first_token(model, train_batches, dev_batches)
    return {"enable": probe.enable, "min_gap": AUTO_MIN_GAP, "min_dev": AUTO_MIN_DEV, **asdict(probe)}
