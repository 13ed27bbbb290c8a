"""Every error the proxy reports, and how it looks to a client.

    ConfigError                  routes.yaml is invalid (startup; never reaches a client)
    ProxyError                   answered to a client in the OpenAI error shape
    ├── InternalError            500  a bug in the proxy (its traceback goes to the log)
    ├── BadRequestError          400  malformed JSON, non-object body, bad field type
    │   └── UnknownBackendError  400  the routing header names no configured backend
    ├── AuthenticationError      401  missing or wrong API key (or admin token)
    ├── ForbiddenError           403  /admin/* with no admin token configured, from afar
    ├── PayloadTooLargeError     413  body over `limits.max_body_bytes`
    ├── TooBusyError             429  the backend's concurrency limit and wait queue are full
    ├── BackendUnavailableError  503  the header forces a backend that is ejected as unhealthy
    ├── ShuttingDownError        503  still unanswered when the shutdown's grace period ended
    ├── BackendUnreachableError  502  connection refused, reset or broken before an answer
    │   ├── BackendRefusedError  502  nothing listens there (ejects the backend at once)
    │   └── BackendAnswerTooLargeError 502  answer head or whole-read body over the limits
    ├── BackendTimeoutError      504  no connection or no answer within the backend's timeouts
    └── BackendStatusError       the backend's own 4xx/5xx, its body turned into the OpenAI shape

Each `ProxyError` carries `kind`, the short name written to the `error` field of the log line.
"""

from __future__ import annotations

from typing import Any

import orjson


class ConfigError(Exception):
    """routes.yaml cannot be used; the message names the key path and the problem."""


class ProxyError(Exception):
    status = 500
    type = "server_error"
    kind = "internal_error"
    headers: tuple[tuple[bytes, bytes], ...] = ()  # extra response headers

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.kind

    def body(self) -> dict[str, Any]:
        return openai_error(self.message, self.type, param=self.param, code=self.code)


class InternalError(ProxyError):
    def __init__(self) -> None:
        super().__init__("internal error in the proxy")


class BadRequestError(ProxyError):
    status = 400
    type = "invalid_request_error"
    kind = "bad_request"


class UnknownBackendError(BadRequestError):
    kind = "unknown_backend"


class AuthenticationError(ProxyError):
    status = 401
    type = "invalid_request_error"
    kind = "invalid_api_key"
    headers = ((b"www-authenticate", b"Bearer"),)


class ForbiddenError(ProxyError):
    status = 403
    type = "invalid_request_error"
    kind = "forbidden"


class TooBusyError(ProxyError):
    status = 429
    type = "rate_limit_error"
    kind = "backend_busy"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.headers = ((b"retry-after", str(retry_after).encode()),)


class BackendUnavailableError(ProxyError):
    status = 503
    type = "server_error"
    kind = "backend_unhealthy"


class ShuttingDownError(ProxyError):
    status = 503
    type = "server_error"
    kind = "shutting_down"

    def __init__(self) -> None:
        super().__init__("the proxy is shutting down")


class PayloadTooLargeError(ProxyError):
    status = 413
    type = "invalid_request_error"
    kind = "body_too_large"


class BackendUnreachableError(ProxyError):
    status = 502
    type = "upstream_error"
    kind = "backend_unreachable"


# A stream that broke after it started: the `code` of its last event, and the log's `error`.
STREAM_INCOMPLETE = "stream_incomplete"  # the backend closed it without [DONE]
STREAM_INTERRUPTED = "stream_interrupted"  # its connection failed mid-stream
STREAM_ERROR_EVENT = "backend_stream_error"  # the backend sent an error event in it


class BackendRefusedError(BackendUnreachableError):
    """The connection was refused: the backend is not running."""


class BackendAnswerTooLargeError(BackendUnreachableError):
    """The answer's head, or a body the proxy reads whole, is over `limits.max_response_*`."""

    kind = "backend_answer_too_large"


class BackendTimeoutError(ProxyError):
    status = 504
    type = "upstream_error"
    kind = "backend_timeout"


class BackendStatusError(ProxyError):
    """The backend answered with an error status; relayed with that status."""

    kind = "backend_error"

    def __init__(self, status: int, body: bytes, backend: str):
        self.status = status
        self.type = "invalid_request_error" if 400 <= status < 500 else "server_error"
        self._upstream = _openai_shaped(body)
        message = _message_from(body) or f"backend {backend!r} answered HTTP {status}"
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        if self._upstream is None:
            return super().body()
        # The backend's own error, with any field of the shape it left out filled in: an
        # SDK may read any of them.
        error = {"type": self.type, "param": None, "code": self.code, **self._upstream["error"]}
        return {**self._upstream, "error": error}


def openai_error(
    message: str, type: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _parse(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except ValueError:
        return None


def _openai_shaped(body: bytes) -> dict[str, Any] | None:
    """The backend's body if it already is an OpenAI error, else None."""
    data = _parse(body)
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return data  # type: ignore[no-any-return]
    return None


def _message_from(body: bytes) -> str | None:
    """The error text inside a backend body: mlx_lm.server sends `{"error": "text"}`."""
    data = _parse(body)
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, str):
            return error
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    text = body.decode("utf-8", errors="replace").strip()
    # A non-JSON body (an HTML error page, "Not Found") is summarised, never relayed raw.
    return text[:200] if text and not text.startswith("<") else None
