"""The backend connection pool: keep-alive, body framings, failures, cancellation, and what
it must never trust: interim answers, stray bytes, oversized answers, unsafe requests; and
its cap on connections per backend."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import httpx
import pytest

from proxy import upstream
from proxy.upstream import (
    AnswerTooLargeError,
    Endpoint,
    UnsafeRequestError,
    UpstreamRequest,
    UpstreamTimeouts,
    UpstreamTransport,
)

pytestmark = pytest.mark.anyio

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Server:
    port: int
    connections: int = 0
    open: int = 0  # connections open now
    most: int = 0  # connections open at once, at most
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # a client hung up on us


@asynccontextmanager
async def serve(answer: Answer) -> AsyncIterator[Server]:
    """A raw TCP server that runs `answer` for each request on each connection."""
    state = Server(0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        state.open += 1
        state.most = max(state.most, state.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                await answer(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            state.closed.set()
        except asyncio.CancelledError:
            pass  # the test is over
        finally:
            state.open -= 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    async with server:
        yield state


def request(server: Server, read: float = 2.0) -> UpstreamRequest:
    endpoint = Endpoint.parse(f"http://127.0.0.1:{server.port}/v1/chat/completions")
    headers = [(b"host", endpoint.netloc), (b"content-length", b"2")]
    timeouts = UpstreamTimeouts(connect=2.0, first_byte=read, idle=read)
    return UpstreamRequest(b"POST", endpoint, headers, b"{}", timeouts)


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll `condition` on the loop, at most `seconds`."""
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.001)


async def fetch(transport: UpstreamTransport, req: UpstreamRequest) -> tuple[int, bytes]:
    response = await transport.send(req)
    try:
        return response.status, await response.read_all()
    finally:
        await response.aclose()


async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    await writer.drain()


async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A chunked answer that never ends."""
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    while True:
        writer.write(b"1\r\nx\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)


async def test_keep_alive_connection_is_reused() -> None:
    async with serve(keep_alive) as server:
        transport = UpstreamTransport()
        for _ in range(5):
            assert await fetch(transport, request(server)) == (200, b"hello")
        await transport.aclose()
    assert server.connections == 1


async def test_http10_close_delimited_body_is_read_to_the_end() -> None:
    async def http10(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        for i in range(3):
            writer.write(b"data: %d\n\n" % i)
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.close()

    async with serve(http10) as server:
        transport = UpstreamTransport()
        assert await fetch(transport, request(server)) == (
            200,
            b"data: 0\n\ndata: 1\n\ndata: 2\n\n",
        )
        assert await fetch(transport, request(server)) == (
            200,
            b"data: 0\n\ndata: 1\n\ndata: 2\n\n",
        )
        await transport.aclose()
    assert server.connections == 2  # HTTP/1.0: never reused


async def test_chunked_body() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        await writer.drain()

    async with serve(chunked) as server:
        transport = UpstreamTransport()
        assert await fetch(transport, request(server)) == (200, b"abcde")
        assert await fetch(transport, request(server)) == (200, b"abcde")
        await transport.aclose()
    assert server.connections == 1


async def test_body_cut_short_is_a_protocol_error() -> None:
    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()
        writer.close()

    async with serve(short) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="mid-answer"):
            await fetch(UpstreamTransport(), request(server))


async def test_stale_idle_connection_is_replaced_transparently() -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await keep_alive(reader, writer)
        writer.close()  # says keep-alive, then closes: the pool finds out on next use

    async with serve(once) as server:
        transport = UpstreamTransport()
        assert await fetch(transport, request(server)) == (200, b"hello")
        await asyncio.sleep(0.05)
        assert await fetch(transport, request(server)) == (200, b"hello")
        await transport.aclose()


async def test_refused_connection() -> None:
    async with serve(keep_alive) as server:
        port = server.port
    with pytest.raises(httpx.ConnectError):
        await fetch(UpstreamTransport(), request(Server(port)))


async def test_silence_past_the_read_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async with serve(silent) as server:
        with pytest.raises(httpx.ReadTimeout):
            await fetch(UpstreamTransport(), request(server, read=0.2))


async def test_cancelled_request_closes_its_connection() -> None:
    """A client that leaves while the backend prepares its answer frees the backend."""

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not await reader.read(1):  # "generating"; EOF means the proxy hung up
            raise ConnectionResetError

    async with serve(slow) as server:
        task = asyncio.ensure_future(fetch(UpstreamTransport(), request(server, read=10)))
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.wait_for(server.closed.wait(), 5.0)


async def test_unread_body_closes_the_connection_instead_of_pooling_it() -> None:
    async with serve(endless) as server:
        transport = UpstreamTransport()
        response = await transport.send(request(server))
        await response.body.aclose()
        await asyncio.wait_for(server.closed.wait(), 5.0)
        await transport.aclose()


async def test_a_big_unread_answer_does_not_stall_the_next_request() -> None:
    """A connection paused for back-pressure must not go back to the pool paused."""
    big = b"x" * 1_200_000

    async def large(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
        await writer.drain()

    async with serve(large) as server:
        transport = UpstreamTransport()
        response = await transport.send(request(server))
        await asyncio.sleep(0.2)  # all of it arrives, nobody reads it
        await response.body.aclose()
        status, body = await fetch(transport, request(server, read=2.0))
        assert (status, len(body)) == (200, len(big))
        await transport.aclose()


async def test_a_lingering_answer_that_ends_in_time_keeps_its_connection() -> None:
    """After [DONE] the relay lets the rest come by itself (`aclose(linger=)`): an answer
    that then ends is dropped unread, and its connection serves the next request."""

    async def tail(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nend\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)  # the rest comes late
        writer.write(b"4\r\nmore\r\n0\r\n\r\n")
        await writer.drain()

    async with serve(tail) as server:
        transport = UpstreamTransport()
        response = await transport.send(request(server))
        assert await response.body.read() == b"end"
        await response.aclose(linger=5.0)  # returns at once
        [origin] = transport._origins.values()
        await until(lambda: len(origin.idle) == 1)  # the rest came: back in the pool
        assert not server.closed.is_set()
        response = await transport.send(request(server))
        assert await response.read_all() == b"endmore"  # not a stale "more" from before
        await response.aclose()
        await transport.aclose()
    assert server.connections == 1


async def test_a_lingering_answer_that_does_not_end_in_time_is_closed() -> None:
    async with serve(endless) as server:
        transport = UpstreamTransport()
        response = await transport.send(request(server))
        await response.body.read()
        started = asyncio.get_running_loop().time()
        await response.aclose(linger=0.3)
        await asyncio.wait_for(server.closed.wait(), 2.0)
        assert asyncio.get_running_loop().time() - started >= 0.25
        await transport.aclose()


def counting(answers: Callable[[int], bytes | None]) -> Answer:
    """An answer per request, by its index across all connections (None: hang up)."""
    seen = [0]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index, seen[0] = seen[0], seen[0] + 1
        data = answers(index)
        if data is None:
            raise ConnectionResetError  # closes without answering
        writer.write(data)
        await writer.drain()

    return answer


def numbered(index: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(index)), index)


async def test_interim_answers_are_skipped_with_their_headers() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
    async with serve(counting(lambda i: interim + numbered(i))) as server:
        transport = UpstreamTransport()
        response = await transport.send(request(server))
        assert (response.status, response.header(b"link")) == (200, None)
        assert await response.read_all() == b"0"
        await response.aclose()
        assert await fetch(transport, request(server)) == (200, b"1")
        await transport.aclose()
    assert server.connections == 1


async def test_a_failed_pooled_connection_is_not_sent_again() -> None:
    """The backend may have read the request: a second copy could generate twice."""
    async with serve(counting(lambda i: None if i == 1 else numbered(i))) as server:
        transport = UpstreamTransport()
        assert await fetch(transport, request(server)) == (200, b"0")
        with pytest.raises(httpx.RemoteProtocolError, match="without answering"):
            await fetch(transport, request(server))
        assert await fetch(transport, request(server)) == (200, b"2")  # the next is fine
        await transport.aclose()
    assert server.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhelloJUNK",
            id="connection-close",
        ),
        pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhelloJUNK", id="http10"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\nJUNK",
            id="chunked-connection-close",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray",
            id="connection-close-then-an-answer",
        ),
    ],
)
async def test_bytes_after_a_whole_answer_that_closes_leave_it_whole(answer: bytes) -> None:
    """llhttp refuses any byte after a `Connection: close` (or HTTP/1.0) answer, in the same
    read as the answer: the answer was whole, so it stands; the bytes only close the
    connection, and the next request goes on a new one."""

    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)  # one write: one read on loopback, answer and bytes together
        await writer.drain()

    async with serve(once) as server:
        transport = UpstreamTransport()
        assert await fetch(transport, request(server)) == (200, b"hello")
        await asyncio.wait_for(server.closed.wait(), 5.0)  # the proxy hung up
        assert await fetch(transport, request(server)) == (200, b"hello")
        await transport.aclose()
    assert server.connections == 2


async def test_a_released_body_neither_reads_nor_aborts() -> None:
    """Once read to its end, a body's connection is the pool's again, here already serving
    the next request: a late `read` gets b"" (not the next answer's bytes), and a late
    `abort` closes nothing."""
    async with serve(counting(numbered)) as server:
        transport = UpstreamTransport()
        first = await transport.send(request(server))
        assert await first.read_all() == b"0"  # its end: released
        second = await transport.send(request(server))  # on the same connection
        assert await first.body.read() == b""
        first.body.abort()
        assert await second.read_all() == b"1"
        await second.aclose()
        assert await fetch(transport, request(server)) == (200, b"2")
        await transport.aclose()
    assert server.connections == 1


@pytest.mark.parametrize("cut", ["aclose", "abort"])
async def test_a_body_cut_short_does_not_read_as_whole_afterwards(cut: str) -> None:
    """A read after the body was closed before its end is the caller's bug: an error, not
    the b"" that says the answer was whole."""
    async with serve(endless) as server:
        transport = UpstreamTransport()
        response = await transport.send(request(server))
        assert await response.body.read()
        if cut == "abort":
            response.body.abort()
        else:
            await response.aclose()
        with pytest.raises(httpx.StreamClosed):
            await response.body.read()
        await transport.aclose()


async def test_a_connection_idle_too_long_is_closed_not_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream, "IDLE_FOR_S", 0.05)
    async with serve(counting(numbered)) as server:
        transport = UpstreamTransport()
        assert await fetch(transport, request(server)) == (200, b"0")
        await asyncio.sleep(0.1)  # time itself is what is tested
        assert await fetch(transport, request(server)) == (200, b"1")
        await asyncio.wait_for(server.closed.wait(), 5.0)  # the old one was closed
        await transport.aclose()
    assert server.connections == 2


async def test_stray_bytes_not_yet_read_on_an_idle_connection_close_it() -> None:
    """Bytes already in the socket, which the loop has not handed over yet, are seen before
    the connection is reused: they would be read as the next request's answer."""
    writers: list[asyncio.StreamWriter] = []

    async def remember(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        writer.write(numbered(len(writers) - 1))
        await writer.drain()

    async with serve(remember) as server:
        transport = UpstreamTransport()
        assert await fetch(transport, request(server)) == (200, b"0")
        writers[0].write(numbered(99))  # in the proxy's socket at once (loopback)
        await asyncio.sleep(0)  # not enough for the pool's loop to read it as well
        assert await fetch(transport, request(server)) == (200, b"1")
        await transport.aclose()
    assert server.connections == 2


async def test_unsafe_requests_are_never_sent() -> None:
    async with serve(keep_alive) as server:
        transport = UpstreamTransport()
        for name, value in [
            (b"x-a", b"1\r\nInjected: yes"),
            (b"x-a\n", b"1"),
            (b"x-a", b"1\x00"),
            (b"x-a", b"\r"),
        ]:
            req = request(server)
            req.headers.append((name, value))
            with pytest.raises(UnsafeRequestError, match="x-a"):
                await transport.send(req)
        req = request(server)
        req.endpoint = Endpoint.parse(req.endpoint.url + "?a=1%0d")
        req.endpoint = replace(req.endpoint, target=req.endpoint.target + b"\r\nX: y")
        with pytest.raises(UnsafeRequestError, match="request line"):
            await transport.send(req)
        assert await fetch(transport, request(server)) == (200, b"hello")
        await transport.aclose()
    assert server.connections == 1  # the unsafe ones went nowhere


async def test_a_body_over_the_limit_is_not_read_whole() -> None:
    announced = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"400\r\n%s\r\n" % (b"x" * 1024) * 5
        + b"0\r\n\r\n"
    )
    for answer, reason in [(announced, "announces 5000"), (chunked, "goes on")]:
        async with serve(counting(lambda i, a=answer: a)) as server:  # type: ignore[misc]
            transport = UpstreamTransport(max_response_body_bytes=4096)
            with pytest.raises(AnswerTooLargeError, match=reason):
                await fetch(transport, request(server))
            await asyncio.wait_for(server.closed.wait(), 5.0)  # the connection is closed
            await transport.aclose()


async def test_an_endless_head_is_cut_at_the_limit() -> None:
    async def endless_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        for _ in range(1000):  # 16 MB, if nobody stops it
            writer.write(b"a" * 16384)
            await writer.drain()

    async with serve(endless_head) as server:
        transport = UpstreamTransport(max_response_head_bytes=4096)
        with pytest.raises(AnswerTooLargeError, match="max_response_head_bytes"):
            await fetch(transport, request(server))
        await asyncio.wait_for(server.closed.wait(), 2.0)
        await transport.aclose()


def slow(seconds: float) -> Answer:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(seconds)
        await keep_alive(reader, writer)

    return answer


async def test_a_full_pool_serves_waiting_requests_in_arrival_order() -> None:
    order: list[int] = []

    async def one(transport: UpstreamTransport, server: Server, index: int) -> None:
        assert await fetch(transport, request(server)) == (200, b"hello")
        order.append(index)

    async with serve(slow(0.02)) as server:
        transport = UpstreamTransport(max_connections_per_backend=1)
        tasks = []
        for index in range(6):
            tasks.append(asyncio.ensure_future(one(transport, server, index)))
            await asyncio.sleep(0)  # each starts (and gets in line) before the next
        await asyncio.wait_for(asyncio.gather(*tasks), 5.0)
        await transport.aclose()
    assert (server.connections, server.most) == (1, 1)
    assert order == list(range(6))


@dataclass
class Held:
    """An answer held back until the test lets it go: no race with the clock."""

    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a request came
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.arrived.set()
        await self.release.wait()
        await keep_alive(reader, writer)


async def test_a_full_pool_times_out_as_a_connect_timeout() -> None:
    """The busy answer is held until the waiter has given up: waiting for it can only end
    in the connect timeout (0.2 s), never in the busy connection coming free."""
    held = Held()
    async with serve(held) as server:
        transport = UpstreamTransport(max_connections_per_backend=1)
        busy = asyncio.ensure_future(fetch(transport, request(server, read=10.0)))
        await asyncio.wait_for(held.arrived.wait(), 5.0)
        req = request(server)
        req.timeouts = UpstreamTimeouts(connect=0.2, first_byte=2.0, idle=2.0)
        started = asyncio.get_running_loop().time()
        with pytest.raises(httpx.ConnectTimeout, match="pool is full"):
            await asyncio.wait_for(fetch(transport, req), 10.0)
        assert 0.15 < asyncio.get_running_loop().time() - started < 5.0
        held.release.set()
        assert await asyncio.wait_for(busy, 5.0) == (200, b"hello")
        await transport.aclose()
    assert server.connections == 1


async def test_a_waiter_that_leaves_gives_its_turn_to_the_next() -> None:
    held = Held()
    async with serve(held) as server:
        transport = UpstreamTransport(max_connections_per_backend=1)
        first = asyncio.ensure_future(fetch(transport, request(server)))
        await asyncio.wait_for(held.arrived.wait(), 5.0)
        [origin] = transport._origins.values()
        leaving = asyncio.ensure_future(fetch(transport, request(server)))
        await until(lambda: len(origin.waiters) == 1)
        staying = asyncio.ensure_future(fetch(transport, request(server)))
        await until(lambda: len(origin.waiters) == 2)
        leaving.cancel()  # while the first still holds the one connection
        await until(lambda: len(origin.waiters) == 1)
        held.release.set()
        assert await asyncio.wait_for(first, 5.0) == (200, b"hello")
        assert await asyncio.wait_for(staying, 5.0) == (200, b"hello")
        assert leaving.cancelled()
        await transport.aclose()
    assert server.connections == 1


async def test_a_slot_freed_by_a_closed_connection_goes_to_the_next_in_line() -> None:
    async def http10(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nbye")
        await writer.drain()
        raise ConnectionResetError  # closes: no keep-alive

    async with serve(http10) as server:
        transport = UpstreamTransport(max_connections_per_backend=1)
        results = await asyncio.wait_for(
            asyncio.gather(*(fetch(transport, request(server)) for _ in range(4))), 5.0
        )
        assert results == [(200, b"bye")] * 4
        await transport.aclose()
    assert (server.connections, server.most) == (4, 1)


async def test_the_connection_cap_holds_under_churn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many requests on a small pool, some cancelled while waiting, some answers closing
    their connection: each one left is served, never more than the cap is open at once,
    and every slot is given back."""
    rng = random.Random(7)
    sockets = {"open": 0, "most": 0}  # the pool's side: from connection_made to _lost

    class Counted(upstream.BackendConnection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sockets["open"] += 1
            sockets["most"] = max(sockets["most"], sockets["open"])
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            sockets["open"] -= 1
            super().connection_lost(exc)

    monkeypatch.setattr(upstream, "BackendConnection", Counted)

    async def churn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(rng.uniform(0, 0.01))
        if rng.random() < 0.3:
            writer.write(b"HTTP/1.0 200 OK\r\n\r\nhello")  # then closes
            await writer.drain()
            raise ConnectionResetError
        await keep_alive(reader, writer)

    async with serve(churn) as server:
        transport = UpstreamTransport(max_connections_per_backend=3)
        tasks = [asyncio.ensure_future(fetch(transport, request(server))) for _ in range(60)]
        for task in rng.sample(tasks, 15):
            await asyncio.sleep(rng.uniform(0, 0.005))
            task.cancel()
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10.0)
        served = [result for result in done if not isinstance(result, BaseException)]
        assert served and all(result == (200, b"hello") for result in served)
        assert all(isinstance(r, asyncio.CancelledError) for r in done if r not in served)
        [origin] = transport._origins.values()
        assert not origin.waiters
        # Closed connections report their loss by callback: every slot comes back.
        await until(lambda: origin.open == len(origin.idle))
        await transport.aclose()
    assert sockets["most"] == 3 and server.connections > 3
