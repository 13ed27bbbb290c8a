"""Measure the latency and throughput the proxy adds on top of a backend.

Two kinds of load. `--llm` is the one the proxy exists for: N concurrent streams paced like
a model, through the proxy and reference arms (nginx, uvicorn, the aiohttp client), with
the proxy's CPU per streamed token and its logged figures against the client's: see
`bench_llm.py`. Without it, the scenarios below measure requests per second against an
instant backend: what the proxy costs per request at its limit.

Three processes: a fake OpenAI backend, the proxy in front of it, and this script as the load
generator. Each scenario (non-stream / stream, concurrency 1 / 16) runs in interleaved rounds
against the backend directly and through the proxy, so slow drift on a noisy machine hits both
arms alike; the report gives the proxy arm as a ratio of, and an added delta over, the direct
arm rather than as absolute figures.

The fake backend and the load generator are raw asyncio (a Protocol server, a streams client
speaking just enough HTTP/1.1 keep-alive). A web framework on either side would cost about as
much CPU per request as the proxy itself, and the direct arm would then measure the framework
instead of a baseline. All three share the machine's CPUs, so the direct arm's req/s is the
most this client gets from a free backend: the ratio says how much of that is left through the
proxy, not the proxy's capacity on a dedicated core.

The fake answers `POST /v1/chat/completions` (JSON, or SSE over chunked transfer encoding) and
`GET /health` (and `/healthz`, so a second fake can stand in for the proxy via `--proxy-url`).

    python scripts/bench_overhead.py                       # start fake + proxy, run, report
    python scripts/bench_overhead.py --proxy-url http://127.0.0.1:8000 --json out.json
    python scripts/bench_overhead.py --serve-fake 9000     # only the fake backend
    python scripts/bench_overhead.py --floor               # a bare relay in its place
    python scripts/bench_overhead.py --llm                 # paced streams, N=64,256,1024
    python scripts/bench_overhead.py --llm --streams 256 --arms proxy,aiohttp --rounds 6
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import re
import signal
import sys
import tempfile
import time
from asyncio.subprocess import Process
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import bench_llm
import uvloop
from bench_procs import (
    HOST,
    BenchError,
    ProtocolError,
    Target,
    close_writer,
    free_port,
    proxy_config,
    python,
    read_head,
    start_printing_port,
    start_server,
    stop,
    wait_healthy,
)

MODEL = "bench-model"
SCENARIOS = (
    ("non-stream c=1", False, 1),
    ("stream c=1", True, 1),
    ("non-stream c=16", False, 16),
    ("stream c=16", True, 16),
)
PROMPT_TOKENS = 24
REQUEST_TIMEOUT_S = 30.0
# A content delta with non-empty text, matched in a chunk plus the tail of the previous one.
CONTENT_RE = re.compile(rb'"content":\s*"[^"]')
DONE_MARK = b"data: [DONE]"
TAIL_BYTES = 64


# ---------------------------------------------------------------- fake backend (server side)


def _chunk_json(model: str, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _usage(tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": tokens,
        "total_tokens": PROMPT_TOKENS + tokens,
    }


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(obj: Any) -> bytes:
    return _http_chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


@functools.lru_cache(maxsize=64)
def stream_frames(model: str, tokens: int, usage: bool) -> tuple[bytes, ...]:
    """Every write of one streamed answer, already in chunked transfer encoding."""
    frames = [_sse(_chunk_json(model, {"role": "assistant", "content": ""}, None))]
    frames += [_sse(_chunk_json(model, {"content": "tok "}, None))] * tokens
    frames.append(_sse(_chunk_json(model, {}, "stop")))
    if usage:
        usage_chunk = {**_chunk_json(model, {}, None), "choices": [], "usage": _usage(tokens)}
        frames.append(_sse(usage_chunk))
    frames += [_http_chunk(DONE_MARK + b"\n\n"), b"0\r\n\r\n"]
    return tuple(frames)


@functools.lru_cache(maxsize=64)
def completion_body(model: str, tokens: int) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "system_fingerprint": "fp_bench",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "tok " * tokens,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(tokens),
    }
    return json.dumps(body, separators=(",", ":")).encode()


def response_head(status: str, ctype: str, length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n{framing}\r\nConnection: keep-alive\r\n\r\n"
    ).encode()


def parse_request(buf: bytearray) -> tuple[str, str, bytes, bool, int] | None:
    """(method, path, body, keep_alive, bytes used) of the first full request in buf, or None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    method, path, _version = lines[0].split(" ", 2)
    headers = dict(line.lower().split(":", 1) for line in lines[1:] if ":" in line)
    length = int(headers.get("content-length", "0"))
    if len(buf) < end + 4 + length:
        return None
    keep_alive = headers.get("connection", "").strip() != "close"
    return method, path, bytes(buf[end + 4 : end + 4 + length]), keep_alive, end + 4 + length


class FakeBackend(asyncio.Protocol):
    """One keep-alive connection; requests are answered in order, one at a time."""

    def __init__(self, tokens: int, token_delay: float) -> None:
        self.tokens, self.token_delay = tokens, token_delay
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.process()

    def process(self, _done: object = None) -> None:
        """Answer each complete request in the buffer; pause while a stream is being written."""
        self.busy = None
        while self.busy is None and self.transport and not self.transport.is_closing():
            try:
                request = parse_request(self.buf)
                if request is None:
                    return
                del self.buf[: request[4]]
                self.answer(*request[:4])
            except (ValueError, AttributeError):  # not HTTP, or a body that is not a JSON object
                self.transport.close()

    def answer(self, method: str, path: str, body: bytes, keep_alive: bool) -> None:
        assert self.transport is not None
        if method == "GET" and path in ("/health", "/healthz"):
            self.reply("200 OK", "application/json", b'{"status":"ok"}')
        elif method == "POST" and path == "/v1/chat/completions":
            req = json.loads(body or b"{}")
            model = str(req.get("model", MODEL))
            if req.get("stream"):
                usage = bool((req.get("stream_options") or {}).get("include_usage"))
                frames = stream_frames(model, self.tokens, usage)
                self.busy = asyncio.get_running_loop().create_task(self.stream(frames, keep_alive))
                self.busy.add_done_callback(self.process)
                return
            self.reply("200 OK", "application/json", completion_body(model, self.tokens))
        else:
            self.reply("404 Not Found", "text/plain", b"not found")
        if not keep_alive:
            self.transport.close()

    def reply(self, status: str, ctype: str, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(response_head(status, ctype, len(body)) + body)

    async def stream(self, frames: tuple[bytes, ...], keep_alive: bool) -> None:
        assert self.transport is not None
        self.transport.write(response_head("200 OK", "text/event-stream", None))
        for frame in frames:  # one write per SSE event
            if self.transport.is_closing():
                return
            self.transport.write(frame)
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
        if not keep_alive:
            self.transport.close()


async def serve_fake(port: int, tokens: int, token_delay: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FakeBackend(tokens, token_delay), HOST, port)
    print(server.sockets[0].getsockname()[1], flush=True)  # the parent waits for this line
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------- load generator (client side)


@dataclass
class ArmResult:
    """Pooled samples of one arm (direct or proxy) in one scenario."""

    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)


def build_request(target: Target, stream: bool, tokens: int) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": stream,
        "messages": [
            {"role": "system", "content": "You are a terse benchmarking assistant."},
            {"role": "user", "content": "Count from one to sixteen, one word each."},
        ],
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    data = json.dumps(body).encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {target[0]}:{target[1]}\r\n"
        f"Content-Type: application/json\r\nAccept: */*\r\nContent-Length: {len(data)}\r\n"
        "\r\n"
    ).encode() + data


async def read_chunks(reader: asyncio.StreamReader, t0: float) -> tuple[float | None, bool]:
    """Consume a chunked body; return (time of first non-empty content, saw [DONE])."""
    ttft: float | None = None
    tail = b""
    done = False
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return ttft, done
        data = (await reader.readexactly(size + 2))[:-2]
        window = tail + data
        if ttft is None and CONTENT_RE.search(window):
            ttft = time.perf_counter() - t0
        done = done or DONE_MARK in window
        tail = window[-TAIL_BYTES:]


async def one_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, stream: bool
) -> tuple[float, float, bool]:
    """Send one request, read the whole answer: (ttft, total, connection reusable)."""
    t0 = time.perf_counter()
    writer.write(request)
    status, headers = await read_head(reader)
    head_time = time.perf_counter() - t0
    content_ttft, done = None, False
    if headers.get("transfer-encoding", "").lower() == "chunked":
        content_ttft, done = await read_chunks(reader, t0)
    elif "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    else:
        raise ProtocolError("response has neither Content-Length nor chunked encoding")
    total = time.perf_counter() - t0
    if status != 200:
        raise ProtocolError(f"status {status}")
    reusable = headers.get("connection", "").lower() != "close"
    if not stream:
        return head_time, total, reusable
    if content_ttft is None or not done:
        raise ProtocolError("stream without content delta or without data: [DONE]")
    return content_ttft, total, reusable


async def worker(
    target: Target, request: bytes, stream: bool, deadline: float, result: ArmResult
) -> None:
    """One connection sending requests back to back until the deadline."""
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while time.perf_counter() < deadline:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                if conn is None:
                    conn = await asyncio.open_connection(*target)
                ttft, total, reusable = await one_request(*conn, request, stream)
        except (
            OSError,
            TimeoutError,
            ValueError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ProtocolError,
        ):
            result.errors += 1
            reusable = False
        else:
            result.requests += 1
            result.ttft.append(ttft)
            result.total.append(total)
        if not reusable and conn is not None:
            await close_writer(conn[1])
            conn = None
    await close_writer(conn[1] if conn else None)


async def run_load(
    target: Target, stream: bool, conc: int, seconds: float, tokens: int, result: ArmResult
) -> None:
    request = build_request(target, stream, tokens)
    start = time.perf_counter()
    await asyncio.gather(
        *(worker(target, request, stream, start + seconds, result) for _ in range(conc))
    )
    result.seconds += time.perf_counter() - start  # includes the last in-flight requests


# ---------------------------------------------------------------- processes


async def start_fake(tokens: int, token_delay_ms: float, log: Path) -> tuple[Process, int]:
    command = [sys.executable, __file__, "--serve-fake", "0", "--tokens", str(tokens)]
    command += ["--token-delay-ms", str(token_delay_ms)]
    return await start_printing_port(command, log, "fake backend")


async def start_proxy(tmp: Path, fake_port: int) -> tuple[Process, int]:
    port = free_port()
    config = proxy_config(tmp, "requests", port, fake_port, MODEL)
    serve = ["serve", "--config", str(config), "--host", HOST, "--port", str(port)]
    command = [python(), "-m", "proxy", *serve]
    return await start_server(command, port, tmp / "proxy.log", "proxy"), port


async def start_floor(tmp: Path, fake_port: int) -> tuple[Process, int]:
    """scripts/relay_floor.py in the proxy's place: what any Python relay keeps."""
    port = free_port()
    floor = str(Path(__file__).with_name("relay_floor.py"))
    command = [sys.executable, floor, "--port", str(port), "--backend", f"{HOST}:{fake_port}"]
    return await start_server(command, port, tmp / "relay_floor.log", "relay_floor"), port


# ---------------------------------------------------------------- measurement and report


def percentile(values: list[float], pct: float) -> float:
    """Linear-interpolated percentile in ms (NaN without samples)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * pct / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return 1000 * (ordered[low] + (ordered[high] - ordered[low]) * (pos - low))


def summarize(arm: ArmResult) -> dict[str, float]:
    return {
        "requests": arm.requests,
        "errors": arm.errors,
        "seconds": arm.seconds,
        "rps": arm.requests / arm.seconds if arm.seconds else 0.0,
        **{
            f"{kind}_p{p}_ms": percentile(getattr(arm, kind), p)
            for kind in ("ttft", "total")
            for p in (50, 99)
        },
    }


async def run_scenario(
    targets: dict[str, Target], stream: bool, conc: int, args: argparse.Namespace
) -> dict[str, ArmResult]:
    for target in targets.values():  # warm-up: connections, pools, caches; samples dropped
        await run_load(target, stream, conc, args.warmup, args.tokens, ArmResult())
    arms = {arm: ArmResult() for arm in targets}
    for rnd in range(args.rounds):  # alternate the order too, so neither arm always goes first
        for arm in list(targets) if rnd % 2 == 0 else list(targets)[::-1]:
            await run_load(targets[arm], stream, conc, args.seconds, args.tokens, arms[arm])
    return arms


def scenario_record(
    name: str, stream: bool, conc: int, arms: dict[str, ArmResult]
) -> dict[str, Any]:
    direct, proxy = summarize(arms["direct"]), summarize(arms["proxy"])
    ratio = proxy["rps"] / direct["rps"] if direct["rps"] else float("nan")
    added = {key: proxy[key] - direct[key] for key in direct if key.endswith("_ms")}
    return {
        "scenario": name,
        "stream": stream,
        "concurrency": conc,
        "direct": direct,
        "proxy": proxy,
        "throughput_ratio": ratio,
        "added_ms": added,
    }


def print_report(records: list[dict[str, Any]]) -> None:
    print(
        f"\n{'scenario':<16}{'req/s direct':>14}{'req/s proxy':>13}{'ratio':>9}{'errors d/p':>12}"
    )
    for rec in records:
        d, p = rec["direct"], rec["proxy"]
        print(
            f"{rec['scenario']:<16}{d['rps']:>14.1f}{p['rps']:>13.1f}"
            f"{rec['throughput_ratio']:>9.1%}{d['errors']:>7}/{p['errors']}"
        )
    print(f"\n{'latency (ms)':<16}{'metric':<11}{'direct':>9}{'proxy':>9}{'added':>9}")
    for rec in records:
        for i, key in enumerate(("ttft_p50_ms", "ttft_p99_ms", "total_p50_ms", "total_p99_ms")):
            label = key.removesuffix("_ms").replace("_", " ").replace("ttft", "TTFT")
            print(
                f"{rec['scenario'] if i == 0 else '':<16}{label:<11}{rec['direct'][key]:>9.3f}"
                f"{rec['proxy'][key]:>9.3f}{rec['added_ms'][key]:>+9.3f}"
            )
    print("\nTTFT: first chunk with non-empty content for streams, response headers otherwise.")


def header(args: argparse.Namespace) -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "tokens": args.tokens,
        "token_delay_ms": args.token_delay_ms,
        "proxy_url": args.proxy_url or "(started by this script)",
        "floor": args.floor,
    }


async def bench(args: argparse.Namespace) -> None:
    meta = header(args)
    print("bench_overhead: " + ", ".join(f"{k}={v}" for k, v in meta.items()), flush=True)
    task = asyncio.current_task()
    if task is not None:  # SIGTERM unwinds like Ctrl-C, through the `finally` that stops children
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    procs: list[Process] = []
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmpdir:
        tmp = Path(tmpdir)
        try:
            fake, fake_port = await start_fake(args.tokens, args.token_delay_ms, tmp / "fake.log")
            procs.append(fake)
            if args.proxy_url:
                url = urlsplit(args.proxy_url)
                proxy_target = (url.hostname or HOST, url.port or 80)
                if not await wait_healthy(proxy_target, "/healthz"):
                    raise BenchError(f"{args.proxy_url}/healthz did not answer 200")
            else:
                start = start_floor if args.floor else start_proxy
                proxy, proxy_port = await start(tmp, fake_port)
                procs.append(proxy)
                proxy_target = (HOST, proxy_port)
            targets = {"direct": (HOST, fake_port), "proxy": proxy_target}
            names = [scenario[0] for scenario in SCENARIOS]
            for name, stream, conc in SCENARIOS:
                if args.only and (
                    args.only != name if args.only in names else args.only not in name
                ):
                    continue
                print(f"running {name} ...", flush=True)
                arms = await run_scenario(targets, stream, conc, args)
                records.append(scenario_record(name, stream, conc, arms))
        finally:
            for proc in procs:
                await stop(proc)
    print_report(records)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "scenarios": records}, indent=2))
        print(f"wrote {args.json}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, help="rounds per arm and scenario (default: 3; --llm: 2)")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of one round")
    ap.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per arm")
    ap.add_argument("--tokens", type=int, help="content chunks per answer (default: 16; --llm: 64)")
    ap.add_argument(
        "--token-delay-ms",
        type=float,
        default=0.0,
        help="fake backend sleep between stream chunks (default: none)",
    )
    ap.add_argument("--proxy-url", help="use this running proxy instead of starting one")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="measure scripts/relay_floor.py (a bare relay) in the proxy's place",
    )
    ap.add_argument("--json", metavar="FILE", help="also write all figures to FILE")
    ap.add_argument(
        "--only",
        metavar="TEXT",
        help="run only the scenario named TEXT, e.g. 'stream c=16', or those whose name"
        " contains it, e.g. 'c=16'",
    )
    ap.add_argument(
        "--serve-fake",
        type=int,
        metavar="PORT",
        help="only run the fake backend on PORT (0: any) and print the port",
    )
    llm = ap.add_argument_group(
        "LLM-shaped scenario", "paced streams through several arms: see scripts/bench_llm.py"
    )
    llm.add_argument("--llm", action="store_true", help="run it instead of the scenarios above")
    llm.add_argument(
        "--streams",
        type=bench_llm.parse_streams,
        default=[64, 256, 1024],
        help="concurrent streams, comma-separated (default: 64,256,1024)",
    )
    llm.add_argument(
        "--arms",
        type=bench_llm.parse_arms,
        default=list(bench_llm.ARMS),
        help=f"comma-separated, direct always included (default: {','.join(bench_llm.ARMS)})",
    )
    llm.add_argument(
        "--per-connection",
        type=int,
        default=3,
        help="streams per connection and round (3: the middle ones are timed)",
    )
    llm.add_argument("--ttft-ms", type=float, default=50.0, help="to the first token (50)")
    llm.add_argument("--gap-ms", type=float, default=25.0, help="between tokens (25)")
    llm.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="the proxy arms see the backend as a fleet of this many replicas (1)",
    )
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.llm else 3
    if args.tokens is None:
        args.tokens = 64 if args.llm else 16
    if min(args.rounds, args.tokens, args.per_connection, args.replicas) < 1:
        ap.error("--rounds, --tokens, --per-connection and --replicas must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    if args.serve_fake is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_fake(args.serve_fake, args.tokens, args.token_delay_ms / 1000))
        return
    try:
        if args.llm:
            uvloop.run(bench_llm.bench_llm(args))
        else:
            asyncio.run(bench(args))
    except BenchError as exc:
        sys.exit(f"bench_overhead: {exc}")
    except (KeyboardInterrupt, asyncio.CancelledError):  # children are already stopped
        sys.exit("bench_overhead: interrupted")


if __name__ == "__main__":
    main()
