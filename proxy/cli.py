"""`python -m proxy serve|check|backends --config routes.yaml`, `python -m proxy report LOG`.

`serve` reloads its config file on SIGHUP (as `POST /admin/reload` does). It runs on the
proxy's own HTTP server, or with `--server uvicorn` on uvicorn, which also does TLS."""

from __future__ import annotations

import argparse
import asyncio
import enum
import gc
import signal
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from proxy.accesslog import AccessLog
from proxy.app import ProxyApp, create_app, create_server, reload_config
from proxy.auth import is_loopback, resolve_keys
from proxy.config import Config, load_config
from proxy.errors import ConfigError
from proxy.launch import LaunchError, Supervisor, build_command
from proxy.sessions import KEY_FILE, session_key, session_key_from_env

if TYPE_CHECKING:  # uvicorn is imported only when it serves (about 40 ms)
    from proxy.uvicorn_server import Tls
EXIT_CONFIG = 2
EXIT_LAUNCH = 3
EXIT_LISTEN = 4


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Usage lines name the command as it was typed: the console script or the module.
    prog = "specproxy" if Path(sys.argv[0]).name == "specproxy" else "python -m proxy"
    if argv[:1] == ["report"]:  # its own arguments, parsed by the report itself
        return _report(argv[1:], f"{prog} report")
    args = _parser(prog).parse_args(argv)
    tls = None
    if args.command == "serve":
        try:
            tls = _tls(args)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    try:
        config = load_config(args.config)
        resolve_keys(config.auth)  # a named key variable that is unset: a config error too
        session_key_from_env(config.logging)  # and so is the session key's
        if args.command == "check":
            _check_log_path(config.logging.path)  # what `serve` opens, without creating it
            print(f"{args.config}: OK\n{describe(config)}")
            return 0
        log = _open_log(config)
        try:  # made or read now: a bad key file stops `serve` before it launches anything
            if args.command == "serve":
                session_key(config.logging)
        except ConfigError:
            log.close()
            raise
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.command == "backends":
            return _run(lambda stop: run_backends(config, log, stop))
        host = args.host or config.listen.host
        port = config.listen.port if args.port is None else args.port
        try:  # before loading any model: a taken port should fail at once
            listener = _listen(host, port)
        except OSError as exc:
            print(f"error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
            return EXIT_LISTEN
        scheme = "https" if tls else "http"
        print(
            f"specproxy for {scheme}://{host}:{port}\n{describe(config)}",
            file=sys.stderr,
            flush=True,
        )
        if not is_loopback(host) and not (config.auth.api_keys or config.auth.api_keys_env):
            print(
                f"warning: listening on {host} with no API keys (auth.api_keys): anyone who"
                " can reach this address can use the backends",
                file=sys.stderr,
            )
        with listener:
            path = Path(args.config)
            return _run(lambda stop: serve(config, log, listener, stop, path, args.server, tls))
    finally:
        log.close()


class ServerKind(enum.StrEnum):
    """What `serve` runs the app on (`--server`)."""

    OWN = "own"  # proxy/server.py: the faster, with the limits of docs (servers)
    UVICORN = "uvicorn"  # for TLS, in the same process


class _Serving(Protocol):
    """What the CLI needs of a server: `proxy.server.Server` and `UvicornServer` have it."""

    @property
    def started(self) -> bool: ...

    async def serve(self, sockets: list[socket.socket]) -> None: ...

    def shutdown(self, *, now: bool = False) -> None: ...


async def serve(
    config: Config,
    log: AccessLog,
    listener: socket.socket,
    stop: _Stop,
    config_path: Path,
    kind: ServerKind = ServerKind.OWN,
    tls: Tls | None = None,
) -> int:
    """Bring up the launched backends, serve until a signal, then stop them all.

    On SIGTERM or SIGINT, the server stops accepting and lets in-flight requests finish for up
    to `shutdown.grace_seconds` (then cancels them: each still gets its log line); only
    then are the launched backends stopped. SIGHUP reloads the config file.
    """
    supervisor = stop.supervisor = Supervisor(config, log)
    try:
        await supervisor.start()
        app = create_app(config, log=log, supervisor=supervisor, config_path=config_path)
        server: _Serving
        if kind is ServerKind.UVICORN:
            from proxy.uvicorn_server import UvicornServer

            server = UvicornServer(app, grace_seconds=config.shutdown.grace_seconds, tls=tls)
        else:
            server = create_server(app, config.shutdown.grace_seconds, config.limits)
        stop.server, stop.app = server, app
        _tune_gc()
        host, port = listener.getsockname()[:2]
        scheme = "https" if tls else "http"
        print(f"specproxy: serving on {scheme}://{host}:{port}", file=sys.stderr, flush=True)
        await server.serve(sockets=[listener])
        return 0 if server.started else 1
    finally:
        await supervisor.stop()


async def run_backends(config: Config, log: AccessLog, stop: _Stop) -> int:
    """Only the launched backends, in the foreground, until a signal."""
    supervisor = stop.supervisor = Supervisor(config, log)
    if not supervisor.replicas:
        print("error: no backend in the config has a `launch` block", file=sys.stderr)
        return EXIT_CONFIG
    try:
        await supervisor.start()
        print("specproxy: backends running; Ctrl-C stops them", file=sys.stderr, flush=True)
        stop.running = True
        await stop.event.wait()
        return 0
    finally:
        await supervisor.stop()


class _Stop:
    """What a SIGINT/SIGTERM does. Always: no more backend restarts (systemd and a terminal
    may signal the backends too). During start-up: interrupt it. While serving: the server's
    graceful shutdown. While only backends run: end."""

    def __init__(self, task: asyncio.Task[Any]):
        self.task = task
        self.event = asyncio.Event()
        self.supervisor: Supervisor | None = None
        self.server: _Serving | None = None
        self.app: ProxyApp | None = None
        self.running = False
        self.signal: int | None = None
        self._reloads: set[asyncio.Task[None]] = set()

    def reload(self) -> None:
        """SIGHUP: re-read the config file (the outcome is logged)."""
        if self.app is not None and self.signal is None:
            task = asyncio.ensure_future(reload_config(self.app, "SIGHUP"))
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)

    def __call__(self, signum: int) -> None:
        again = self.signal is not None
        if not again:
            self.signal = signum
            print("specproxy: stopping (backends get up to 10 s)", file=sys.stderr, flush=True)
        if self.supervisor is not None:
            self.supervisor.begin_stop()
        if self.server is not None:  # a second signal: requests in flight are cut now
            self.server.shutdown(now=again)
        elif not self.running and not self.event.is_set():
            self.task.cancel()
        self.event.set()


def _run(body: Callable[[_Stop], Awaitable[int]]) -> int:
    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        stop = _Stop(task)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)
        loop.add_signal_handler(signal.SIGHUP, stop.reload)
        try:
            return await body(stop)
        except LaunchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_LAUNCH
        except asyncio.CancelledError:
            print("specproxy: interrupted during start-up; backends stopped", file=sys.stderr)
            return 128 + (stop.signal or signal.SIGINT)

    return _event_loop_run(guarded())


def _report(argv: list[str], prog: str) -> int:
    try:  # numpy, scipy, duckdb and matplotlib come with the `report` extra only
        from proxy.report import main as report_main
    except ImportError as exc:
        print(f"error: the report needs `pip install 'specproxy[report]'` ({exc})", file=sys.stderr)
        return EXIT_CONFIG
    return report_main(argv, prog)


# Allocations between two collections of the youngest generation (CPython's default: 700).
GC_YOUNG_THRESHOLD = 20_000


def _tune_gc() -> None:
    """Collect less often: every request allocates a few hundred objects, so with CPython's
    defaults a collection ran every few requests, and an older generation's every few
    hundred. Measured: the app in-process went from 208 to 135 us per request; the whole
    proxy under load used about a tenth less CPU per request (a noisy figure). What lives
    from start-up is frozen out of the scans; cyclic garbage still goes, in bigger batches."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def _listen(host: str, port: int) -> socket.socket:
    listener = socket.create_server((host, port), reuse_port=False)
    listener.set_inheritable(False)  # the backends must not hold the proxy's port
    return listener


def _event_loop_run(coroutine: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def _open_log(config: Config) -> AccessLog:
    try:
        log = AccessLog(config.logging.path, stdout=config.logging.stdout)
    except OSError as exc:
        raise ConfigError(
            f"logging.path: cannot open {config.logging.path}: {exc.strerror}"
        ) from None
    log.bind(config_version=config.version())  # the backends' start-up lines carry it too
    return log


def _check_log_path(path: Path | None) -> None:
    """Raise the `ConfigError` that `_open_log` would, as far as can be told without creating
    the file or its folders: a folder in its place, or a file where a folder must be."""
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"logging.path: cannot open {path}: it is a directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"logging.path: cannot open {path}: {parent} is not a directory")
            return


def describe(config: Config) -> str:
    """What the config does, for people (secrets are never shown: only whether they are set)."""
    lines = [f"  model {config.model!r}  (config_version {config.version()})"]
    for name, weight in config.weights():
        backend = config.backends[name]
        lines.append(f"  backend {name:<12} {weight:>5g}%  {', '.join(backend.urls)}")
        if backend.launch is not None:
            for url in backend.urls:
                command = build_command(name, backend, "python", url)
                lines.append(f"    launched: {' '.join(command)}")
        limit = backend.max_in_flight
        slots = "no limit" if limit is None else f"{limit} at a time, {backend.max_queue} may wait"
        if limit is not None and len(backend.urls) > 1:
            slots += ", per replica"
        lines.append(f"    fallback {config.fallback_of(name) or '(none)'}; {slots}")
    routing = config.routing
    lines.append(f"  force with header {routing.header}")
    if routing.sticky_header:
        lines.append(f"  sticky on header {routing.sticky_header}")
    if config.shadow is not None:
        shadow = config.shadow
        share = f"{shadow.sample * 100:g}% of greedy requests"
        lines.append(f"  shadow {shadow.source} -> {shadow.target}, {share}")
    auth = config.auth
    keys = "required" if auth.api_keys or auth.api_keys_env else "not required"
    admin = "admin token" if auth.admin_token or auth.admin_token_env else "loopback only"
    lines.append(f"  API keys {keys}; /admin/* {admin}")
    lines.append(f"  request log {config.logging.path or '(stdout only)'}")
    if routing.sticky_header:
        lines.append(f"  sessions logged as a keyed hash: {_key_source(config)}")
    return "\n".join(lines)


def _key_source(config: Config) -> str:
    """Where the sessions' key comes from (never the key)."""
    logging = config.logging
    if logging.session_key_env is not None:
        return f"key in ${logging.session_key_env}"
    if logging.path is None:
        return "key random per process (no log file to keep it beside)"
    return f"key in {logging.path.parent / KEY_FILE}"


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the proxy")
    check_cmd = commands.add_parser("check", help="validate the config and exit")
    backends_cmd = commands.add_parser(
        "backends", help="start only the backends that have a `launch` block, in the foreground"
    )
    commands.add_parser("report", help="the verdict from request logs (see: report --help)")
    for command in (serve_cmd, check_cmd, backends_cmd):
        command.add_argument("--config", default="routes.yaml", help="routes file (routes.yaml)")
    serve_cmd.add_argument("--host", help="listen address (default: listen.host)")
    serve_cmd.add_argument("--port", type=_port, help="listen port (default: listen.port)")
    serve_cmd.add_argument(
        "--server",
        type=ServerKind,
        choices=list(ServerKind),
        default=ServerKind.OWN,
        help="the HTTP server: the proxy's own (default), or uvicorn, which also does TLS",
    )
    serve_cmd.add_argument(
        "--ssl-certfile", type=Path, help="TLS certificate chain, PEM (--server uvicorn only)"
    )
    serve_cmd.add_argument(
        "--ssl-keyfile", type=Path, help="TLS private key, PEM (--server uvicorn only)"
    )
    return parser


def _tls(args: argparse.Namespace) -> Tls | None:
    """The TLS files of `serve`, checked before any backend starts: a `ConfigError` if they
    are given to the own server, incomplete, or unusable."""
    if args.ssl_certfile is None and args.ssl_keyfile is None:
        return None
    if args.server is not ServerKind.UVICORN:
        raise ConfigError(
            "--ssl-certfile and --ssl-keyfile need --server uvicorn: the proxy's own server"
            " does not do TLS"
        )
    if args.ssl_certfile is None:
        raise ConfigError("--ssl-keyfile needs --ssl-certfile too")
    from proxy.uvicorn_server import Tls

    tls = Tls(args.ssl_certfile, args.ssl_keyfile)
    try:  # as uvicorn will load them, but now, with a plain message
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            tls.certfile, tls.keyfile
        )
    except OSError as exc:  # ssl.SSLError is one
        raise ConfigError(f"cannot use the TLS certificate or key: {exc}") from None
    return tls


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535)")
    return port
