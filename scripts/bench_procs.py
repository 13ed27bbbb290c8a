"""The benchmarks' processes: starting, probing and stopping them, and what /proc says of
them (CPU seconds and resident memory, a process and its children together).

Shared by `bench_overhead.py` (throughput against an instant backend) and `bench_llm.py`
(paced streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
import time
from asyncio.subprocess import Process
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

Target = tuple[str, int]  # (host, port)


class ProtocolError(Exception):
    """The peer did not speak the HTTP we expected."""


class BenchError(Exception):
    """The benchmark cannot run (a process did not start); the message says why."""


def python() -> str:
    """The project's interpreter if there is one (the proxy's dependencies), else this one."""
    return str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ProtocolError(f"bad status line {lines[0]!r}")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(parts[1]), headers


async def close_writer(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), STOP_TIMEOUT_S)


async def get(target: Target, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """One GET on a connection of its own: (status, body)."""
    host, port = target
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            status, headers = await read_head(reader)
            length = headers.get("content-length")
            body = await (reader.readexactly(int(length)) if length else reader.read())
            return status, body
    finally:
        await close_writer(writer)


async def wait_healthy(target: Target, path: str, proc: Process | None = None) -> bool:
    deadline = time.perf_counter() + STARTUP_TIMEOUT_S
    while time.perf_counter() < deadline and (proc is None or proc.returncode is None):
        with contextlib.suppress(
            OSError, TimeoutError, ValueError, asyncio.IncompleteReadError, ProtocolError
        ):
            if (await get(target, path, 2.0))[0] == 200:
                return True
        await asyncio.sleep(0.1)
    return False


async def start_printing_port(args: list[str], log: Path, what: str) -> tuple[Process, int]:
    """Start a process that prints the port it listens on as its first line of stdout."""
    proc, ports = await start_printing_ports(args, log, what)
    return proc, ports[0]


async def start_printing_ports(args: list[str], log: Path, what: str) -> tuple[Process, list[int]]:
    """Start a process that prints the ports it listens on as its first line of stdout."""
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=stderr
        )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), STARTUP_TIMEOUT_S)
        ports = [int(port) for port in line.split()]
        if not ports:
            raise ValueError("no port")
        return proc, ports
    except (TimeoutError, ValueError):
        await stop(proc)
        raise BenchError(f"{what} did not start:\n{log.read_text()}") from None


async def start_server(
    args: list[str], port: int, log: Path, what: str, health: str = "/healthz"
) -> Process:
    """Start a server that listens on `port`, and wait until `health` answers 200."""
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(*args, cwd=REPO_ROOT, stdout=out, stderr=out)
    if not await wait_healthy((HOST, port), health, proc):
        await stop(proc)
        why = f"exited with code {proc.returncode}" if proc.returncode else "was not healthy"
        raise BenchError(f"{what} {why} within {STARTUP_TIMEOUT_S:.0f}s:\n{log.read_text()}")
    return proc


def proxy_config(
    tmp: Path, name: str, port: int, backend_port: int, model: str, replicas: Sequence[int] = ()
) -> Path:
    """A routes file for one proxy arm: everything to the one backend, its own log file.
    With `replicas` (ports), the backend is a fleet of them instead (docs/fleet.md)."""
    config = tmp / f"{name}.yaml"
    log = tmp / f"{name}.jsonl"
    servers = ", ".join(f"{{url: http://{HOST}:{p}}}" for p in replicas)
    backend = f"{{replicas: [{servers}]}}" if replicas else f"{{url: http://{HOST}:{backend_port}}}"
    config.write_text(
        f"listen: {{host: {HOST}, port: {port}}}\nmodel: {model}\n"
        f"backends:\n  baseline: {backend}\n"
        "routing:\n  split: {baseline: 100}\n"
        f'logging: {{path: "{log}", stdout: false}}\n'
    )
    return config


NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_requests 100000;
    upstream backend {{
        server {host}:{backend_port};
        keepalive 1024;
        keepalive_requests 100000;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        location = /healthz {{ return 200 "ok"; }}
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def nginx_command(tmp: Path, port: int, backend_port: int) -> list[str] | None:
    """nginx in the foreground on loopback, one worker, no buffering, keep-alive upstream
    (its own config in `tmp`); None if nginx is not installed."""
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if nginx is None:
        return None
    conf = tmp / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers write to `tmp`, 0700
    conf.write_text(
        NGINX_CONF.format(user=user, tmp=tmp, host=HOST, port=port, backend_port=backend_port)
    )
    return [nginx, "-p", str(tmp), "-c", str(conf)]


async def stop(proc: Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)


# ---------------------------------------------------------------- /proc


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (nginx: the master and its worker)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(entry.path, "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(node := todo.pop())
        todo.extend(children.get(node, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes, in seconds (a process gone counts 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
    return total / _TICK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    return total


def loadavg() -> float:
    """The 1-minute load average: how busy the shared machine was."""
    return float(Path("/proc/loadavg").read_text().split()[0])
