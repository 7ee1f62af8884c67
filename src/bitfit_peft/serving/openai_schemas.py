"""Request bodies of the OpenAI-compatible and vLLM-compatible routes (``openai_api.py``).

Fields follow OpenAI's API (and vLLM's extensions ``top_k``, ``/classify``, ``/v1/load_lora_adapter``). A field we
do not support is refused with a one-line 400 naming it, rather than silently ignored, unless it is a no-op at its
default (``logprobs: null``, ``presence_penalty: 0``...). Strings follow the same rules as the other routes
(``schemas.py``: valid Unicode, bounded lengths).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bitfit_peft.serving.schemas import MAX_PATH_CHARS, MAX_TASK_CHARS, MAX_TEXT_CHARS, Ident, PathText, Text

__all__ = [
    "ChatRequest",
    "ClassifyRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "LoadLoraRequest",
    "UnloadLoraRequest",
]

MAX_INPUTS = 256
MAX_STOPS = 4
Prompt = Annotated[Text, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
Model = Annotated[Ident, Field(min_length=1, max_length=512)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    #: fields accepted only at these values (they change nothing); anything else is a 400 naming the field
    NOOP_FIELDS: ClassVar[dict[str, tuple[Any, ...]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, allowed in cls.NOOP_FIELDS.items():
                if name in data and data[name] not in allowed:
                    raise ValueError(f"'{name}' is not supported by this server; leave it out")
            data = {k: v for k, v in data.items() if k not in cls.NOOP_FIELDS}
        return data


class _Sampling(_Body):
    model: Model
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=10_000_000, description="vLLM extension: -1 or 0 = off.")
    n: int = Field(default=1, ge=1, le=8)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: Annotated[Text, Field(min_length=1, max_length=200)] | list[
        Annotated[Text, Field(min_length=1, max_length=200)]] | None = Field(default=None)
    stream: bool = False
    stream_options: dict[Literal["include_usage", "continuous_usage_stats"], bool] | None = None
    user: Annotated[Text, Field(max_length=256)] | None = None

    NOOP_FIELDS = {"logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0, 0.0),
             "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "best_of": (None, 1), "echo": (None, False),
             "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None,),
             "response_format": (None, {"type": "text"}), "metadata": (None,), "store": (None, False),
             "service_tier": (None, "auto", "default")}

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        return tuple(stops)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    """``POST /v1/completions``; OpenAI's default ``max_tokens`` is 16."""

    prompt: Prompt | list[Prompt] = Field(description="A prompt or a list of prompts (token-id prompts: no).")

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts or len(prompts) > MAX_INPUTS:
            raise ValueError(f"'prompt' needs 1 to {MAX_INPUTS} prompts")
        return prompts


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Annotated[Text, Field(max_length=MAX_TEXT_CHARS)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[Text, Field(max_length=MAX_TEXT_CHARS)] | list[_TextPart]
    name: Annotated[Ident, Field(max_length=MAX_TASK_CHARS)] | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``: the messages go through the base tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_INPUTS)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def chat(self) -> tuple[tuple[str, str], ...]:
        return tuple(("system" if m.role == "developer" else m.role, m.text()) for m in self.messages)


class _Inputs(_Body):
    model: Model | None = None
    input: Prompt | list[Prompt]
    user: Annotated[Text, Field(max_length=256)] | None = None

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not texts or len(texts) > MAX_INPUTS:
            raise ValueError(f"'input' needs 1 to {MAX_INPUTS} texts")
        return texts


class EmbeddingRequest(_Inputs):
    """``POST /v1/embeddings`` (token-id inputs and ``dimensions`` are not supported)."""

    encoding_format: Literal["float", "base64"] = "float"
    NOOP_FIELDS = {"dimensions": (None,)}


class ClassifyRequest(_Inputs):
    """``POST /classify`` (vLLM's pooling API): ``{"model": adapter, "input": text or [texts]}``."""

    NOOP_FIELDS = {"truncate_prompt_tokens": (None,), "priority": (None, 0), "add_special_tokens": (None, True)}


class LoadLoraRequest(_Body):
    """vLLM's ``POST /v1/load_lora_adapter``: the same rules as ``POST /v1/adapters`` with ``path``."""

    lora_name: Annotated[Ident, Field(min_length=1, max_length=MAX_TASK_CHARS)]
    lora_path: Annotated[PathText, Field(min_length=1, max_length=MAX_PATH_CHARS)]
    NOOP_FIELDS = {"load_inplace": (None, False), "lora_int_id": (None,), "base_model_name": (None,)}


class UnloadLoraRequest(_Body):
    """vLLM's ``POST /v1/unload_lora_adapter``."""

    lora_name: Annotated[Ident, Field(min_length=1, max_length=MAX_TASK_CHARS)]
    NOOP_FIELDS = {"lora_int_id": (None,)}
