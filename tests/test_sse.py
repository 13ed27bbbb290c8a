"""Reading the event stream as it passes: framing across reads, and what each event is."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.sse import EventSplitter, Kind, classify, quiet_prefix


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
    """The relay forwards unread the events `quiet_prefix` counts: usage, errors, [DONE]
    and comments must never be counted, wherever they come in a read."""
    content = data({"choices": [{"delta": {"content": "x"}}]})
    assert quiet_prefix([raw]) == 0
    assert quiet_prefix([content, content, raw, content]) == 2


def test_text_that_quotes_a_key_is_not_mistaken_for_it() -> None:
    """A quote in generated text is escaped, so content mentioning "usage" stays content."""
    raw = data({"choices": [{"delta": {"content": 'the "usage" and "error" keys'}}]})
    assert classify(raw).kind is Kind.CONTENT and quiet_prefix([raw, raw]) == 2


EVENTS = [
    data({"choices": [{"delta": {"content": "x"}}]}),
    data({"choices": [{"delta": {"role": "assistant", "content": ""}}]}),
    data({"choices": [{"delta": {}, "finish_reason": "stop"}]}),
    data({"choices": [{"delta": {"content": 'say "usage" or [DONE]'}}]}),
    data({"choices": [], "usage": {"completion_tokens": 3}}),
    data({"choices": [{"delta": {"content": "x"}}], "usage": {"completion_tokens": 1}}),
    data({"error": {"message": "boom"}}),
    b": keepalive 1/2\n\n",
    b"data: [DONE]\n\n",
    b"event: x\ndata: [DONE]\n\n",
]


@given(st.lists(st.sampled_from(EVENTS), max_size=12))
def test_quiet_events_are_content_or_other_without_usage(events: list[bytes]) -> None:
    """Whatever the mix, the events `quiet_prefix` lets pass unread are ones `classify`
    would call CONTENT or OTHER, carrying no usage."""
    for raw in events[: quiet_prefix(events)]:
        event = classify(raw)
        assert event.kind in (Kind.CONTENT, Kind.OTHER) and event.usage is None
