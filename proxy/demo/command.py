"""`canary demo`: the whole life of a rollout on one machine, in one process.

This module is the command line (the options and the pace are `proxy.demo.options`);
`proxy.demo.run` runs the story: two simulated OpenAI-compatible upstreams (`proxy.demo.upstream`), a real config in a fresh
temp dir, the real proxy, a traffic generator (`proxy.demo.traffic`), live progress and a
summary (`proxy.demo.report`). It is imported only when the demo runs, so every other
command starts fast and a Ctrl-C during start-up is still a clean exit.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys

from proxy.demo.options import EXIT_INTERRUPTED, DemoOptions

__all__ = ["add_demo_command", "run_demo_command"]


# -- the command line ---------------------------------------------------------------------------


def add_demo_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="self-contained demo: simulated upstreams, the proxy, traffic, a live rollout",
        description="Run a simulated baseline and canary LLM API, the real proxy and a traffic "
        "generator on 127.0.0.1, show the rollout live and summarise it. No config needed.",
    )
    demo.add_argument("--canary-error-rate", type=_rate, default=0.0, metavar="R",
                      help="share of canary calls that fail with 500/503 (default 0: promoted; 0.3: rolled back)")
    demo.add_argument("--canary-latency", type=_seconds, default=0.0, metavar="S",
                      help="seconds the canary adds before its first token (default 0)")
    demo.add_argument("--seed", type=int, default=None, metavar="N",
                      help="seed for the simulated upstreams and the traffic (default: random, printed)")
    demo.add_argument("--fast", action="store_true", help="short bakes: the whole story in well under a minute")
    demo.add_argument("--protect", action="store_true",
                      help="protect users: a shadow stage first (copies of calls to the canary, answers "
                      "discarded) and fallback to the baseline for failed canary calls")
    demo.add_argument("--replicas", type=_replicas, default=1, metavar="N",
                      help="N proxies behind the traffic generator, one rollout shared through a Redis "
                      "started for the demo (needs redis-server; default 1)")
    demo.add_argument("--keep-running", action="store_true",
                      help="afterwards leave the proxy, dashboard and traffic up until Ctrl-C")
    demo.add_argument("--time-limit", type=_seconds, default=None, metavar="S",
                      help="give up after S seconds (default 90 with --fast, else 900)")
    demo.set_defaults(handler=run_demo_command)


def _replicas(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= 8:
        raise argparse.ArgumentTypeError(f"must be between 1 and 8, got {text}")
    return value


def _rate(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a share between 0 and 1, got {text}")
    return value


def _seconds(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def run_demo_command(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 100_000)
    options = DemoOptions(
        canary_error_rate=args.canary_error_rate, canary_latency=args.canary_latency, seed=seed,
        fast=args.fast, keep_running=args.keep_running, protect=args.protect, time_limit=args.time_limit,
        replicas=args.replicas,
    )
    try:
        from proxy.demo.run import run_demo

        return asyncio.run(run_demo(options, sys.stdout))
    except KeyboardInterrupt:  # before the demo's own handler was installed
        print("\ncanary demo: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
