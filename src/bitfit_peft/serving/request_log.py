"""One structured log line and one metrics observation per HTTP request; request ids.

:class:`RequestObserver` is an ASGI middleware of both servers. For every request it

- takes the client's ``X-Request-ID`` (up to 128 characters of ``A-Z a-z 0-9 . _ - :``; anything else is replaced)
  or makes one, keeps it in ``request.state.request_id`` and echoes it in the response's ``X-Request-ID``;
- logs one line to the ``bitfit_peft.serving.requests`` logger: request id, method, route, status, latency, and what
  the route recorded in ``request.state`` (``adapter``, ``prompt_tokens``, ``completion_tokens``). Never a request
  body, a prompt, a header value or a token;
- counts it in the app's :class:`~bitfit_peft.serving.metrics.ServerMetrics` (by route template, not raw path).

:func:`configure_logging` sets the format of these lines: ``key=value`` text (default) or one JSON object a line.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bitfit_peft.serving.metrics import ServerMetrics

__all__ = ["JsonFormatter", "RequestObserver", "configure_logging"]

logger = logging.getLogger("bitfit_peft.serving.requests")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_STATE_FIELDS = ("adapter", "prompt_tokens", "completion_tokens", "stream")


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object: time, level, logger, and the record's ``fields`` (else its message)."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name}
        fields = getattr(record, "fields", None)
        body.update(fields if isinstance(fields, dict) else {"message": record.getMessage()})
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def configure_logging(json_lines: bool = False, level: int | str = logging.INFO) -> None:
    """Send the request and adapter-event lines to stderr, as ``key=value`` text or JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(name)s %(message)s"))
    for name in ("bitfit_peft.serving.requests", "bitfit_peft.serving.adapters"):
        log = logging.getLogger(name)
        log.handlers = [handler]
        log.setLevel(level)
        log.propagate = False


class RequestObserver:
    """The middleware (see the module docstring)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started, status = time.perf_counter(), 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self._record(scope, state, request_id, status, time.perf_counter() - started)

    def _record(self, scope: Scope, state: dict[str, Any], request_id: str, status: int, seconds: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        if endpoint == "/metrics":
            return
        fields: dict[str, Any] = {"event": "request", "request_id": request_id, "method": scope.get("method"),
                                  "endpoint": endpoint, "status": status, "latency_ms": round(seconds * 1000, 2)}
        fields.update({k: state[k] for k in _STATE_FIELDS if state.get(k) is not None})
        if logger.isEnabledFor(logging.INFO):
            logger.info(" ".join(f"{k}={v}" for k, v in fields.items()), extra={"fields": fields})
        tokens = (int(state.get("prompt_tokens") or 0), int(state.get("completion_tokens") or 0))
        self.metrics.observe_request(endpoint, state.get("adapter"), status, seconds, tokens)
