"""What is sent upstream: the client's request with the few changes the backends need.

Pure functions. The body is passed through as the client sent it, except:
- `model` becomes the backend's own name for its model (mlx_lm.server would try to load
  any name it does not know), and answers carry the client's name back;
- `draft_model` and `num_draft_tokens` are dropped (a change makes mlx_lm.server reload);
- streams get `stream_options.include_usage`, so the proxy learns the token counts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.errors import BadRequestError

# RFC 9110 7.6.1, plus what is recomputed for the new body or must not leak upstream.
NOT_FORWARDED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"accept-encoding",  # answers are relayed as bytes: keep them uncompressed
        b"expect",
    }
)
_DROPPED_FIELDS = ("draft_model", "num_draft_tokens")
# orjson reads JSON nested 1024 levels deep but writes only 254 levels: a body between the two
# would be accepted and then fail on its way upstream.
_MAX_DEPTH = 254


@dataclass(frozen=True, slots=True)
class ChatRequest:
    body: dict[str, Any]
    model: str  # the name the client asked for (or the public one when it sent none)
    stream: bool
    wants_usage: bool  # the client itself asked for the usage chunk


def parse_body(raw: bytes, public_model: str) -> ChatRequest:
    """Validate the client's JSON just enough to route and measure it."""
    try:
        body = orjson.loads(raw)
    except ValueError as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequestError(f"request body must be a JSON object, not {_json_type(body)}")
    if raw.count(b"[") + raw.count(b"{") > _MAX_DEPTH:  # only then can it be too deep
        try:
            orjson.dumps(body)
        except orjson.JSONEncodeError as exc:
            raise BadRequestError(f"request body cannot be passed on: {exc}") from None
    stream = body.get("stream")
    if stream is None:  # the OpenAI API takes null for false
        stream = False
    elif not isinstance(stream, bool):  # 0, "" or [] too: the backend would read them its way
        raise BadRequestError("'stream' must be true or false", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequestError("'stream_options' must be an object", param="stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequestError("'model' must be a string", param="model")
    wants_usage = bool(options and options.get("include_usage") is True)
    return ChatRequest(body, model or public_model, stream, wants_usage)


def upstream_body(request: ChatRequest, backend_model: str) -> bytes:
    body = {k: v for k, v in request.body.items() if k not in _DROPPED_FIELDS}
    body["model"] = backend_model
    if request.stream:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return orjson.dumps(body)


def upstream_headers(
    headers: list[tuple[bytes, bytes]], drop: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """The client's headers (lower-case names, as ASGI has them) minus those in `drop` and
    those the client's `Connection` header declares hop-by-hop.

    `Authorization` is forwarded: the backend may check it. It is never logged.
    """
    for name, value in headers:
        if name == b"connection":
            listed = {token.strip().lower() for token in value.split(b",")}
            drop = drop | (listed - {b"keep-alive", b"close"})
    return [(name, value) for name, value in headers if name not in drop]


@functools.lru_cache(maxsize=256)  # pure, and the same few pairs on every request
def model_rewriter(backend_model: str, client_model: str) -> tuple[tuple[bytes, bytes], ...]:
    """The byte substitutions that put the client's model name back into answers.

    Answers are relayed as bytes, not re-serialised, so the rewrite replaces the exact JSON
    member, as Python's encoder writes it (mlx_lm.server) and as compact encoders do.
    """
    if backend_model == client_model:
        return ()
    old, new = orjson.dumps(backend_model), orjson.dumps(client_model)
    return tuple((b'"model"' + sep + old, b'"model"' + sep + new) for sep in (b": ", b":"))


def rewrite(data: bytes, rewrites: tuple[tuple[bytes, bytes], ...]) -> bytes:
    for old, new in rewrites:
        data = data.replace(old, new)
    return data


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
