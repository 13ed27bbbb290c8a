"""Run the proxy as `python -m proxy serve` does, with a chosen backend client or server:
the benchmark's arms (`scripts/bench_overhead.py --llm`).

    python scripts/bench_proxy.py --transport aiohttp serve --config routes.yaml --port 8000
    python scripts/bench_proxy.py --server uvicorn serve --config routes.yaml --port 8000

`--transport pool` (the default) is the proxy's own `UpstreamTransport`; `aiohttp` is
`scripts/aiohttp_transport.py`. With `--server own` (the default) everything after the
options is `proxy.cli.main`'s, run unchanged but for the transport handed to `create_app`
(its `transport` keyword, there for tests); `--server uvicorn` runs the same app, log and
GC settings under uvicorn (uvloop and httptools), for `serve` with `--config`, `--host`
and `--port` only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `proxy`, from anywhere

import proxy.cli
from proxy.config import load_config
from proxy.upstream import Transport

TransportFactory = Callable[[], Transport] | None


def _transport(name: str) -> TransportFactory:
    if name == "pool":
        return None  # create_app's default
    from aiohttp_transport import AiohttpTransport  # this folder; aiohttp: the bench extra

    return AiohttpTransport


def serve_own(factory: TransportFactory, argv: list[str]) -> int:
    """`python -m proxy` itself; only `create_app` gets the transport."""
    if factory is not None:
        real = proxy.cli.create_app

        @functools.wraps(real)
        def create_app(*args: object, **kwargs: object) -> proxy.cli.ProxyApp:
            return real(*args, transport=factory(), **kwargs)  # type: ignore[arg-type]

        proxy.cli.create_app = create_app  # type: ignore[assignment]
    return proxy.cli.main(argv)


def serve_uvicorn(factory: TransportFactory, argv: list[str]) -> int:
    """The same app under uvicorn: config, access log and GC settings as `serve`'s."""
    import uvicorn

    ap = argparse.ArgumentParser(prog="bench_proxy.py --server uvicorn")
    ap.add_argument("command", choices=["serve"])
    ap.add_argument("--config", default="routes.yaml")
    ap.add_argument("--host", default=None)
    ap.add_argument("--port", type=int, default=None)
    args = ap.parse_args(argv)
    config = load_config(args.config)
    log = proxy.cli._open_log(config)
    transport = factory() if factory is not None else None
    app = proxy.cli.create_app(config, log=log, transport=transport, config_path=Path(args.config))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host or config.listen.host,
            port=config.listen.port if args.port is None else args.port,
            loop="uvloop",
            http="httptools",
            ws="none",
            lifespan="on",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=int(config.shutdown.grace_seconds),
        )
    )
    proxy.cli._tune_gc()
    try:
        server.run()
    finally:
        log.close()
    return 0 if server.started else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--transport", choices=["pool", "aiohttp"], default="pool")
    ap.add_argument("--server", choices=["own", "uvicorn"], default="own")
    args, rest = ap.parse_known_args()
    factory = _transport(args.transport)
    with contextlib.suppress(KeyboardInterrupt):
        return (serve_own if args.server == "own" else serve_uvicorn)(factory, rest)
    return 130


if __name__ == "__main__":
    sys.exit(main())
