"""`specproxy serve --server uvicorn`: the same app under uvicorn, for TLS.

The proxy's own server (`proxy/server.py`) is the default and the faster one; uvicorn is
there for what it does and the own server does not, TLS above all (`--ssl-keyfile`,
`--ssl-certfile`), without a terminator in front. It runs in the proxy's own event loop
(uvloop), with uvicorn's httptools protocol; the CLI keeps its signal handling (graceful
shutdown, SIGHUP reload), the launched backends and the log, as with the own server.

What uvicorn 0.55 does not do that the own server does (read in its source, and tried):
no cap on a request head (a 4 MiB header is read and served), no timeout for a request
body or a head left half-sent, and an idle new connection is not closed (its keep-alive
timer starts after a first answer). Trailers of a chunked body would join the request's
headers there too: `_Protocol` drops them.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


@dataclass(frozen=True)
class Tls:
    """The server's certificate chain and key (PEM files); the key may be in `certfile`."""

    certfile: Path
    keyfile: Path | None = None


class _Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, but trailer fields do not join the request's headers.
    httptools reports a trailer as it does a header, and uvicorn appends both to the list
    that is the scope's `headers`, so a key or a routing header sent as a trailer would
    be seen by the checks that read them."""

    _in_body = False

    def on_message_begin(self) -> None:
        self._in_body = False
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_body:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._in_body = True


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the CLI's handlers call `shutdown`: uvicorn's own would replace them


class UvicornServer:
    """uvicorn serving `app`, with the surface of `proxy.server.Server` that the CLI uses."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        grace_seconds: float,
        keep_alive: float = 5.0,
        tls: Tls | None = None,
    ) -> None:
        config = uvicorn.Config(
            app,
            http=_Protocol,
            ws="none",
            lifespan="on",  # the lifespan builds the app's shared state
            interface="asgi3",
            log_level="warning",
            access_log=False,  # the proxy writes its own request log
            proxy_headers=False,  # the client is the peer, as under the own server
            server_header=False,
            timeout_keep_alive=keep_alive,  # type: ignore[arg-type]  # a float works
            # A float works too: it goes to asyncio.timeout.
            timeout_graceful_shutdown=grace_seconds,  # type: ignore[arg-type]
            ssl_certfile=tls.certfile if tls else None,
            ssl_keyfile=tls.keyfile if tls else None,
        )
        self._server = _Server(config)

    @property
    def started(self) -> bool:
        return self._server.started

    async def serve(self, sockets: list[socket.socket]) -> None:
        """Run the lifespan, serve until `shutdown()`, then drain (for up to the grace
        period, then cancel) and end the lifespan."""
        # uvicorn's way out when the lifespan fails is SystemExit: `started` says so.
        with contextlib.suppress(SystemExit):
            await self._server.serve(sockets=sockets)

    def shutdown(self, *, now: bool = False) -> None:
        self._server.should_exit = True
        if now:
            self._server.force_exit = True
