"""Reading the event stream as it passes: framing across reads, and what each event is."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import Timeouts
from proxy.relay import Attempt, RequestState, _take_events
from proxy.sse import EventSplitter, Kind, classify, quiet_until, split_events
from proxy.timing import Clock


def data(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def test_events_split_across_reads_are_joined() -> None:
    stream = data({"a": 1}) + b": keepalive 1/2\n\n" + data({"b": 2})
    splitter = EventSplitter()
    blocks = [splitter.feed(stream[i : i + 7]) for i in range(0, len(stream), 7)]
    assert b"".join(blocks) == stream
    assert all(block.endswith(b"\n\n") for block in blocks if block)
    assert len(split_events(b"".join(blocks))) == 3
    assert splitter.leftover() == b""


def test_partial_event_waits_and_is_reported_as_leftover() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b'data: {"a"') == b""
    assert splitter.leftover() == b'data: {"a"'


def test_crlf_framing_is_understood() -> None:
    events = split_events(EventSplitter().feed(b"data: [DONE]\r\n\r\n"))
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
        b"data: [DONE]\n\n",
        b"event: x\ndata: [DONE]\n\n",
        data({"choices": [], "usage": {"completion_tokens": 3}}),
        data({"choices": [{"delta": {"content": "x"}}], "usage": {"completion_tokens": 1}}),
        data({"error": {"message": "boom"}}),
        b'data: {"choices":[],"usage":{"completion_tokens":3}}\n\n',  # compact separators
    ],
)
def test_events_that_matter_are_never_skipped(raw: bytes) -> None:
    """The relay forwards unread the events before `quiet_until`: usage, errors and
    [DONE] must never be among them, wherever they come in a read."""
    content = data({"choices": [{"delta": {"content": "x"}}]})
    assert quiet_until(raw, 0) == 0
    block = content + content + raw + content
    assert quiet_until(block, 0) == quiet_until(block, len(content)) == 2 * len(content)


def test_text_that_quotes_a_key_is_not_mistaken_for_it() -> None:
    """A quote in generated text is escaped, so content mentioning "usage" stays content."""
    raw = data({"choices": [{"delta": {"content": 'the "usage" and "error" keys'}}]})
    assert classify(raw).kind is Kind.CONTENT and quiet_until(raw + raw, 0) == 2 * len(raw)


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
    b'event: message\ndata: {"choices": [],\ndata: "usage": {"completion_tokens": 2}}\n\n',
    b"\n",  # a stray blank line: runs of three or more newlines
]
# No deadline (a loaded CI machine stalls single examples) and no example database left in
# the checkout, as in test_badinput.
QUIET = settings(deadline=None, database=None)


@QUIET
@given(st.lists(st.sampled_from(EVENTS), max_size=12))
def test_quiet_events_are_content_or_other_without_usage(events: list[bytes]) -> None:
    """Whatever the mix, the events before `quiet_until` are whole events that `classify`
    would call CONTENT, OTHER or COMMENT, carrying no usage."""
    block = b"".join(events)
    until = quiet_until(block, 0)
    whole = split_events(block)  # the events as the relay cuts them
    assert until in {len(b"".join(whole[:n])) for n in range(len(whole) + 1)}
    for raw in split_events(block[:until]):
        event = classify(raw)
        assert event.kind in (Kind.CONTENT, Kind.OTHER, Kind.COMMENT) and event.usage is None


def attempt(wants_usage: bool, started: bool) -> Attempt:
    state = RequestState(answered=started, status=200 if started else None)
    request: Any = None
    return Attempt("b", request, state, Clock(), Timeouts(), [], True, wants_usage, ())


@QUIET
@given(st.lists(st.sampled_from(EVENTS), max_size=12), st.booleans(), st.booleans())
def test_a_read_forwards_what_reading_every_event_would(
    events: list[bytes], wants_usage: bool, started: bool
) -> None:
    """The relay skips reading events after content (see `quiet_until`): what it forwards,
    the tokens it counts and whether it saw [DONE] are those of reading each event."""
    ex = attempt(wants_usage, started)
    block = b"".join(events)
    body, done = _take_events(block, ex)
    expected, usage = [], None
    for raw in split_events(block):
        event = classify(raw)
        usage = event.usage if event.usage is not None else usage
        if event.kind is Kind.USAGE and not wants_usage:
            continue
        if event.kind is Kind.COMMENT and not started and not expected:
            continue  # a comment would start the answer: dropped until an event has
        expected.append(raw)
        if event.kind is Kind.DONE:
            break  # what follows is not the client's, nor counted
    assert body == b"".join(expected)
    assert done == any(classify(raw).kind is Kind.DONE for raw in split_events(block))
    assert ex.state.completion_tokens == (usage or {}).get("completion_tokens")
