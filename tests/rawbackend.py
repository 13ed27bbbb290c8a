"""A byte-level fake backend: it writes exactly the bytes a test gives, in the packets it
gives, on a real socket, in a thread of its own.

For each request it reads (a head and a Content-Length body), it asks the test's `script`
for the answer: a list of packets, each written and flushed on its own with a pause between
(so that each arrives as a read of its own), or `CLOSE` to hang up there. `completion(id)`
is a valid answer whose text names the request, so a test sees whose answer a client got.
GET requests (the proxy's health probes) are answered apart, and not recorded.
Packets in `after` go out on the connection once the answer is written, while it is idle.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.fakebackend import ServerThread

CLOSE = b""  # a packet that closes the connection instead
PAUSE_S = 0.05  # between packets: each arrives as a read of its own


@dataclass
class Request:
    connection: int  # which connection it came on, counted from 0
    request_id: str


@dataclass
class Answer:
    packets: list[bytes]
    after: list[bytes] = field(default_factory=list)  # sent once the connection is idle


Script = Callable[[int, str], Answer]  # (request index, its x-request-id) -> the answer


def completion_body(request_id: str, padding: int = 0) -> bytes:
    """A chat completion whose text names the request (and `padding` more characters)."""
    return json.dumps(
        {
            "id": "chatcmpl-raw",
            "object": "chat.completion",
            "created": 0,
            "model": "default_model",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {
                        "role": "assistant",
                        "content": f"answer for {request_id}" + "x" * padding,
                    },
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
        }
    ).encode()


def completion(request_id: str, padding: int = 0) -> bytes:
    """A whole keep-alive HTTP/1.1 answer for `request_id`, with its Content-Length."""
    body = completion_body(request_id, padding)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % len(body) + body


class RawBackend:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[Request] = []
        self.connections = 0
        self.hung_up = 0  # connections the proxy closed
        self._serving: ServerThread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RawBackend:
        self._serving = ServerThread(self._handle)
        self.port = self._serving.start()
        return self

    def stop(self) -> None:
        assert self._serving is not None
        self._serving.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = self.connections
        self.connections += 1
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers = _headers(head)
                await reader.readexactly(int(headers.get("content-length", "0")))
                if head.startswith(b"GET "):  # the proxy's health probe: not the test's
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                    continue
                request_id = headers.get("x-request-id", "")
                index = len(self.requests)
                self.requests.append(Request(connection, request_id))
                answer = self.script(index, request_id)
                if not await _write(writer, answer.packets):
                    return
                if answer.after:
                    await asyncio.sleep(PAUSE_S)  # the proxy has the answer: now it is idle
                    if not await _write(writer, answer.after):
                        return
        except (ConnectionError, asyncio.IncompleteReadError):
            self.hung_up += 1
        except asyncio.CancelledError:
            pass  # the test is over
        finally:
            writer.close()


async def _write(writer: asyncio.StreamWriter, packets: list[bytes]) -> bool:
    """Write each packet on its own; False if one was `CLOSE`."""
    for i, packet in enumerate(packets):
        if i:
            await asyncio.sleep(PAUSE_S)
        if packet == CLOSE:
            return False
        writer.write(packet)
        await writer.drain()
    return True


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    return {name.strip().lower(): value.strip() for name, value in pairs}
