"""Reading an OpenAI-style server-sent event stream as it passes through.

The proxy forwards events untouched, but it must know a few things about each one: is it a
`: keepalive` comment (mlx_lm.server sends them during prefill), does it carry generated
content (the first one fixes TTFT, the last one ends the decode clock), is it the usage-only
chunk (token counts; removed when the client did not ask for it), an error, or `[DONE]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson


class Kind(Enum):
    COMMENT = "comment"  # `: keepalive 10/200`
    CONTENT = "content"  # a chunk with generated text, tool calls or reasoning
    USAGE = "usage"  # `choices: []` with `usage`: the include_usage chunk
    ERROR = "error"  # `{"error": ...}` sent by the backend mid-stream
    DONE = "done"  # `data: [DONE]`
    OTHER = "other"  # role-only deltas, the finish_reason chunk, anything else


@dataclass(slots=True)  # not frozen: a frozen dataclass is slower to build
class Event:
    kind: Kind
    usage: dict[str, Any] | None = None
    text: str = ""  # CONTENT: the first choice's generated text


# Shared: most events carry nothing but their kind, and every streamed event is classified.
_COMMENT, _DONE, _ERROR, _OTHER = (
    Event(kind) for kind in (Kind.COMMENT, Kind.DONE, Kind.ERROR, Kind.OTHER)
)

# An "event" longer than this without a blank line is no SSE: pass it on rather than hold it.
MAX_EVENT_BYTES = 1 << 20


class EventSplitter:
    """Cuts a byte stream at event boundaries: each read's whole events come out together
    as one block; a partial event waits for the rest of it."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """The events `chunk` completes, as one block (b"" if none), each ending with a
        blank line; only an oversized non-event at its end may not (see MAX_EVENT_BYTES)."""
        if b"\r" in chunk:  # CRLF framing is legal SSE; normalise so one delimiter suffices
            chunk = chunk.replace(b"\r\n", b"\n")
        data = self._pending + chunk if self._pending else chunk
        end = data.rfind(b"\n\n") + 2  # 1 if there is none
        if end == 1:
            end = 0
        block, self._pending = data[:end], data[end:]
        if len(self._pending) > MAX_EVENT_BYTES:
            block, self._pending = data, b""
        return block

    def leftover(self) -> bytes:
        """Bytes of an event that never ended (the stream stopped inside it)."""
        return self._pending


def event_end(block: bytes, start: int) -> int:
    """Where the event that starts at `start` in `block` ends (after its blank line)."""
    end = block.find(b"\n\n", start)
    return len(block) if end == -1 else end + 2


def split_events(block: bytes) -> list[bytes]:
    """The events of a block, one by one."""
    events, start = [], 0
    while start < len(block):
        end = event_end(block, start)
        events.append(block[start:end])
        start = end
    return events


def classify(raw: bytes) -> Event:
    """What a whole event is. Every streamed event passes here: kept lean."""
    if raw[:1] == b":":
        return _COMMENT
    if raw[:5] == b"data:" and raw.count(b"\n") == 2:  # the common one-line event
        data: bytes | None = raw[5:].strip()
    else:
        data = _data_of(raw)
    if data is None:
        return _OTHER
    if data == b"[DONE]":
        return _DONE
    try:
        payload = orjson.loads(data)
    except ValueError:
        return _OTHER
    if not isinstance(payload, dict):
        return _OTHER
    if "error" in payload:
        return _ERROR
    usage = payload.get("usage")
    usage = usage if isinstance(usage, dict) else None
    choices = payload.get("choices")
    if isinstance(choices, list) and choices:
        first = choices[0]
        text = generated(first) if isinstance(first, dict) else None
        if text is not None:
            return Event(Kind.CONTENT, usage, text)
        if any(isinstance(c, dict) and generated(c) is not None for c in choices[1:]):
            return Event(Kind.CONTENT, usage, "")
    if usage is not None:
        return Event(Kind.OTHER if choices else Kind.USAGE, usage)
    return _OTHER


# What an event that is USAGE, ERROR or DONE, or carries usage, always contains (see
# `quiet_until`). Each is a pass over the bytes: the list is kept short.
_NOTABLE = (b'"usage"', b'"error"', b"[DONE]")


def quiet_until(block: bytes, start: int) -> int:
    """Where, in `block` from the event starting at `start`, the first event starts that
    may be USAGE, ERROR or DONE or carry usage: the first with `"usage"`, `"error"` or
    `[DONE]` in its bytes (len(block) if none). The events before it are CONTENT, OTHER or
    COMMENT without usage, and once a read has had content, the relay needs no more of
    them: one scan over all of them, far cheaper than `classify` on each.

    False alarms only cost a `classify`. Generated text cannot raise one, nor hide one: a
    quote inside a JSON string is always escaped, so `"usage"` never appears in content.
    Missing one would take a key spelt with escapes (`"\\u0075sage"`), which no JSON
    encoder writes.
    """
    first = len(block)  # where the earliest marker is
    for marker in _NOTABLE:
        at = block.find(marker, start, first)
        if at != -1:
            first = at
    if first == len(block):
        return first
    # That event's start: after the last blank line before the marker. In a run of more
    # than two newlines, events end at every second one from the run's start (as
    # `event_end` cuts them): an odd one out begins the next event.
    boundary = block.rfind(b"\n\n", start, first)
    if boundary == -1:
        return start
    run = boundary
    while run > start and block[run - 1] == 10:  # b"\n"
        run -= 1
    return run + (boundary + 2 - run) // 2 * 2


def _data_of(raw: bytes) -> bytes | None:
    """The `data:` payload of an event, multi-line data joined with newlines."""
    lines = [line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def generated(choice: dict[str, Any]) -> str | None:
    """The text a choice carries ("" for tool calls or reasoning only), or None if nothing
    was generated: a role-only delta, a finish_reason chunk."""
    delta = choice.get("delta")
    if delta is None:  # a whole message, or a legacy /v1/completions choice
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else choice.get("text")
        return content if isinstance(content, str) and content else None
    if not isinstance(delta, dict):
        return None
    content = delta.get("content")
    if isinstance(content, str) and content:
        return content
    if delta.get("tool_calls") or delta.get("reasoning") or delta.get("reasoning_content"):
        return ""
    return None
