"""The proxy's `Transport` on aiohttp's client: a benchmark arm against the home-made pool.

aiohttp does the hard parts a hand-written pool must get right (llhttp, 1xx answers, size
limits, connection reuse); the question is what that costs per streamed event. This adapter
is as lean as a fair one can be: one `ClientSession` and `TCPConnector` for the process, no
cookie jar, no decompression, no headers of its own, bodies read with `readany()` (all that
has arrived), and raw header bytes passed through as they came.

Timeouts follow `proxy/upstream.py`: `connect` for the connection, `first_byte` for the
answer's head, and `Body.timeout` (set by the relay as a stream goes; by default `idle`)
between reads of the body. They are kept by aiohttp's own `sock_read` timer, which
it re-arms on every read from the socket: measured at 256 streams, 33 us of proxy CPU per
token against 36.5 us with a timer of ours around each wait (`asyncio.timeout`). Failures
are raised as the httpx exceptions the relay maps to 502/504.

    python scripts/bench_proxy.py --transport aiohttp serve --config routes.yaml
"""

from __future__ import annotations

import asyncio

import aiohttp
import httpx

from proxy.upstream import UpstreamRequest, UpstreamResponse, UpstreamTimeouts

# The pool's limits: no cap over all backends, and `limits.max_connections_per_backend`'s
# default per backend, beyond which a request waits for a connection to be free.
_LIMIT = 0
_LIMIT_PER_HOST = 1024


class AiohttpTransport:
    """`proxy.upstream.Transport` on one aiohttp `ClientSession`, made on first use (a
    session belongs to the event loop it was made in)."""

    def __init__(
        self,
        limit: int = _LIMIT,
        limit_per_host: int = _LIMIT_PER_HOST,
        max_response_body_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._limit, self._limit_per_host = limit, limit_per_host
        self._max_body = max_response_body_bytes
        self._session: aiohttp.ClientSession | None = None
        self._lingering: set[asyncio.Task[None]] = set()

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._limit, limit_per_host=self._limit_per_host, ttl_dns_cache=None
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            timeout=aiohttp.ClientTimeout(total=None),
            trust_env=False,
        )
        return self._session

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        endpoint, timeouts = request.endpoint, request.timeouts
        if endpoint.scheme != "http":
            raise httpx.UnsupportedProtocol(
                f"only http:// backends are supported, not {endpoint.url}"
            )
        session = self._session or self._open()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
        # sock_read: aiohttp's one timer per connection, re-armed on each read from the
        # socket; first `first_byte` (to the head), then the body's (see `_AiohttpBody.read`).
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeouts.connect, sock_read=timeouts.first_byte
        )
        try:
            response = await session.request(
                request.method.decode(),
                endpoint.url,
                headers=headers,
                data=request.body or None,
                timeout=timeout,
                allow_redirects=False,
                compress=None,
            )
        except aiohttp.ClientConnectorError as exc:
            where = f"{endpoint.host}:{endpoint.port}"
            raise httpx.ConnectError(f"{exc.strerror or exc} ({where})") from None
        except aiohttp.ConnectionTimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {endpoint.url} in time") from None
        except TimeoutError:
            raise httpx.ReadTimeout(f"no answer for {timeouts.first_byte:g} s") from None
        except aiohttp.ClientError as exc:
            raise _mapped(exc) from None
        body = _AiohttpBody(response, timeouts, self._lingering)
        body.limit = self._max_body
        return UpstreamResponse(response.status, list(response.raw_headers), body)

    async def aclose(self) -> None:
        for task in list(self._lingering):
            task.cancel()
        if self._session is not None:
            await self._session.close()


class _AiohttpBody:
    """An aiohttp response's body behind the proxy's `Body` protocol."""

    __slots__ = ("_armed", "_content", "_lingering", "_response", "limit", "timeout")

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        timeouts: UpstreamTimeouts,
        lingering: set[asyncio.Task[None]],
    ) -> None:
        self._response = response
        self._content = response.content
        self._lingering = lingering
        self.timeout: float | None = timeouts.idle
        self.limit: int | None = None  # the most `read_all` takes (set by the transport)
        self._armed: float | None = timeouts.first_byte  # aiohttp's sock_read timer

    async def read(self) -> bytes:
        try:
            if self.timeout != self._armed and self._response.connection is not None:
                protocol = self._response.connection.protocol
                if protocol is not None:
                    protocol.read_timeout = self._armed = self.timeout
                    # From now, not from the last read: aiohttp has no public way to say so.
                    protocol._reschedule_timeout()
            return await self._content.readany()
        except TimeoutError:
            raise httpx.ReadTimeout(f"no data for {self.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise _mapped(exc) from None

    def abort(self) -> None:
        self._response.close()

    async def aclose(self, linger: float = 0.0) -> None:
        response = self._response
        if self._content.at_eof():
            response.release()  # read to the end: the connection goes back to the pool
        elif linger:
            task = asyncio.ensure_future(_drain(response, linger))
            self._lingering.add(task)
            task.add_done_callback(self._lingering.discard)
        else:
            response.close()  # an unfinished answer: closing tells the backend to stop


async def _drain(response: aiohttp.ClientResponse, seconds: float) -> None:
    """Read and drop the rest of an answer for up to `seconds`, then keep the connection
    if it ended in time (see `UpstreamTransport.linger`)."""
    try:
        async with asyncio.timeout(seconds):
            while await response.content.readany():
                pass
    except (TimeoutError, aiohttp.ClientError):
        response.close()
    else:
        response.release()


def _mapped(exc: aiohttp.ClientError) -> httpx.TransportError:
    """The httpx exception that `proxy/relay.py` expects for an aiohttp failure."""
    if isinstance(exc, aiohttp.ClientOSError):
        return httpx.ReadError(str(exc) or type(exc).__name__)
    # ServerDisconnectedError, ClientPayloadError, ClientResponseError: a malformed or
    # cut-short answer.
    return httpx.RemoteProtocolError(str(exc) or type(exc).__name__)
