"""Response bodies and error objects of the OpenAI-compatible routes (``openai_api.py``), in OpenAI's shapes.

Errors are ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status OpenAI uses (400 for a bad
request, 401, 403, 404 for an unknown model, 409, 429 with ``Retry-After``, 500, 503); the message is one line
naming the problem and the fix, and never echoes a request value.
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import time
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from bitfit_peft.serving.batching import QueueFullError, QueueTimeoutError
from bitfit_peft.serving.dispatch import AdapterRunError
from bitfit_peft.serving.errors import AdapterPathError, DuplicateAdapterError, EngineError, UnknownTaskError
from bitfit_peft.serving.limits import BudgetError
from bitfit_peft.serving.schemas import json_safe, redact_paths, validation_detail

__all__ = ["completion_body", "embedding_body", "error_response", "sse", "usage"]

logger = logging.getLogger(__name__)
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable_error"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def error_response(err: BaseException, model: str | None = None) -> JSONResponse:
    """``err`` as OpenAI's error object with its status code (see the module docstring)."""
    status, message, code, param, headers = _describe(err)
    if status == 404 and code in ("unknown_task", "model_not_found") and model is not None:
        message = (f"The model {model!r} does not exist on this server; GET /v1/models lists the base model and the "
                   "loaded adapters.")
        code, param = "model_not_found", "model"
    body = {"error": {"message": message, "type": _TYPES.get(status, "internal_error" if status >= 500 else
                                                              "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(json_safe(body), status_code=status, headers=headers)


def _describe(err: BaseException) -> tuple[int, str, str | None, str | None, dict[str, str]]:
    """(status, message, code, param, headers) of ``err``."""
    if isinstance(err, RequestValidationError):
        detail, errors = validation_detail(list(err.errors()))
        loc = [str(x) for x in (errors[0]["loc"] if errors else []) if x != "body"]
        return 400, detail, "invalid_request", ".".join(loc) or None, {}
    status, detail = getattr(err, "status", None), getattr(err, "detail", None)
    if isinstance(status, int) and isinstance(detail, str):  # server.ApiError (both servers' backends)
        code = getattr(err, "error", None)
        return (400 if status == 422 else status), detail, code, None, dict(getattr(err, "headers", {}) or {})
    if isinstance(err, HTTPException):
        return err.status_code, str(err.detail), None, None, dict(err.headers or {})
    mapped: tuple[tuple[type[BaseException], int, str], ...] = (  # the same statuses as the server's own routes
        (QueueFullError, 429, "queue_full"), (QueueTimeoutError, 503, "queue_timeout"),
        (BudgetError, 413, "over_budget"), (AdapterRunError, 500, "adapter_failed"),
        (UnknownTaskError, 404, "unknown_task"), (DuplicateAdapterError, 409, "duplicate_adapter"),
        (AdapterPathError, 403, "adapter_path"), (EngineError, 400, "invalid_request"),
        (ValueError, 400, "invalid_request"))
    retry_after = {429: {"Retry-After": "1"}, 503: {"Retry-After": "2"}}
    for exc_type, status, code in mapped:
        if isinstance(err, exc_type):
            return status, redact_paths(str(err)), code, None, retry_after.get(status, {})
    logger.error("internal error on an OpenAI route", exc_info=err)
    return 500, f"Internal error while serving the request: {type(err).__name__}: {err}", "internal", None, {}


def usage(prompt: int, completion: int = 0) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(chat: bool, model: str, results: Sequence[dict[str, Any]], n: int) -> dict[str, Any]:
    """A ``chat.completion`` or ``text_completion`` from the engine's completions (``n`` choices a prompt; a
    prompt with one computed choice is repeated: greedy decoding gives ``n`` equal ones)."""
    choices, completion_tokens = [], 0
    for i, result in enumerate(results):
        for j in range(n):
            k = j if len(result["texts"]) == n else 0
            text, reason = result["texts"][k], result["finish_reasons"][k]
            completion_tokens += result["completion_tokens"][k]
            if chat:
                choices.append({"index": i * n + j, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": reason})
            else:
                choices.append({"index": i * n + j, "text": text, "logprobs": None, "finish_reason": reason})
    prompt_tokens = sum(r["prompt_tokens"] for r in results)
    return {"id": new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(chat: bool, stream_id: str, created: int, model: str, choices: list[dict[str, Any]],
          usage_: dict[str, int] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": stream_id, "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def chunk_choice(chat: bool, index: int, text: str | None, reason: str | None, first: bool = False) -> dict[str, Any]:
    if not chat:
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
    delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else (
        {"content": text} if text else {})
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event (``data: ...``)."""
    text = data if isinstance(data, str) else json.dumps(json_safe(data), separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def embedding_body(model: str, results: Sequence[dict[str, Any]], encoding: str) -> dict[str, Any]:
    data = []
    for i, result in enumerate(results):
        vector: Any = result["embedding"]
        if encoding == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": vector})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": sum(r["prompt_tokens"] for r in results),
                      "total_tokens": sum(r["prompt_tokens"] for r in results)}}


def classify_body(model: str, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """vLLM's classification response: per input ``label``, ``probs`` (in label order), ``num_classes``."""
    data = []
    for i, result in enumerate(results):
        if result.get("kind") != "classification":
            raise EngineError(f"Adapter {result.get('task')!r} is a {result.get('kind')} head, not a classifier; "
                              "use POST /v1/predict for its values.")
        probs = list(result["probabilities"].values())
        data.append({"index": i, "label": result["label"], "probs": probs, "num_classes": len(probs)})
    prompt_tokens = sum(r["prompt_tokens"] for r in results)
    return {"id": new_id("classify"), "object": "list", "created": int(time.time()), "model": model, "data": data,
            "usage": {**usage(prompt_tokens), "prompt_tokens_details": None}}
