"""Starting, watching and stopping the backends that routes.yaml says to launch.

A backend counts as ready only when a real one-token completion answers: mlx_lm.server
answers `/health` before its model has loaded. Each backend runs in its own process group
with its output in its own log file; on Linux it also dies with the proxy, even a killed
one (PR_SET_PDEATHSIG), so nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import psutil

from proxy.accesslog import AccessLog
from proxy.config import Backend, Config, host_of, port_of

STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this
PROGRESS_EVERY_S = 5.0
MEMORY_EVERY_S = 10.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a backend up this long starts its restart backoff over


class LaunchError(Exception):
    """A launched backend could not be brought up; the message says which and why."""


def build_command(
    name: str, backend: Backend, python: str = sys.executable, url: str | None = None
) -> list[str]:
    """The command line that starts `backend`'s replica at `url` (default: its first),
    pure: no I/O."""
    launch = backend.launch
    if launch is None:
        raise ValueError(f"backend {name!r} has no launch block")
    url = url or backend.urls[0]
    host, port = host_of(url), str(port_of(url))
    if launch.command is not None:
        # Plain replacement, not str.format: arguments may hold JSON braces of their own.
        values = {"{host}": host, "{port}": port, "{python}": python}
        return [_fill(part, values) for part in launch.command]
    assert launch.model is not None
    command = [python, "-m", "mlx_lm.server", "--model", launch.model]
    command += ["--host", host, "--port", port]
    if launch.draft_model is not None:
        command += ["--draft-model", launch.draft_model]
        if launch.num_draft_tokens is not None:
            command += ["--num-draft-tokens", str(launch.num_draft_tokens)]
    return command + list(launch.extra_args)


def _fill(part: str, values: dict[str, str]) -> str:
    for placeholder, value in values.items():
        part = part.replace(placeholder, value)
    return part


def log_path(name: str, backend: Backend, log_dir: Path, index: int = 0) -> Path:
    """Where a launched replica's output goes: one file per replica (`-<index>` added
    when the backend has several)."""
    assert backend.launch is not None
    path = backend.launch.log or log_dir / f"{name}.log"
    if backend.launch.replicas == 1:
        return path
    return path.with_name(f"{path.stem}-{index}{path.suffix}")


@dataclass
class Managed:
    """One launched server (a backend's replica) and what is known about it."""

    name: str  # its backend
    url: str  # its replica's
    backend: Backend
    command: list[str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    restarts: int = 0
    rss_mb: float | None = None
    started_at: float = 0.0
    ready_at: float = 0.0
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    def status(self) -> dict[str, Any]:
        pid = self.process.pid if self.process is not None else None
        return {"pid": pid, "ready": self.ready, "restarts": self.restarts, "rss_mb": self.rss_mb}


class Supervisor:
    def __init__(
        self,
        config: Config,
        log: AccessLog,
        *,
        log_dir: Path = Path("logs/backends"),
        progress: IO[str] = sys.stderr,
    ):
        self._log = log
        self._progress = progress
        self._stopping = False
        self._sampler: asyncio.Task[None] | None = None
        # Every launched server, by backend name and replica URL.
        self.replicas = {
            (name, url): Managed(
                name,
                url,
                backend,
                build_command(name, backend, url=url),
                log_path(name, backend, log_dir, index),
            )
            for name, backend in config.backends.items()
            if backend.launch is not None
            for index, url in enumerate(backend.urls)
        }

    def managed(self, name: str) -> list[Managed]:
        """The servers launched for backend `name`, in replica order."""
        return [managed for (backend, _), managed in self.replicas.items() if backend == name]

    def loading(self, name: str, url: str) -> bool:
        """Whether `name`'s replica at `url` is launched and not serving yet (or again)."""
        managed = self.replicas.get((name, url))
        return managed is not None and not managed.ready

    async def start(self) -> None:
        """Start every backend in parallel and wait until all of them serve."""
        if not self.replicas:
            return
        started = time.perf_counter()
        self._say(f"starting {', '.join(self._names())} (logs in {self._log_dirs()})")
        waits = [asyncio.ensure_future(self._bring_up(m)) for m in self.replicas.values()]
        progress = asyncio.ensure_future(self._report_progress(started))
        try:
            await asyncio.gather(*waits)
        except BaseException:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            await self.stop()
            raise
        finally:
            progress.cancel()
        self._say(f"all backends ready in {time.perf_counter() - started:.1f} s")
        for managed in self.replicas.values():
            managed.watcher = asyncio.ensure_future(self._watch(managed))
            managed.watcher.add_done_callback(self._watcher_ended)
        self._sample_memory()  # at once, so that /healthz has a figure from the start
        self._sampler = asyncio.ensure_future(self._sample_memory_every(MEMORY_EVERY_S))

    def begin_stop(self) -> None:
        """No more restarts: the proxy is shutting down (called from the signal handler,
        as backends may get the same signal and must not be brought back meanwhile)."""
        self._stopping = True
        for task in [m.watcher for m in self.replicas.values()] + [self._sampler]:
            if task is not None:
                task.cancel()

    async def stop(self) -> None:
        """Stop every backend: SIGTERM to its process group, SIGKILL after a grace period."""
        self.begin_stop()
        await asyncio.gather(*(_terminate(m.process) for m in self.replicas.values()))
        for managed in self.replicas.values():
            managed.ready = False

    async def _bring_up(self, managed: Managed) -> None:
        launch = managed.backend.launch
        assert launch is not None
        _check_port_free(managed)
        try:
            managed.log_path.parent.mkdir(parents=True, exist_ok=True)
            with managed.log_path.open("ab") as output:
                output.write(
                    f"\n==> {time.strftime('%F %T')} {' '.join(managed.command)}\n".encode()
                )
                output.flush()
                managed.process = await asyncio.create_subprocess_exec(
                    *managed.command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=output,
                    stderr=asyncio.subprocess.STDOUT,
                    env={**os.environ, "HF_HUB_OFFLINE": "1", **launch.env},
                    start_new_session=True,  # its own process group: stopped as a whole
                    preexec_fn=_die_with_parent(os.getpid()),
                )
        except (OSError, subprocess.SubprocessError) as exc:
            raise LaunchError(
                f"backend {managed.name!r}: cannot start {managed.command[0]}: {exc}"
            ) from None
        managed.started_at = time.perf_counter()
        await self._wait_ready(managed, launch.startup_timeout)
        managed.ready = True
        managed.ready_at = time.perf_counter()
        startup_s = managed.ready_at - managed.started_at
        pid, url = managed.process.pid, managed.url
        self._say(f"{managed.name} ready in {startup_s:.1f} s (pid {pid}, {url})")
        self._log.event(
            "backend_ready",
            backend=managed.name,
            replica=managed.url,
            pid=managed.process.pid,
            startup_s=round(startup_s, 3),
        )

    async def _wait_ready(self, managed: Managed, timeout: float) -> None:
        """Poll with a real one-token completion until it answers 200. A 503 means "still
        loading" (llama.cpp's server says so); any other status is final."""
        assert managed.process is not None
        deadline = managed.started_at + timeout
        body = {
            "model": managed.backend.model,
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "Hello"}],
        }
        async with httpx.AsyncClient(trust_env=False) as client:
            while True:
                if managed.process.returncode is not None:
                    code = managed.process.returncode
                    raise LaunchError(self._failure(managed, f"exited with code {code}"))
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise LaunchError(
                        self._failure(managed, f"did not answer within {timeout:g} s")
                    )
                try:
                    response = await client.post(
                        managed.url + "/v1/chat/completions",
                        json=body,
                        timeout=httpx.Timeout(remaining, connect=1.0),
                    )
                except httpx.TransportError:  # not listening yet
                    await asyncio.sleep(0.25)
                    continue
                if response.status_code == 503:
                    await asyncio.sleep(0.25)
                    continue
                if response.status_code == 200 and managed.process.returncode is None:
                    return
                raise LaunchError(
                    self._failure(
                        managed,
                        f"answered its warm-up request with HTTP {response.status_code}: "
                        f"{response.text[:300]}",
                    )
                )

    async def _watch(self, managed: Managed) -> None:
        """Restart a backend that exits, with a growing pause between attempts."""
        backoff = 1.0
        while not self._stopping:
            assert managed.process is not None
            code = await managed.process.wait()
            managed.ready = False
            _kill_group(managed.process.pid)  # whatever it left behind in its group
            if time.perf_counter() - managed.ready_at > STABLE_AFTER_S:
                backoff = 1.0  # it had been up a good while: not a crash loop
            self._log.event(
                "backend_exit",
                backend=managed.name,
                replica=managed.url,
                returncode=code,
                restart_in_s=backoff,
                log=str(managed.log_path),
            )
            while not self._stopping:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                if self._stopping:
                    return
                managed.restarts += 1
                try:
                    await self._bring_up(managed)
                except LaunchError as exc:
                    await _terminate(managed.process)
                    self._log.event(
                        "backend_restart_failed",
                        backend=managed.name,
                        replica=managed.url,
                        error=str(exc).splitlines()[0],
                        retry_in_s=backoff,
                    )
                    continue
                self._log.event(
                    "backend_restarted",
                    backend=managed.name,
                    replica=managed.url,
                    restarts=managed.restarts,
                )
                break

    def _watcher_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._log.event("supervisor_error", error=repr(task.exception()))

    def _sample_memory(self) -> None:
        for managed in self.replicas.values():
            managed.rss_mb = _rss_mb(managed.process)
            if managed.rss_mb is not None:
                self._log.event(
                    "backend_memory",
                    backend=managed.name,
                    replica=managed.url,
                    rss_mb=managed.rss_mb,
                )

    async def _sample_memory_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            self._sample_memory()

    async def _report_progress(self, started: float) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            waiting = [_label(m) for m in self.replicas.values() if not m.ready]
            elapsed = time.perf_counter() - started
            self._say(f"loading {', '.join(waiting)} ... {elapsed:.0f} s")

    def _failure(self, managed: Managed, what: str) -> str:
        tail = _tail(managed.log_path)
        who = f"backend {managed.name!r}"
        if managed.backend.launch is not None and managed.backend.launch.replicas > 1:
            who += f" (replica {managed.url})"
        return f"{who} {what}; last lines of {managed.log_path}:\n{tail}"

    def _names(self) -> list[str]:
        return [_label(managed) for managed in self.replicas.values()]

    def _log_dirs(self) -> str:
        return ", ".join(sorted({str(m.log_path.parent) for m in self.replicas.values()}))

    def _say(self, line: str) -> None:
        print(f"specproxy: {line}", file=self._progress, flush=True)


async def _terminate(process: asyncio.subprocess.Process | None) -> None:
    """SIGTERM to the process group, SIGKILL after the grace period; then SIGKILL to what
    is left of the group (the children of a wrapper script, say)."""
    if process is None:
        return
    if process.returncode is None:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_S)
        except TimeoutError:
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()
    _kill_group(process.pid)


def _kill_group(pgid: int) -> None:
    _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _label(managed: Managed) -> str:
    """A launched server in progress messages: its backend, and its port if one of several."""
    launch = managed.backend.launch
    several = launch is not None and launch.replicas > 1
    return f"{managed.name}:{port_of(managed.url)}" if several else managed.name


def _check_port_free(managed: Managed) -> None:
    """Another server on the port would answer the readiness probe in our backend's place."""
    host, port = host_of(managed.url), port_of(managed.url)
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise LaunchError(
            f"backend {managed.name!r}: {host}:{port} is already in use ({exc.strerror}); "
            "is a backend from an earlier run still there?"
        ) from None


def _rss_mb(process: asyncio.subprocess.Process | None) -> float | None:
    """Resident memory of the backend and its children, in MiB."""
    if process is None or process.returncode is not None:
        return None
    try:
        root = psutil.Process(process.pid)
        total: int = root.memory_info().rss + sum(
            c.memory_info().rss for c in root.children(recursive=True)
        )
    except psutil.Error:
        return None
    return round(total / 2**20, 1)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read it: {exc.strerror})"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def _load_prctl() -> Any:
    """libc's prctl, looked up once here: the child must not load libraries after fork."""
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """In the child, before exec: ask Linux to SIGTERM it when the proxy dies; if the proxy
    already died meanwhile, give up at once."""
    if _PRCTL is None:
        return None

    def in_child() -> None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return in_child
