"""The floor for a Python proxy on this machine: a relay that does nothing but relay.

Raw asyncio and httptools on both sides, uvloop, one keep-alive connection pool: each
request's bytes go to the backend as they came (its head rewritten only for Host), and
each answer's bytes go back as they arrive, framing included. No JSON, no routing, no
timeouts, no log, no metrics. Whatever a real proxy keeps of direct throughput, this keeps
more: `scripts/bench_overhead.py --floor` runs it in the proxy's place, so the proxy's
figures can be read against what any Python relay can reach on the same cores.

    python scripts/relay_floor.py --port 8300 --backend 127.0.0.1:8301

Not for use in front of anything real: it trusts the backend and the client completely.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import httptools
import uvloop


class _Upstream(asyncio.Protocol):
    """A keep-alive connection to the backend, lent to one client request at a time."""

    def __init__(self, pool: list[_Upstream]) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: _Client | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.client is not None:
            self.client.transport.write(data)  # as it came, chunked framing and all
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.client = None
        if self.parser.should_keep_alive():
            self.pool.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None:  # a close-delimited answer ends here
            self.client.transport.close()


class _Client(asyncio.Protocol):
    def __init__(self, backend: tuple[str, int], pool: list[_Upstream]) -> None:
        self.backend, self.pool = backend, pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.request: list[bytes] = []
        self.forwarding: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.request = []

    def on_url(self, url: bytes) -> None:
        self.request.append(self.parser.get_method() + b" " + url + b" HTTP/1.1\r\n")

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() != b"host":
            self.request.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        self.request.append(b"host: %s:%d\r\n\r\n" % (self.backend[0].encode(), self.backend[1]))

    def on_body(self, body: bytes) -> None:
        self.request.append(body)

    def on_message_complete(self) -> None:
        task = asyncio.ensure_future(self._forward(b"".join(self.request)))
        self.forwarding.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self.forwarding.discard)

    async def _forward(self, payload: bytes) -> None:
        if self.pool:
            upstream = self.pool.pop()
        else:
            loop = asyncio.get_running_loop()
            _, upstream = await loop.create_connection(lambda: _Upstream(self.pool), *self.backend)
        upstream.client = self
        assert upstream.transport is not None
        upstream.transport.write(payload)


async def serve(port: int, backend: tuple[str, int]) -> None:
    pool: list[_Upstream] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(backend, pool), "127.0.0.1", port)
    print(f"relay_floor: 127.0.0.1:{port} -> {backend[0]}:{backend[1]}", flush=True)
    await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--port", type=int, required=True, help="listen on 127.0.0.1:PORT")
    ap.add_argument("--backend", required=True, metavar="HOST:PORT", help="relay to it")
    args = ap.parse_args()
    host, _, port = args.backend.rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.port, (host, int(port))))


if __name__ == "__main__":
    main()
