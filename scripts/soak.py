"""Soak test: hold the proxy under steady streaming load for minutes, and check it holds up.

Starts fake mlx_lm.server backends (the raw-asyncio fake of scripts/bench_overhead.py, one
process each, split evenly), the real proxy in front of them (`python -m proxy serve`, as a
subprocess, logging to a temporary directory), and --clients streaming clients that each send
chat completions back to back for --minutes. Then it checks that:

- no request failed: HTTP 200, `x-request-id` (each request sends its own `X-Request-Id`)
  and `x-backend` headers, at least one content delta, the stream ending with `data: [DONE]`;
- the proxy's request log has exactly one line per request sent, matched by request id, and
  every one of them has status 200 and error null;
- the proxy's resident memory grew by at most --max-rss-growth-mb from the end of the
  warm-up to the end of the run.

Progress lines (every --progress-every seconds) go to stderr, the summary to stdout.

    python scripts/soak.py                                # 64 clients for 10 minutes
    python scripts/soak.py --minutes 1 --clients 64 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from asyncio.subprocess import Process
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Sibling scripts (sys.path[0] is scripts/ when this runs as a file): bench_overhead's fake
# backend, so the soak and the benchmark use the same fake, and bench_procs' process and raw
# HTTP helpers.
import bench_overhead as bench
import bench_procs as procs
import psutil

EPILOG = """\
exit codes: 0 every check passed; 1 a check failed (the reasons are printed);
            2 the soak could not run (a process did not start); 130 interrupted"""

HOST = procs.HOST
MODEL = "soak-model"
BACKEND_NAMES = ("baseline", "speculative")
SAMPLE_EVERY_S = 1.0  # RSS sampling; progress is printed less often
ERROR_PAUSE_S = 0.1  # after a failed request, so a dead proxy is not hammered in a tight loop
LOG_POLL_S = 0.1
MB = 1024 * 1024
DETAIL_CHARS = 200


class SoakError(Exception):
    """The soak cannot run (a process did not start); the message says why."""


class Failed(Exception):
    """One request got an unexpected answer; `kind` is what the summary counts it under."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail


# ---------------------------------------------------------------- the load


@dataclass
class Tally:
    """What the clients saw, shared by all of them (one event loop, so no locks)."""

    sent: set[str] = field(default_factory=set)  # request ids written to the proxy
    latencies: list[float] = field(default_factory=list)  # seconds, of the requests that passed
    backends: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # first detail of each error kind

    def passed(self, backend: str, seconds: float) -> None:
        self.backends[backend] += 1
        self.latencies.append(seconds)

    def failed(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        self.examples.setdefault(kind, " ".join(detail.split())[:DETAIL_CHARS])


@dataclass
class Run:
    """The clock of the load: clients stop at the deadline, or at once if it is aborted."""

    start: float
    deadline: float
    aborted: str | None = None

    def over(self) -> bool:
        return self.aborted is not None or time.perf_counter() >= self.deadline


def request_template(port: int, tokens: int) -> tuple[bytes, bytes]:
    """The request bytes before and after the request id, built once for every request."""
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Count from one to sixteen."}],
            "stream": True,
            "max_tokens": tokens,
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-Id: "
    )
    return head.encode(), b"\r\n\r\n" + body


async def read_stream(reader: asyncio.StreamReader) -> tuple[bool, bytes]:
    """Consume a chunked SSE body: (saw a content delta, the last bytes of the body)."""
    content, tail = False, b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return content, tail
        window = tail + (await reader.readexactly(size + 2))[:-2]
        content = content or bench.CONTENT_RE.search(window) is not None
        tail = window[-bench.TAIL_BYTES :]


async def read_error_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> str:
    length = int(headers.get("content-length", "0") or 0)
    if not 0 < length <= 65536:
        return ""
    return (await reader.readexactly(length)).decode("utf-8", "replace")


async def one_request(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes, rid: str
) -> tuple[str, bool]:
    """Send one streaming request, read the whole answer: (x-backend, connection reusable)."""
    reader, writer = conn
    writer.write(request)
    status, headers = await procs.read_head(reader)
    if status != 200:
        raise Failed(f"status {status}", await read_error_body(reader, headers))
    if headers.get("transfer-encoding", "").lower() != "chunked":
        raise Failed("stream not chunked", repr(headers))
    content, tail = await read_stream(reader)
    if headers.get("x-request-id") != rid:
        raise Failed("wrong x-request-id", f"sent {rid}, got {headers.get('x-request-id')}")
    backend = headers.get("x-backend")
    if not backend:
        raise Failed("no x-backend header")
    if not tail.rstrip().endswith(bench.DONE_MARK):
        raise Failed("stream did not end with [DONE]", tail.decode("utf-8", "replace"))
    if not content:
        raise Failed("stream without content")
    return backend, headers.get("connection", "").lower() != "close"


def classify(exc: BaseException, timeout: float) -> tuple[str, str]:
    """The error kind of a failed request, and its detail."""
    if isinstance(exc, Failed):
        return exc.kind, exc.detail
    if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
        return "timeout", f"no complete answer within {timeout:g} s"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed mid-answer", f"{len(exc.partial)} bytes of a read"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused", str(exc)
    if isinstance(exc, OSError):
        return "connection error", str(exc)
    return "protocol error", f"{type(exc).__name__}: {exc}"


async def client(
    target: procs.Target,
    template: tuple[bytes, bytes],
    prefix: str,
    run: Run,
    tally: Tally,
    timeout: float,
) -> None:
    """One keep-alive connection sending requests back to back until the run is over."""
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    number = 0
    while not run.over():
        rid, number = f"{prefix}-{number}", number + 1
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                if conn is None:
                    conn = await asyncio.open_connection(*target)
                tally.sent.add(rid)
                backend, reusable = await one_request(
                    conn, template[0] + rid.encode() + template[1], rid
                )
            tally.passed(backend, time.perf_counter() - t0)
        except (
            Failed,
            procs.ProtocolError,
            OSError,  # TimeoutError too
            ValueError,
            EOFError,
            asyncio.LimitOverrunError,
        ) as exc:
            tally.failed(*classify(exc, timeout))
            reusable = False
            await asyncio.sleep(ERROR_PAUSE_S)
        if not reusable and conn is not None:
            await procs.close_writer(conn[1])
            conn = None
    await procs.close_writer(conn[1] if conn else None)


# ---------------------------------------------------------------- the proxy's memory


@dataclass
class Rss:
    """The proxy's resident memory in MB: all samples, and the one at the end of warm-up."""

    samples: list[float] = field(default_factory=list)
    start: float | None = None
    end: float | None = None


def sample_rss(proc: Process) -> float | None:
    """The proxy's RSS in MB, or None once it has exited."""
    if proc.returncode is not None:
        return None
    try:
        return float(psutil.Process(proc.pid).memory_info().rss) / MB
    except psutil.Error:
        return None


async def watch(proc: Process, run: Run, tally: Tally, rss: Rss, args: argparse.Namespace) -> None:
    """Sample the proxy's RSS every second, print progress now and then, abort if it exits."""
    next_progress = run.start + args.progress_every
    last = (run.start, 0)  # (time, requests) at the previous progress line
    while not run.over():
        await asyncio.sleep(max(0.0, min(SAMPLE_EVERY_S, run.deadline - time.perf_counter())))
        now = time.perf_counter()
        mb = sample_rss(proc)
        if mb is None:
            run.aborted = f"the proxy exited during the run (code {proc.returncode})"
            return
        rss.samples.append(mb)
        if rss.start is None and now - run.start >= args.warmup:
            rss.start = mb
            last = progress("warm-up over", run.start, last, tally, rss)
        if now >= next_progress:
            last = progress("progress", run.start, last, tally, rss)
            next_progress += args.progress_every


def progress(
    label: str, start: float, last: tuple[float, int], tally: Tally, rss: Rss
) -> tuple[float, int]:
    """Print one progress line to stderr; return (time, requests) for the next one."""
    now, done = time.perf_counter(), len(tally.latencies)
    rate = (done - last[1]) / (now - last[0])
    growth = f" ({rss.samples[-1] - rss.start:+.1f})" if rss.start is not None else ""
    print(
        f"soak: {label}: {now - start:5.0f} s  {done} requests ({rate:.1f}/s since the last"
        f" line)  errors {sum(tally.errors.values())}  proxy RSS {rss.samples[-1]:.1f} MB{growth}",
        file=sys.stderr,
        flush=True,
    )
    return now, done


async def drive(
    proc: Process, port: int, args: argparse.Namespace
) -> tuple[Tally, Rss, float, str | None]:
    """Run the clients for the duration: (tally, rss, seconds, why the run was aborted)."""
    tally, rss = Tally(), Rss()
    start = time.perf_counter()
    run = Run(start, start + args.minutes * 60)
    template = request_template(port, args.tokens)
    run_id = os.urandom(4).hex()
    clients = [
        client((HOST, port), template, f"soak-{run_id}-{i}", run, tally, args.request_timeout)
        for i in range(args.clients)
    ]
    await asyncio.gather(watch(proc, run, tally, rss, args), *clients)
    seconds = time.perf_counter() - start  # includes the last in-flight requests
    rss.end = sample_rss(proc)
    if rss.end is not None:
        rss.samples.append(rss.end)
    return tally, rss, seconds, run.aborted


# ---------------------------------------------------------------- the request log


@dataclass
class RequestLog:
    """The proxy's log file, read incrementally; keeps (request_id, status, error) per line."""

    path: Path
    offset: int = 0
    lines: list[tuple[str | None, Any, Any]] = field(default_factory=list)
    malformed: int = 0

    def read_new(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as file:
            file.seek(self.offset)
            data = file.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        self.offset += end
        for raw in data[:end].splitlines():
            try:
                record = json.loads(raw)
            except ValueError:
                self.malformed += 1
                continue
            if isinstance(record, dict) and record.get("event") == "request":
                self.lines.append(
                    (record.get("request_id"), record.get("status"), record.get("error"))
                )

    async def wait_for(self, count: int, timeout: float) -> None:
        """Log lines are written after the last byte went out: wait until `count` landed."""
        deadline = time.perf_counter() + timeout
        self.read_new()
        while len(self.lines) < count and time.perf_counter() < deadline:
            await asyncio.sleep(LOG_POLL_S)
            self.read_new()

    def match(self, sent: set[str]) -> dict[str, int]:
        counts = Counter(rid for rid, _, _ in self.lines)
        per_sent = Counter(min(counts[rid], 2) for rid in sent)  # 0, 1, or 2 meaning "more"
        return {
            "lines": len(self.lines),
            "matched": per_sent[1],
            "missing": per_sent[0],
            "duplicated": per_sent[2],
            "extra": sum(n for rid, n in counts.items() if rid not in sent),
            "not_ok": sum(
                1
                for rid, status, error in self.lines
                if rid in sent and (status != 200 or error is not None)
            ),
            "malformed": self.malformed,
        }


# ---------------------------------------------------------------- processes


def split_shares(count: int) -> list[int]:
    """Whole percentages adding up to 100, as even as they come."""
    return [100 // count + (1 if i < 100 % count else 0) for i in range(count)]


def write_config(path: Path, backends: dict[str, int], log_path: Path, port: int) -> None:
    shares = split_shares(len(backends))
    split = ", ".join(f"{name}: {share}" for name, share in zip(backends, shares, strict=True))
    lines = [f"listen: {{host: {HOST}, port: {port}}}", f"model: {MODEL}", "backends:"]
    lines += [f"  {name}: {{url: 'http://{HOST}:{bport}'}}" for name, bport in backends.items()]
    lines += ["routing:", f"  split: {{{split}}}"]
    lines.append(f"logging: {{path: {json.dumps(str(log_path))}, stdout: false}}")
    path.write_text("\n".join(lines) + "\n")


def backend_names(count: int) -> list[str]:
    return [*BACKEND_NAMES[:count], *(f"backend{i + 1}" for i in range(2, count))]


async def start_backends(
    args: argparse.Namespace, tmp: Path, stack: contextlib.AsyncExitStack
) -> dict[str, int]:
    """Each fake backend in its own process, stopped when the stack closes: name -> port."""
    ports = {}
    for name in backend_names(args.backends):
        proc, port = await bench.start_fake(args.tokens, args.token_delay_ms, tmp / f"{name}.log")
        stack.push_async_callback(procs.stop, proc)
        ports[name] = port
    return ports


async def start_proxy(
    config: Path, port: int, out: Path, stack: contextlib.AsyncExitStack
) -> Process:
    """`python -m proxy serve` as a subprocess, stopped when the stack closes; once healthy."""
    with out.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "proxy", "serve", "--config", str(config)),
            *("--host", HOST, "--port", str(port)),
            cwd=procs.REPO_ROOT,
            stdout=sink,
            stderr=sink,
        )
    stack.push_async_callback(procs.stop, proc)
    if not await procs.wait_healthy((HOST, port), "/healthz", proc):
        why = (
            f"exited with code {proc.returncode}"
            if proc.returncode is not None
            else (f"did not answer GET /healthz within {procs.STARTUP_TIMEOUT_S:.0f} s")
        )
        tail = "\n".join(out.read_text(errors="replace").splitlines()[-20:])
        raise SoakError(f"the proxy {why}; the end of its output:\n{tail}")
    return proc


@contextlib.contextmanager
def workdir(path: str | None) -> Iterator[Path]:
    """The given directory (kept, its old request log removed), else a temporary one."""
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "requests.jsonl").unlink(missing_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="soak_") as tmp:
        yield Path(tmp)


# ---------------------------------------------------------------- the run and its verdict


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    task = asyncio.current_task()
    if task is not None:  # SIGTERM unwinds like Ctrl-C, through the stack that stops children
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with workdir(args.workdir) as tmp:
        log = RequestLog(tmp / "requests.jsonl")
        async with contextlib.AsyncExitStack() as stack:
            ports = await start_backends(args, tmp, stack)
            port = procs.free_port()
            write_config(tmp / "routes.yaml", ports, log.path, port)
            proxy = await start_proxy(tmp / "routes.yaml", port, tmp / "proxy.out", stack)
            announce(args, ports, proxy, port)
            tally, rss, seconds, aborted = await drive(proxy, port, args)
            await log.wait_for(len(tally.sent), args.log_wait)
        log.read_new()  # the proxy has stopped: whatever it wrote last is there now
        return summarize(
            args, tally, rss, seconds, log.match(tally.sent), proxy.returncode, aborted
        )


def announce(args: argparse.Namespace, ports: dict[str, int], proxy: Process, port: int) -> None:
    backends = ", ".join(f"{name} :{bport}" for name, bport in ports.items())
    print(
        f"soak: backends {backends}; proxy pid {proxy.pid} on :{port}; {args.clients} clients"
        f" for {args.minutes:g} min ({args.tokens} tokens, {args.token_delay_ms:g} ms apart)",
        file=sys.stderr,
        flush=True,
    )


def summarize(
    args: argparse.Namespace,
    tally: Tally,
    rss: Rss,
    seconds: float,
    log: dict[str, int],
    proxy_exit: int | None,
    aborted: str | None,
) -> dict[str, Any]:
    requests = len(tally.latencies)
    growth = rss.end - rss.start if rss.start is not None and rss.end is not None else None
    summary = {
        "duration_s": round(seconds, 2),
        "clients": args.clients,
        "requests": requests,
        "sent": len(tally.sent),
        "rps": round(requests / seconds, 1) if seconds else 0.0,
        "by_backend": dict(tally.backends),
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors),
        "error_examples": tally.examples,
        "log": log,
        "rss_mb": {
            "start": rounded(rss.start),
            "end": rounded(rss.end),
            "max": rounded(max(rss.samples, default=None)),
            "growth": rounded(growth),
            "limit": args.max_rss_growth_mb,
        },
        "latency_ms": {f"p{q}": latency_ms(tally.latencies, q) for q in (50, 99)},
        "proxy_exit_code": proxy_exit,
        "aborted": aborted,
    }
    summary["failures"] = failures(summary)
    summary["ok"] = not summary["failures"]
    return summary


def failures(summary: dict[str, Any]) -> list[str]:
    """Why the soak failed; empty when it passed."""
    reasons = [summary["aborted"]] if summary["aborted"] else []
    if summary["requests"] == 0:
        reasons.append("no request completed")
    if summary["errors"]:
        kinds = ", ".join(f"{kind} x{n}" for kind, n in summary["error_kinds"].items())
        reasons.append(f"{summary['errors']} unexpected errors ({kinds})")
    log = summary["log"]
    for key, what in (
        ("missing", "requests without a log line"),
        ("duplicated", "requests with more than one log line"),
        ("extra", "log lines for requests never sent"),
        ("not_ok", "log lines without status 200 and error null"),
        ("malformed", "log lines that are not JSON"),
    ):
        if log[key]:
            reasons.append(f"{log[key]} {what}")
    rss = summary["rss_mb"]
    if rss["start"] is None:
        reasons.append("proxy RSS not measured (the run ended before the warm-up did)")
    elif rss["end"] is None:
        reasons.append("proxy RSS at the end not measured (the proxy was not running)")
    elif rss["growth"] > rss["limit"]:
        reasons.append(f"proxy RSS grew by {rss['growth']:.1f} MB (limit {rss['limit']:g} MB)")
    return reasons


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def latency_ms(seconds: list[float], pct: float) -> float | None:
    return round(bench.percentile(seconds, pct), 1) if seconds else None


def mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} MB"


def ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def print_summary(summary: dict[str, Any]) -> None:
    log, rss, lat = summary["log"], summary["rss_mb"], summary["latency_ms"]
    split = ", ".join(f"{name} {n}" for name, n in sorted(summary["by_backend"].items()))
    growth = "n/a" if rss["growth"] is None else f"{rss['growth']:+.1f} MB"
    kinds = "".join(
        f"\n    {n} x {k}: {summary['error_examples'][k]}"
        for k, n in summary["error_kinds"].items()
    )
    print(
        f"soak: {summary['duration_s']:.1f} s, {summary['clients']} clients\n"
        f"  requests   {summary['requests']} ({summary['rps']:.1f}/s; {split or 'none'})\n"
        f"  errors     {summary['errors']}{kinds}\n"
        f"  log lines  {log['matched']} matched, {log['missing']} missing, "
        f"{log['duplicated']} duplicated, {log['extra']} extra, {log['not_ok']} not ok\n"
        f"  proxy RSS  start {mb(rss['start'])}, end {mb(rss['end'])}, max {mb(rss['max'])}, "
        f"growth {growth} (limit {rss['limit']:g} MB)\n"
        f"  latency    p50 {ms(lat['p50'])}, p99 {ms(lat['p99'])}\n"
        f"  proxy exit code {summary['proxy_exit_code']}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the load (default 10)")
    ap.add_argument("--clients", type=int, default=64, help="concurrent streaming clients (64)")
    ap.add_argument("--backends", type=int, default=2, help="fake backends, split evenly (2)")
    ap.add_argument("--tokens", type=int, default=16, help="content chunks per stream (16)")
    ap.add_argument(
        "--token-delay-ms",
        type=float,
        default=15.0,
        help="fake backend pause after each SSE event (15: a stream lasts about 0.3 s)",
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=5.0,
        help="seconds of load before the RSS baseline is taken (5; part of --minutes)",
    )
    ap.add_argument(
        "--max-rss-growth-mb",
        type=float,
        default=50.0,
        help="fail if the proxy's RSS grew more than this from warm-up to end (50)",
    )
    ap.add_argument(
        "--progress-every", type=float, default=30.0, help="seconds between progress lines (30)"
    )
    ap.add_argument("--request-timeout", type=float, default=30.0, help="seconds per request (30)")
    ap.add_argument(
        "--log-wait", type=float, default=10.0, help="seconds to wait for the last log lines (10)"
    )
    ap.add_argument(
        "--workdir",
        metavar="DIR",
        help="keep config and logs in DIR (default: a temporary directory)",
    )
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.backends < 1 or args.tokens < 1:
        ap.error("--clients, --backends and --tokens must be at least 1")
    if not 0 <= args.warmup < args.minutes * 60:
        ap.error("--warmup must be shorter than the run (--minutes)")
    if args.progress_every <= 0 or args.request_timeout <= 0 or args.log_wait < 0:
        ap.error("--progress-every and --request-timeout must be positive, --log-wait not negative")
    return args


def run_loop(args: argparse.Namespace) -> dict[str, Any]:
    try:  # the load generator's own overhead matters: uvloop when there is one
        import uvloop
    except ImportError:
        return asyncio.run(soak(args))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(soak(args))


def main() -> None:
    args = parse_args()
    try:
        summary = run_loop(args)
    except (SoakError, procs.BenchError) as exc:
        print(f"soak: cannot run: {exc}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, asyncio.CancelledError):  # children are already stopped
        print("soak: interrupted", file=sys.stderr)
        sys.exit(130)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    if summary["failures"]:
        print("soak: FAILED: " + "; ".join(summary["failures"]), file=sys.stderr)
        sys.exit(1)
    print("soak: OK", file=sys.stderr)


if __name__ == "__main__":
    main()
