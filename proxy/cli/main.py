"""The `canary` command: a thin edge over the config, server, control and demo modules.

Exit codes: 0 success, 1 runtime failure (e.g. proxy unreachable), 2 usage or config error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Sequence

from config.errors import ConfigError, WorkerStartError
from config.loader import load_settings

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


def _add_config_arg(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "-c", "--config", default=os.environ.get("CANARY_CONFIG"), required=required and not os.environ.get("CANARY_CONFIG"),
        help="the YAML config file (default: $CANARY_CONFIG)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="canary", description="Canary traffic-splitting reverse proxy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    serve = sub.add_parser("serve", help="run the proxy and admin listeners in the foreground")
    _add_config_arg(serve, required=True)
    serve.add_argument(
        "--workers", type=_workers_arg, default=None, metavar="N",
        help='processes serving the listen address (a number or "auto"; default: workers in the config)',
    )

    validate = sub.add_parser("validate", help="check a config file; print ok or every problem")
    _add_config_arg(validate, required=True)

    from proxy.cli.control import add_control_commands
    from proxy.demo.command import add_demo_command

    add_control_commands(sub, _add_config_arg)
    add_demo_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.handler(args) if hasattr(args, "handler") else _dispatch(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_RUNTIME
    except BrokenPipeError:  # e.g. `canary status | head -2`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "validate":
        return _validate(args.config)
    if args.command == "serve":
        return _serve(args.config, args.workers)
    raise AssertionError(args.command)


def _validate(path: str) -> int:
    try:
        load_settings(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stdout)
        return EXIT_USAGE
    print("ok")
    return EXIT_OK


def _workers_arg(text: str) -> int:
    from config.workers import WORKERS_HINT, worker_count

    count = worker_count(text)
    if count is None:
        raise argparse.ArgumentTypeError(f"{WORKERS_HINT}, got {text!r}")
    return count


def _serve(path: str, workers: int | None = None) -> int:
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    from proxy.front.server import CanaryServer
    from proxy.front.worker import install_uvloop
    from proxy.logs import configure_logging
    from proxy.upstream.pool import client_override

    try:
        client_override()
    except ValueError as exc:
        print(f"canary serve: {exc}", file=sys.stderr)
        return EXIT_USAGE

    configure_logging(level=settings.logging.level, fmt=settings.logging.format)
    install_uvloop()
    try:
        asyncio.run(CanaryServer(settings, workers=workers).run_until_signalled())
    except (OSError, WorkerStartError) as exc:
        print(f"canary serve: cannot start: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK

