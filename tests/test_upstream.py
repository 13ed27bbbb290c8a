"""The backend connection pool: keep-alive, body framings, failures, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import pytest

from proxy.upstream import Endpoint, UpstreamRequest, UpstreamTimeouts, UpstreamTransport

pytestmark = pytest.mark.anyio

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Server:
    port: int
    connections: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # a client hung up on us


@asynccontextmanager
async def serve(answer: Answer) -> AsyncIterator[Server]:
    """A raw TCP server that runs `answer` for each request on each connection."""
    state = Server(0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
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
        await asyncio.wait_for(server.closed.wait(), 1.0)


async def test_unread_body_closes_the_connection_instead_of_pooling_it() -> None:
    async with serve(endless) as server:
        transport = UpstreamTransport()
        response = await transport.send(request(server))
        await response.body.aclose()
        await asyncio.wait_for(server.closed.wait(), 1.0)
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
        await response.aclose(linger=2.0)  # returns at once
        await asyncio.sleep(0.4)
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
