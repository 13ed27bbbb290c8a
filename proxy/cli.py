"""`python -m proxy serve|check --config routes.yaml`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import uvicorn

from proxy.accesslog import AccessLog
from proxy.app import create_app
from proxy.config import Config, load_config
from proxy.errors import ConfigError

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
        if args.command == "check":
            print(f"{args.config}: OK\n{describe(config)}")
            return 0
        return serve(config, host=args.host, port=args.port)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def serve(config: Config, *, host: str | None, port: int | None) -> int:
    host = host or config.listen.host
    port = config.listen.port if port is None else port
    try:
        log = AccessLog(config.logging.path, stdout=config.logging.stdout)
    except OSError as exc:
        raise ConfigError(
            f"logging.path: cannot open {config.logging.path}: {exc.strerror}"
        ) from None
    print(f"specproxy on http://{host}:{port}\n{describe(config)}", file=sys.stderr, flush=True)
    try:
        # Our own log line per request replaces uvicorn's access log.
        uvicorn.run(
            create_app(config, log=log),
            host=host,
            port=port,
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=30,
        )
    finally:
        log.close()
    return 0


def describe(config: Config) -> str:
    lines = [f"  model {config.model!r}"]
    for name, weight in config.weights():
        url = config.backends[name].url
        lines.append(f"  backend {name:<12} {weight:>5g}%  {url}")
    routing = config.routing
    lines.append(f"  force with header {routing.header}")
    if routing.sticky_header:
        lines.append(f"  sticky on header {routing.sticky_header}")
    lines.append(f"  request log {config.logging.path or '(stdout only)'}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m proxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the proxy")
    check_cmd = commands.add_parser("check", help="validate the config and exit")
    for command in (serve_cmd, check_cmd):
        command.add_argument("--config", default="routes.yaml", help="routes file (routes.yaml)")
    serve_cmd.add_argument("--host", help="listen address (default: listen.host)")
    serve_cmd.add_argument("--port", type=int, help="listen port (default: listen.port)")
    return parser
