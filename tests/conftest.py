"""Shared pytest configuration and tiny-model fixtures.

* ``--runslow``: tests marked ``@pytest.mark.slow`` (real weights, multi-process, the CLI demo) are skipped
  unless it is given. CI (``.ci/run``) passes it.
* Tiny, seeded, randomly initialised models (hidden 32, 2 layers, 4 heads, vocab 100) built from configs, so
  no test touches the network. Use the named fixtures (``tiny_bert``, ``tiny_gpt2``, ...) or the
  ``tiny_model_factory`` fixture: ``tiny_model_factory("qwen2", task="seq_cls", num_labels=3)``.
* ``tiny_tokenizer``: a WordPiece tokenizer (vocab < 100, lowercase letters/digits) matching the tiny models;
  ``tiny_bert_dir``: a directory holding a saved tiny BERT + tokenizer, loadable with ``from_pretrained``.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    RobertaConfig,
    T5Config,
    ViTConfig,
)

VOCAB_SIZE = 100
HIDDEN = 32
LAYERS = 2
HEADS = 4

# ----------------------------------------------------------------------------------------------------
# --runslow
# ----------------------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked `slow`")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: pass --runslow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


# ----------------------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------------------


def _configs() -> dict[str, Callable[[], PretrainedConfig]]:
    common = dict(vocab_size=VOCAB_SIZE, pad_token_id=0)
    decoder = dict(
        **common,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=2,
        eos_token_id=3,
    )
    encoder = dict(
        **common,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=128,
    )
    return {
        "bert": lambda: BertConfig(**encoder),
        "roberta": lambda: RobertaConfig(**{**encoder, "pad_token_id": 1, "max_position_embeddings": 130}),
        "distilbert": lambda: DistilBertConfig(
            **common, dim=HIDDEN, hidden_dim=64, n_layers=LAYERS, n_heads=HEADS, max_position_embeddings=128
        ),
        "gpt2": lambda: GPT2Config(
            **common,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=128,
            bos_token_id=2,
            eos_token_id=3,
        ),
        "qwen2": lambda: Qwen2Config(**decoder),
        "llama": lambda: LlamaConfig(**decoder),
        "t5": lambda: T5Config(
            **common,
            d_model=HIDDEN,
            d_kv=HIDDEN // HEADS,
            d_ff=64,
            num_layers=LAYERS,
            num_decoder_layers=LAYERS,
            num_heads=HEADS,
            decoder_start_token_id=0,
            eos_token_id=3,
        ),
        "vit": lambda: ViTConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=64,
            image_size=16,
            patch_size=4,
            num_channels=3,
        ),
    }


ARCHS: tuple[str, ...] = ("bert", "roberta", "distilbert", "gpt2", "qwen2", "llama", "t5", "vit")
DEFAULT_TASK: dict[str, str] = {
    "bert": "seq_cls",
    "roberta": "seq_cls",
    "distilbert": "seq_cls",
    "gpt2": "causal_lm",
    "qwen2": "causal_lm",
    "llama": "causal_lm",
    "t5": "seq2seq_lm",
    "vit": "image_cls",
}
_AUTO = {
    "base": AutoModel,
    "seq_cls": AutoModelForSequenceClassification,
    "token_cls": AutoModelForTokenClassification,
    "causal_lm": AutoModelForCausalLM,
    "seq2seq_lm": AutoModelForSeq2SeqLM,
    "image_cls": AutoModelForImageClassification,
}


def tiny_config(arch: str, **overrides: object) -> PretrainedConfig:
    """The tiny config of ``arch`` (one of ``ARCHS``) with attribute overrides (e.g. ``num_labels=3``)."""
    cfg = _configs()[arch]()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def make_tiny_model(
    arch: str, task: str | None = None, seed: int = 0, **overrides: object
) -> PreTrainedModel:
    """A tiny random model in eval mode, initialised under ``torch.manual_seed(seed)``.

    ``task``: base/seq_cls/token_cls/causal_lm/seq2seq_lm/image_cls (default: ``DEFAULT_TASK[arch]``).
    """
    task = task or DEFAULT_TASK[arch]
    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = _AUTO[task].from_config(cfg)
    return model.eval()


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer over lowercase letters, digits and punctuation (vocab < 100)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits)
    vocab = specials + chars + ["##" + c for c in chars] + list(".,!?'-:")
    assert len(vocab) <= VOCAB_SIZE
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[CLS]",
        eos_token="[SEP]",
    )


def save_tiny_model(path: Path, arch: str = "bert", task: str = "base", seed: int = 0) -> Path:
    """Save a tiny model (+ the tiny tokenizer) to ``path`` so that ``from_pretrained(path)`` works."""
    make_tiny_model(arch, task=task, seed=seed).save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    tiny models on a shared 2-core box run ~100x faster than with an oversubscribed pool."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def tiny_model_factory() -> Callable[..., PreTrainedModel]:
    """``make_tiny_model(arch, task=None, seed=0, **config_overrides)``."""
    return make_tiny_model


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_bert() -> PreTrainedModel:
    return make_tiny_model("bert")


@pytest.fixture
def tiny_roberta() -> PreTrainedModel:
    return make_tiny_model("roberta")


@pytest.fixture
def tiny_distilbert() -> PreTrainedModel:
    return make_tiny_model("distilbert")


@pytest.fixture
def tiny_gpt2() -> PreTrainedModel:
    return make_tiny_model("gpt2")


@pytest.fixture
def tiny_qwen2() -> PreTrainedModel:
    return make_tiny_model("qwen2")


@pytest.fixture
def tiny_llama() -> PreTrainedModel:
    return make_tiny_model("llama")


@pytest.fixture
def tiny_t5() -> PreTrainedModel:
    return make_tiny_model("t5")


@pytest.fixture
def tiny_vit() -> PreTrainedModel:
    return make_tiny_model("vit")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny BERT (base weights, no head) + tokenizer; read-only by convention."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "bert", task="base")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny GPT-2 causal LM + tokenizer; read-only by convention."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", task="causal_lm")
