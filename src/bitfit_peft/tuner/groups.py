"""Named bias groups and the module names each maps to, per architecture family.

A group is resolved from a module's dotted name (and, for norms, its class). The table below is what
``bias_terms=[...]`` selects; ``"all"`` selects every bias-bearing Linear / Conv1D / ConvNd / norm module of the
backbone instead, whatever its group.

| group | BERT / RoBERTa / ViT | DistilBERT | GPT-2 (fused ``c_attn``) | Llama / Qwen2 / Mistral | T5 |
|---|---|---|---|---|---|
| query | ``attention.self.query`` | ``q_lin`` | ``attn.c_attn`` (q, k and v) | ``q_proj`` | ``q`` |
| key | ``attention.self.key`` | ``k_lin`` | ``attn.c_attn`` | ``k_proj`` | ``k`` |
| value | ``attention.self.value`` | ``v_lin`` | ``attn.c_attn`` | ``v_proj`` | ``v`` |
| attention_output | ``attention.output.dense`` | ``out_lin`` | ``attn.c_proj`` | ``o_proj`` | ``o`` |
| intermediate | ``intermediate.dense`` | ``ffn.lin1`` | ``mlp.c_fc`` | ``gate_proj``, ``up_proj`` | ``wi*`` |
| output | ``output.dense`` | ``ffn.lin2`` | ``mlp.c_proj`` | ``down_proj`` | ``wo`` |
| layernorm | ``*LayerNorm`` | ``*layer_norm`` | ``ln_1``, ``ln_2``, ``ln_f`` | ``*norm`` (RMSNorm)* | ``layer_norm``* |

(*) bias-free norms whose forward has no bias (RMSNorm) are only adapted when named in ``target_modules``.

Example:
    >>> from bitfit_peft.tuner.groups import group_of
    >>> group_of("bert.encoder.layer.0.attention.self.query")
    ('query',)
    >>> group_of("transformer.h.3.attn.c_attn")
    ('query', 'key', 'value')
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads lazily: the CLI's --help reads BIAS_GROUPS
    from torch import nn

BIAS_GROUPS: tuple[str, ...] = (
    "query",
    "key",
    "value",
    "attention_output",
    "intermediate",
    "output",
    "layernorm",
)

#: model_type values whose module names the group table is known to cover (``bias_terms`` as a list).
KNOWN_MODEL_TYPES: frozenset[str] = frozenset(
    {
        "bert", "roberta", "xlm-roberta", "electra", "camembert", "vit", "deit", "distilbert",
        "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "t5", "mt5", "bart", "mbart",
    }
)  # fmt: skip

_LEAF_GROUPS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("query", "q_proj", "q_lin", "q", "query_proj", "wq"), ("query",)),
    **dict.fromkeys(("key", "k_proj", "k_lin", "k", "key_proj", "wk"), ("key",)),
    **dict.fromkeys(("value", "v_proj", "v_lin", "v", "value_proj", "wv"), ("value",)),
    **dict.fromkeys(("c_attn", "qkv", "qkv_proj", "query_key_value", "wqkv"), ("query", "key", "value")),
    **dict.fromkeys(("o_proj", "out_lin", "o", "out_proj", "wo_attn"), ("attention_output",)),
    **dict.fromkeys(
        (
            "gate_proj",
            "up_proj",
            "gate_up_proj",
            "lin1",
            "wi",
            "wi_0",
            "wi_1",
            "c_fc",
            "fc1",
            "dense_h_to_4h",
        ),
        ("intermediate",),
    ),
    **dict.fromkeys(("down_proj", "lin2", "wo", "fc2", "dense_4h_to_h"), ("output",)),
}
_NORM_NAME = re.compile(r"(layer_?norm|_norm$|^norm$|^ln_|^ln$|norm\d*$)", re.IGNORECASE)


def is_norm_module(name: str, module: nn.Module | None = None) -> bool:
    """Whether a module is LayerNorm-like (LayerNorm, RMSNorm, GroupNorm, T5LayerNorm...)."""
    if module is not None:
        cls = type(module).__name__.lower()
        if "norm" in cls and "batchnorm" not in cls:
            return True
        from torch import nn

        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return False
    return bool(_NORM_NAME.search(name.rsplit(".", 1)[-1]))


def group_of(name: str, module: nn.Module | None = None) -> tuple[str, ...]:
    """Return the bias group(s) a module belongs to, or ``()`` if it is in none (e.g. a pooler)."""
    parts = name.split(".")
    leaf = parts[-1]
    parent = parts[-2] if len(parts) > 1 else ""
    if is_norm_module(name, module):
        return ("layernorm",)
    if leaf == "dense" and parent == "intermediate":
        return ("intermediate",)
    if leaf == "dense" and parent == "output":
        grand = parts[-3] if len(parts) > 2 else ""
        return ("attention_output",) if grand == "attention" else ("output",)
    if leaf == "c_proj":  # GPT-2 Conv1D: attention output vs MLP output
        return ("attention_output",) if parent == "attn" else ("output",)
    return _LEAF_GROUPS.get(leaf.lower(), ())


def primary_group(name: str, module: nn.Module | None = None) -> str:
    """One reporting label per module: its first group, or ``"other"``."""
    groups = group_of(name, module)
    return "/".join(groups) if len(groups) > 1 else (groups[0] if groups else "other")


_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The first numeric component of a dotted module name (its transformer block), if any."""
    match = _LAYER_INDEX.search("." + name)
    return int(match.group(1)) if match else None
