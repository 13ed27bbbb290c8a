"""The LLM-shaped scenario of `bench_overhead.py --llm`: N concurrent streams paced like a
model (64 tokens 25 ms apart, 50 ms to the first), direct and through each arm, the arms
interleaved in rounds (the order reversed every other round), so drift on a shared machine
hits them alike. Every figure an arm adds is against the direct arm of the same round.

Arms: `direct` (client -> paced backend), `proxy` (`python -m proxy serve`: its own server,
its own pool), `uvicorn` (the same app under uvicorn), `nginx` (a C reverse proxy, one
worker, unbuffered, keep-alive upstream: what a proxy adds at the least) and `aiohttp` (the
proxy with `scripts/aiohttp_transport.py` in place of its pool).

Per arm and round, after the connections are open, each connection runs
`--per-connection` streams back to back, the connections starting evenly spread over one
stream's length: requests then arrive at the steady rate of N streams (N / 1.65 s), not in
bursts, and all N streams are under way from the end of the first stream's length until
the start of the last one's. Latency figures come from the streams that ran entirely in
that steady part (with 3 or more per connection: all but each connection's first and
last); CPU per stream and token from all of them. Measured: TTFT and total latency as the
client saw them; the arm's
CPU (utime + stime from /proc, with its children) and peak RSS (sampled every 100 ms) over
the window; the backend's and the load generator's own CPU and how late the backend's
timers ran; and, for the proxy arms, each request's logged `ttft_ms` and `decode_tps`
(matched by `x-request-id` in the arm's log file) against the client's TTFT and the pace
the backend really kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from asyncio.subprocess import Process
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_llm_report as bench_report
from bench_paced import Pace, Sample, StreamClient, chat_request
from bench_procs import (
    HOST,
    Target,
    cpu_seconds,
    free_port,
    get,
    loadavg,
    nginx_command,
    process_tree,
    proxy_config,
    python,
    rss_bytes,
    start_printing_ports,
    start_server,
    stop,
)

SCRIPTS = Path(__file__).resolve().parent
ARMS = ("direct", "proxy", "uvicorn", "nginx", "aiohttp")
MODEL = "bench-model"
REQUEST_TIMEOUT_S = 120.0
CONNECT_BATCH = 64  # connections opened at once: under any listen backlog
LOG_WAIT_S = 5.0  # for the proxy's log lines, written after the last byte went out
RSS_EVERY_S = 0.1


@dataclass
class Arm:
    """One way to reach the backend: where, which process to measure, where it logs."""

    name: str
    target: Target
    proc: Process | None = None
    log: Path | None = None  # the proxy's request log
    log_offset: int = 0
    pids: list[int] = field(default_factory=list)


@dataclass
class Window:
    """One arm's round: what the client saw and what the processes spent."""

    samples: list[Sample]
    steady: set[str]  # ids of the streams that ran while all N were under way
    seconds: float
    cpu: float  # the arm's processes (0 for direct)
    rss_peak: int
    backend_cpu: float
    client_cpu: float
    load: tuple[float, float]  # 1-minute load average before and after
    paces: dict[str, list[float]]  # request id -> [first to last token s, worst lateness s]
    logged: dict[str, dict[str, Any]]  # request id -> the proxy's request line


# ---------------------------------------------------------------- processes


async def start_arms(
    tmp: Path, backend_port: int, wanted: list[str], replicas: Sequence[int] = ()
) -> tuple[list[Arm], list[str]]:
    """The arms asked for, started and healthy; and notes on those that were skipped."""
    arms, notes = [], []
    for name in wanted:
        if name == "direct":
            arms.append(Arm(name, (HOST, backend_port)))
            continue
        port = free_port()
        if name == "nginx":
            command = nginx_command(tmp, port, backend_port)
            if command is None:
                notes.append("nginx arm skipped: nginx is not installed")
                continue
            proc = await start_server(command, port, tmp / "nginx.out", "nginx")
            arms.append(Arm(name, (HOST, port), proc))
            continue
        config = proxy_config(tmp, name, port, backend_port, MODEL, replicas)
        serve = ["serve", "--config", str(config), "--host", HOST, "--port", str(port)]
        if name == "proxy":
            command = [python(), "-m", "proxy", *serve]
        else:
            option = "--server=uvicorn" if name == "uvicorn" else "--transport=aiohttp"
            command = [python(), str(SCRIPTS / "bench_proxy.py"), option, *serve]
        proc = await start_server(command, port, tmp / f"{name}.out", f"the {name} arm")
        arms.append(Arm(name, (HOST, port), proc, tmp / f"{name}.jsonl"))
    for arm in arms:
        if arm.proc is not None:
            arm.pids = process_tree(arm.proc.pid)
    return arms, notes


# ---------------------------------------------------------------- one window


async def open_clients(target: Target, n: int) -> list[StreamClient]:
    loop = asyncio.get_running_loop()
    clients: list[StreamClient] = []
    for start in range(0, n, CONNECT_BATCH):
        batch = min(CONNECT_BATCH, n - start)
        made = await asyncio.gather(
            *(loop.create_connection(StreamClient, *target) for _ in range(batch))
        )
        clients += [protocol for _, protocol in made]
    return clients


async def drive(
    client: StreamClient, target: Target, requests: list[tuple[str, bytes]], delay: float
) -> list[Sample]:
    """One connection's streams, back to back, from `delay` seconds on."""
    await asyncio.sleep(delay)
    loop = asyncio.get_running_loop()
    samples = []
    for request_id, request in requests:
        try:
            if client.transport is None:  # the server closed it
                _, client = await loop.create_connection(StreamClient, *target)
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                sample = await client.send(request, request_id)
        except (OSError, TimeoutError) as exc:
            sample = Sample(request_id, time.perf_counter(), error=f"{type(exc).__name__}")
            client.close()
        samples.append(sample)
        if not sample.ok or not client.keep_alive:
            client.close()
    client.close()
    return samples


async def sample_rss(pids: list[int], peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], rss_bytes(pids))
        await asyncio.sleep(RSS_EVERY_S)


async def window(
    arm: Arm, backend: Process, n: int, tag: str, args: argparse.Namespace, pace: Pace
) -> Window:
    """Run n streams x per-connection through `arm`, measuring around them."""
    clients = await open_clients(arm.target, n)
    host, port = arm.target
    stagger = pace.ttft + pace.tokens * pace.gap  # one stream's length
    per = args.per_connection
    middle = range(1, per - 1) if per >= 3 else range(per)
    plans = [
        [
            (rid := f"{tag}-{i}-{k}", chat_request(host, port, rid, MODEL, pace.tokens))
            for k in range(per)
        ]
        for i in range(n)
    ]
    steady = {f"{tag}-{i}-{k}" for i in range(n) for k in middle}
    backend_pids = [backend.pid]
    load_before = loadavg()
    peak = [rss_bytes(arm.pids)]
    sampler = asyncio.ensure_future(sample_rss(arm.pids, peak))
    cpu0, backend0, client0 = cpu_seconds(arm.pids), cpu_seconds(backend_pids), time.process_time()
    started = time.perf_counter()
    done = await asyncio.gather(
        *(
            drive(c, arm.target, plan, stagger * i / n)
            for i, (c, plan) in enumerate(zip(clients, plans, strict=True))
        )
    )
    seconds = time.perf_counter() - started
    cpu = cpu_seconds(arm.pids) - cpu0
    backend_cpu = cpu_seconds(backend_pids) - backend0
    client_cpu = time.process_time() - client0
    sampler.cancel()
    samples = [s for batch in done for s in batch]
    status, body = await get(args.backend_target, "/bench/paces")
    paces = json.loads(body) if status == 200 else {}
    logged = await read_log(arm, {s.request_id for s in samples if s.ok})
    return Window(
        samples,
        steady,
        seconds,
        cpu,
        peak[0],
        backend_cpu,
        client_cpu,
        (load_before, loadavg()),
        paces,
        logged,
    )


async def read_log(arm: Arm, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The arm's request lines for these ids, waiting a little for the last ones."""
    if arm.log is None:
        return {}
    found: dict[str, dict[str, Any]] = {}
    deadline = time.perf_counter() + LOG_WAIT_S
    while True:
        with arm.log.open("rb") as f:
            f.seek(arm.log_offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        arm.log_offset += end
        for line in data[:end].splitlines():
            record = json.loads(line)
            if record.get("event") == "request" and record.get("request_id") in wanted:
                found[record["request_id"]] = record
        if len(found) >= len(wanted) or time.perf_counter() > deadline:
            return found
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- the run


async def run_streams(
    arms: list[Arm], backend: Process, n: int, args: argparse.Namespace, pace: Pace
) -> dict[str, list[Window]]:
    """Warm-up (not counted), then the rounds, for one number of streams."""
    for arm in arms:
        print(f"  N={n} warm-up {arm.name}", flush=True)
        await window(arm, backend, n, f"w{n}-{arm.name}", _warmup(args), pace)
    windows: dict[str, list[Window]] = {arm.name: [] for arm in arms}
    for rnd in range(args.rounds):
        for arm in arms if rnd % 2 == 0 else arms[::-1]:
            result = await window(arm, backend, n, f"r{rnd}-{n}-{arm.name}", args, pace)
            windows[arm.name].append(result)
            bad = sum(not s.ok for s in result.samples)
            print(
                f"  N={n} round {rnd + 1} {arm.name:<8} {result.seconds:5.1f}s"
                f"  errors {bad}  load {result.load[0]:.2f}->{result.load[1]:.2f}",
                flush=True,
            )
    return windows


def _warmup(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "per_connection": 1})


def meta(args: argparse.Namespace, pace: Pace) -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "streams": args.streams,
        "rounds": args.rounds,
        "per_connection": args.per_connection,
        "tokens": pace.tokens,
        "ttft_ms": pace.ttft * 1000,
        "gap_ms": pace.gap * 1000,
        "arms": args.arms,
        "replicas": args.replicas,
    }


async def bench_llm(args: argparse.Namespace) -> int:
    pace = Pace(args.tokens or 64, args.ttft_ms / 1000, args.gap_ms / 1000)
    info = meta(args, pace)
    print("bench_overhead --llm: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    procs: list[Process] = []
    results: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_llm_") as tmpdir:
        tmp = Path(tmpdir)
        try:
            command = [python(), str(SCRIPTS / "bench_paced.py"), "0", str(pace.tokens)]
            command += [str(args.ttft_ms), str(args.gap_ms), str(args.replicas)]
            backend, ports = await start_printing_ports(command, tmp / "paced.log", "paced backend")
            procs.append(backend)
            port = ports[0]
            args.backend_target = (HOST, port)
            # With --replicas N, the proxy arms see the backend as a fleet of N replicas.
            arms, notes = await start_arms(tmp, port, args.arms, ports if len(ports) > 1 else ())
            procs += [arm.proc for arm in arms if arm.proc is not None]
            for note in notes:
                print(note, flush=True)
            for n in args.streams:
                windows = await run_streams(arms, backend, n, args, pace)
                results[n] = bench_report.figures(windows, pace)
        finally:
            for proc in procs:
                await stop(proc)
    report = {"meta": info, "notes": notes, "results": results}
    bench_report.print_llm(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def parse_arms(text: str) -> list[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    if unknown := sorted(set(arms) - set(ARMS)):
        raise argparse.ArgumentTypeError(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    if "direct" not in arms:
        arms.insert(0, "direct")  # every figure is relative to it
    return arms


def parse_streams(text: str) -> list[int]:
    try:
        streams = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers like 64,256") from None
    if not streams or min(streams) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: each number of streams must be >= 1")
    return streams
