"""Reading the event stream as it passes: framing across reads, and what each event is."""

from __future__ import annotations

import json

import pytest

from proxy.sse import EventSplitter, Kind, classify, maybe_notable


def data(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def test_events_split_across_reads_are_joined() -> None:
    stream = data({"a": 1}) + b": keepalive 1/2\n\n" + data({"b": 2})
    splitter = EventSplitter()
    events = [event for i in range(0, len(stream), 7) for event in splitter.feed(stream[i : i + 7])]
    assert b"".join(events) == stream
    assert len(events) == 3
    assert splitter.leftover() == b""


def test_partial_event_waits_and_is_reported_as_leftover() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b'data: {"a"') == []
    assert splitter.leftover() == b'data: {"a"'


def test_crlf_framing_is_understood() -> None:
    events = EventSplitter().feed(b"data: [DONE]\r\n\r\n")
    assert [classify(e).kind for e in events] == [Kind.DONE]


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b": keepalive 3/10\n\n", Kind.COMMENT),
        (b"data: [DONE]\n\n", Kind.DONE),
        (data({"choices": [{"delta": {"content": "Hi"}}]}), Kind.CONTENT),
        (data({"choices": [{"delta": {"tool_calls": [{"id": "1"}]}}]}), Kind.CONTENT),
        (data({"choices": [{"delta": {"reasoning": "hmm"}}]}), Kind.CONTENT),
        (data({"choices": [{"text": "legacy"}]}), Kind.CONTENT),
        (data({"choices": [{"delta": {"role": "assistant", "content": ""}}]}), Kind.OTHER),
        (data({"choices": [{"delta": {}, "finish_reason": "stop"}]}), Kind.OTHER),
        (data({"choices": [], "usage": {"completion_tokens": 3}}), Kind.USAGE),
        (data({"error": {"message": "boom"}}), Kind.ERROR),
        (b"data: not json\n\n", Kind.OTHER),
        (b"event: ping\n\n", Kind.OTHER),
        (b"event: x\ndata: [DONE]\n\n", Kind.DONE),
    ],
)
def test_classify(raw: bytes, kind: Kind) -> None:
    assert classify(raw).kind is kind


@pytest.mark.parametrize(
    "raw",
    [
        b": keepalive 3/10\n\n",
        b"data: [DONE]\n\n",
        b"event: x\ndata: [DONE]\n\n",
        data({"choices": [], "usage": {"completion_tokens": 3}}),
        data({"choices": [{"delta": {"content": "x"}}], "usage": {"completion_tokens": 1}}),
        data({"error": {"message": "boom"}}),
        b'data: {"choices":[],"usage":{"completion_tokens":3}}\n\n',  # compact separators
    ],
)
def test_events_that_matter_are_never_skipped(raw: bytes) -> None:
    """The relay skips `classify` for events `maybe_notable` clears: usage, errors, [DONE]
    and comments must never be cleared."""
    assert maybe_notable(raw)


def test_text_that_quotes_a_key_is_not_mistaken_for_it() -> None:
    """A quote in generated text is escaped, so content mentioning "usage" stays content."""
    raw = data({"choices": [{"delta": {"content": 'the "usage" and "error" keys'}}]})
    assert classify(raw).kind is Kind.CONTENT and not maybe_notable(raw)


def test_usage_is_read_from_a_content_chunk_too() -> None:
    event = classify(
        data({"choices": [{"delta": {"content": "x"}}], "usage": {"completion_tokens": 1}})
    )
    assert event.kind is Kind.CONTENT and event.usage == {"completion_tokens": 1}
