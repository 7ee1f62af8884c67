"""Request schemas and error bodies shared by both servers (``server.py`` and ``ray_serve.py``).

Every string of a request is valid Unicode (no lone UTF-16 surrogates, which JSON's ``"\\ud800"`` can carry and
which fail later when encoded); names, paths, Hub ids and revisions also hold no NUL or control characters and
paths no component over 255 bytes. Floats must be finite. A violation is HTTP 422 with a one-line ``detail``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "GenerateInput",
    "GenerateRequest",
    "LoadAdapterRequest",
    "PredictInput",
    "PredictRequest",
    "json_safe",
    "redact_paths",
    "validation_detail",
]

MAX_TEXT_CHARS = 20_000
MAX_TASK_CHARS = 64
MAX_PATH_CHARS = 4096
MAX_COMPONENT_BYTES = 255
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
#: a filesystem path in a message: absolute (not one of the servers' routes) or climbing with ``../``
_FS_PATH = re.compile(r"(?<![\w:/.])(?:/(?!v1/|(?:healthz|livez|readyz|metrics|classify|docs)(?![\w/.]))|~/|(?:\.\./)+)"
                      r"(?:[\w.@+~-]+/)*[\w.@+~-]+(?:/[\w.@+~-]*)?")


def _unicode(value: str) -> str:
    match = _SURROGATE.search(value)
    if match:
        raise ValueError(
            f"holds a lone UTF-16 surrogate (\\u{ord(match.group()):04x}) at index {match.start()}; send valid "
            "Unicode (pair the surrogates or drop them)"
        )
    return value


def _identifier(value: str) -> str:
    _unicode(value)
    match = _CONTROL.search(value)
    if match:
        raise ValueError(f"holds a control character (\\x{ord(match.group()):02x}) at index {match.start()}; remove it")
    return value


def _path(value: str) -> str:
    _identifier(value)
    for part in value.split("/"):
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise ValueError(f"has a path component of {len(part.encode('utf-8'))} bytes (at most "
                             f"{MAX_COMPONENT_BYTES}); shorten it")
    return value


def _hub_id(value: str) -> str:
    _identifier(value)
    if not _HUB_ID.match(value) or ".." in value:
        raise ValueError("is not a Hub repo id; use 'user/repo' (letters, digits, '_', '-', '.')")
    return value


Text = Annotated[str, AfterValidator(_unicode)]
Ident = Annotated[str, AfterValidator(_identifier)]
PathText = Annotated[str, AfterValidator(_path)]
HubId = Annotated[str, AfterValidator(_hub_id)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _one_form(inputs: Any, task: Any, text: Any, text_name: str, others: tuple[Any, ...] = ()) -> None:
    single = task is not None or text is not None or any(o is not None for o in others)
    if inputs is None and not single:
        raise ValueError(f"give 'inputs' (a non-empty list) or 'task' and '{text_name}'")
    if inputs is not None and single:
        raise ValueError(f"give either 'inputs' or 'task'/'{text_name}', not both")
    if single and (task is None or text is None):
        raise ValueError(f"a single input needs both 'task' and '{text_name}'")


class PredictInput(_Strict):
    task: Ident = Field(min_length=1, max_length=MAX_TASK_CHARS, description="Adapter name, or '__base__'.")
    text: Text = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    text_pair: Text | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)


class PredictRequest(_Strict):
    """Either ``inputs`` (a list) or a single ``task`` + ``text`` (+ ``text_pair``)."""

    inputs: list[PredictInput] | None = Field(default=None, min_length=1)
    task: Ident | None = Field(default=None, min_length=1, max_length=MAX_TASK_CHARS)
    text: Text | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)
    text_pair: Text | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        json_schema_extra={"examples": [{"inputs": [{"task": "sst2", "text": "a gripping, funny film"},
                                                    {"task": "spam", "text": "WIN a FREE cruise, reply YES"}]}]},
    )

    @model_validator(mode="after")
    def _check(self) -> PredictRequest:
        _one_form(self.inputs, self.task, self.text, "text", (self.text_pair,))
        return self

    def items(self) -> list[PredictInput]:
        if self.inputs is not None:
            return self.inputs
        assert self.task is not None and self.text is not None
        return [PredictInput(task=self.task, text=self.text, text_pair=self.text_pair)]


class GenerateInput(_Strict):
    task: Ident = Field(min_length=1, max_length=MAX_TASK_CHARS)
    prompt: Text = Field(min_length=1, max_length=MAX_TEXT_CHARS)


class GenerateRequest(_Strict):
    inputs: list[GenerateInput] | None = Field(default=None, min_length=1)
    task: Ident | None = Field(default=None, min_length=1, max_length=MAX_TASK_CHARS)
    prompt: Text | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)
    max_new_tokens: int = Field(default=32, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(default=None, gt=0, le=10)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=10_000_000)
    num_beams: int = Field(default=1, ge=1, le=8)
    num_return_sequences: int = Field(default=1, ge=1, le=8)

    @model_validator(mode="after")
    def _check(self) -> GenerateRequest:
        _one_form(self.inputs, self.task, self.prompt, "prompt")
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ValueError("without do_sample, num_return_sequences must be <= num_beams")
        return self

    def items(self) -> list[GenerateInput]:
        if self.inputs is not None:
            return self.inputs
        assert self.task is not None and self.prompt is not None
        return [GenerateInput(task=self.task, prompt=self.prompt)]

    def settings(self) -> tuple[tuple[str, Any], ...]:
        return tuple(
            (k, getattr(self, k))
            for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_beams",
                      "num_return_sequences")
        )


class LoadAdapterRequest(_Strict):
    name: Ident = Field(min_length=1, max_length=MAX_TASK_CHARS)
    path: PathText | None = Field(default=None, min_length=1, max_length=MAX_PATH_CHARS,
                                  description="Adapter directory inside one of the server's adapter roots.")
    hub_id: HubId | None = Field(default=None, min_length=3, max_length=200,
                                 description="Hugging Face Hub repo id (only if the server allows the Hub); "
                                             "never read as a local path.")
    revision: Ident | None = Field(default=None, min_length=1, max_length=200)
    label_names: list[Text] | None = Field(default=None, min_length=1, max_length=10_000)

    @model_validator(mode="after")
    def _one_source(self) -> LoadAdapterRequest:
        if (self.path is None) == (self.hub_id is None):
            raise ValueError("give exactly one of 'path' or 'hub_id'")
        return self


# ---------------------------------------------------------------------------------------------------- error bodies
def json_safe(value: Any) -> Any:
    """``value`` with every string encodable as UTF-8 (surrogates escaped) and non-finite floats as strings."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return repr(value)
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return json_safe(str(value))


def redact_paths(text: str) -> str:
    """``text`` with every server path (absolute, ``~/...`` or ``../...``) replaced by ``<path>``: error bodies name
    the adapter and the problem, never where files live or where a symlink points.

    >>> redact_paths("adapter_model.safetensors of 'a' links to /srv/x/../y/w.bin; see POST /v1/adapters")
    "adapter_model.safetensors of 'a' links to <path>; see POST /v1/adapters"
    >>> redact_paths("use /classify, not /srv/classify or /docs/x")
    'use /classify, not <path> or <path>'
    """
    return _FS_PATH.sub("<path>", text)


def validation_detail(errors: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """A one-line message and the errors without their (possibly hostile) ``input`` values."""
    clean = [{"loc": json_safe(list(e.get("loc", ()))),
              "msg": json_safe(str(e.get("msg", "")).removeprefix("Value error, ")),
              "type": json_safe(e.get("type", ""))} for e in errors]
    parts = []
    for err in clean[:3]:
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{len(clean) - 3} more)" if len(clean) > 3 else ""
    return f"Invalid request: {'; '.join(parts)}{more}. See GET /docs for the schema.", clean
