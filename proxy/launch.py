"""Starting, watching and stopping the backends that routes.yaml says to launch.

A backend counts as ready only when a real one-token completion answers: mlx_lm.server
answers `/health` before its model has loaded. Each backend runs in its own process group
with its output in its own log file; on Linux it also dies with the proxy, even a killed
one (PR_SET_PDEATHSIG), so nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import psutil

from proxy.accesslog import AccessLog
from proxy.config import Backend, Config

STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this
PROGRESS_EVERY_S = 5.0
MEMORY_EVERY_S = 10.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a backend up this long starts its restart backoff over


class LaunchError(Exception):
    """A launched backend could not be brought up; the message says which and why."""


def build_command(name: str, backend: Backend, python: str = sys.executable) -> list[str]:
    """The command line that starts `backend` (pure: no I/O)."""
    launch = backend.launch
    if launch is None:
        raise ValueError(f"backend {name!r} has no launch block")
    if launch.command is not None:
        values = {"host": backend.host, "port": str(backend.port), "python": python}
        return [part.format(**values) for part in launch.command]
    assert launch.model is not None
    command = [python, "-m", "mlx_lm.server", "--model", launch.model]
    command += ["--host", backend.host, "--port", str(backend.port)]
    if launch.draft_model is not None:
        command += ["--draft-model", launch.draft_model]
        if launch.num_draft_tokens is not None:
            command += ["--num-draft-tokens", str(launch.num_draft_tokens)]
    return command + list(launch.extra_args)


def log_path(name: str, backend: Backend, log_dir: Path) -> Path:
    assert backend.launch is not None
    return backend.launch.log or log_dir / f"{name}.log"


@dataclass
class Managed:
    """One launched backend and what is known about it."""

    name: str
    backend: Backend
    command: list[str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    restarts: int = 0
    rss_mb: float | None = None
    started_at: float = 0.0
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
        self.backends = {
            name: Managed(
                name, backend, build_command(name, backend), log_path(name, backend, log_dir)
            )
            for name, backend in config.backends.items()
            if backend.launch is not None
        }

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: managed.status() for name, managed in self.backends.items()}

    async def start(self) -> None:
        """Start every backend in parallel and wait until all of them serve."""
        if not self.backends:
            return
        started = time.perf_counter()
        self._say(f"starting {', '.join(self.backends)} (logs in {self._log_dirs()})")
        waits = [asyncio.ensure_future(self._bring_up(m)) for m in self.backends.values()]
        progress = asyncio.ensure_future(self._report_progress(started))
        try:
            await asyncio.gather(*waits)
        except BaseException:
            for wait in waits:
                wait.cancel()
            await self.stop()
            raise
        finally:
            progress.cancel()
        self._say(f"all backends ready in {time.perf_counter() - started:.1f} s")
        for managed in self.backends.values():
            managed.watcher = asyncio.ensure_future(self._watch(managed))
        self._sample_memory()  # at once, so that /healthz has a figure from the start
        self._sampler = asyncio.ensure_future(self._sample_memory_every(MEMORY_EVERY_S))

    async def stop(self) -> None:
        """Stop every backend: SIGTERM to its process group, SIGKILL after a grace period."""
        self._stopping = True
        tasks = [m.watcher for m in self.backends.values() if m.watcher] + [self._sampler]
        for task in tasks:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(_terminate(m.process) for m in self.backends.values()))
        for managed in self.backends.values():
            managed.ready = False

    async def _bring_up(self, managed: Managed) -> None:
        managed.log_path.parent.mkdir(parents=True, exist_ok=True)
        launch = managed.backend.launch
        assert launch is not None
        with managed.log_path.open("ab") as output:
            output.write(f"\n==> {time.strftime('%F %T')} {' '.join(managed.command)}\n".encode())
            output.flush()
            try:
                managed.process = await asyncio.create_subprocess_exec(
                    *managed.command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=output,
                    stderr=asyncio.subprocess.STDOUT,
                    env={**os.environ, "HF_HUB_OFFLINE": "1", **launch.env},
                    start_new_session=True,  # its own process group: stopped as a whole
                    preexec_fn=_die_with_parent,
                )
            except OSError as exc:
                raise LaunchError(
                    f"backend {managed.name!r}: cannot run {managed.command[0]}: {exc}"
                ) from None
        managed.started_at = time.perf_counter()
        await self._wait_ready(managed, launch.startup_timeout)
        managed.ready = True
        self._say(
            f"{managed.name} ready in {time.perf_counter() - managed.started_at:.1f} s"
            f" (pid {managed.process.pid}, {managed.backend.url})"
        )
        self._log.event(
            "backend_ready",
            backend=managed.name,
            pid=managed.process.pid,
            startup_s=round(time.perf_counter() - managed.started_at, 3),
        )

    async def _wait_ready(self, managed: Managed, timeout: float) -> None:
        """Poll with a real one-token completion until it answers 200."""
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
                    raise LaunchError(
                        self._failure(managed, f"exited with code {managed.process.returncode}")
                    )
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise LaunchError(
                        self._failure(managed, f"did not answer within {timeout:g} s")
                    )
                try:
                    response = await client.post(
                        managed.backend.url + "/v1/chat/completions",
                        json=body,
                        timeout=httpx.Timeout(remaining, connect=1.0),
                    )
                except httpx.TransportError:  # not listening yet, or still loading
                    await asyncio.sleep(0.25)
                    continue
                if response.status_code == 200:
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
            if self._stopping:
                return
            if time.perf_counter() - managed.started_at > STABLE_AFTER_S:
                backoff = 1.0
            self._log.event(
                "backend_exit",
                backend=managed.name,
                returncode=code,
                restart_in_s=backoff,
                log=str(managed.log_path),
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)
            managed.restarts += 1
            try:
                await self._bring_up(managed)
            except LaunchError as exc:
                self._log.event("backend_restart_failed", backend=managed.name, error=str(exc))
                await _terminate(managed.process)
                continue
            self._log.event("backend_restarted", backend=managed.name, restarts=managed.restarts)

    def _sample_memory(self) -> None:
        for managed in self.backends.values():
            managed.rss_mb = _rss_mb(managed.process)
            if managed.rss_mb is not None:
                self._log.event("backend_memory", backend=managed.name, rss_mb=managed.rss_mb)

    async def _sample_memory_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            self._sample_memory()

    async def _report_progress(self, started: float) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            waiting = [name for name, m in self.backends.items() if not m.ready]
            elapsed = time.perf_counter() - started
            self._say(f"loading {', '.join(waiting)} ... {elapsed:.0f} s")

    def _failure(self, managed: Managed, what: str) -> str:
        tail = _tail(managed.log_path)
        return f"backend {managed.name!r} {what}; last lines of {managed.log_path}:\n{tail}"

    def _log_dirs(self) -> str:
        return ", ".join(sorted({str(m.log_path.parent) for m in self.backends.values()}))

    def _say(self, line: str) -> None:
        print(f"specproxy: {line}", file=self._progress, flush=True)


async def _terminate(process: asyncio.subprocess.Process | None) -> None:
    if process is None or process.returncode is not None:
        return
    _signal_group(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), STOP_GRACE_S)
    except TimeoutError:
        _signal_group(process.pid, signal.SIGKILL)
        await process.wait()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


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


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the proxy dies."""
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
