"""Run `canary demo`: upstreams, config, the real proxy, traffic, live progress, summary.

Everything listens on 127.0.0.1 on free ports, in this one process. The story runs as one
task; SIGINT/SIGTERM cancel it and its clean-up (an exit stack) stops the traffic, the
proxy and the upstreams in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import structlog
from aiohttp import web

from config.errors import CanaryError
from config.loader import load_settings
from proxy.demo.options import EXIT_INTERRUPTED, DemoOptions, Pace
from proxy.demo.replicas import demo_redis, replicas_lines
from proxy.demo.report import (
    PROGRESS_LEGEND,
    DemoOutcome,
    Protection,
    is_finished,
    progress_line,
    summary,
    transition_line,
)
from proxy.demo.traffic import TrafficGenerator, TrafficPlan
from proxy.demo.upstream import UpstreamProfile, make_demo_upstream
from proxy.front.server import CanaryServer
from proxy.logs import configure_logging

__all__ = ["run_demo", "upstream_profiles", "write_config"]

EXIT_OK, EXIT_RUNTIME = 0, 1


# -- the config ---------------------------------------------------------------------------------


def write_config(
    workdir: Path, pace: Pace, *, baseline_url: str, canary_url: str, protect: bool = False,
    redis_url: str | None = None,
) -> Path:
    """A real config file for this run; the proxy and admin listeners take free ports.
    `protect`: a shadow stage (chat calls have no side effects, so POST is mirrored) and
    fallback to the baseline."""
    pool = "pool: {max_connections: 256, max_keepalive: 64}"
    fallback = ", fallback: {enabled: true, on: [connect, timeout, 5xx]}" if protect else ""
    shadow = f", shadow: {pace.shadow}, shadow_methods: [POST]" if protect else ""
    text = f"""\
# written by `canary demo`: the real proxy runs from this file (CONTRACT §3)
listen: "127.0.0.1:0"                  # 0: any free port
drain_timeout: 2s
admin: {{listen: "127.0.0.1:0", token: ""}}  # no token: one is made beside the state file
upstreams:
  baseline: {{url: "{baseline_url}", {pool}}}  # legacy sync
  canary:   {{url: "{canary_url}", {pool}}}  # new async
routing: {{paths: ["/"], sticky_key: "header:X-User-Id", arm_header: "X-Canary-Arm"{fallback}}}
rollout: {{stages: [5, 25, 50, 100], bake: {pace.bake}, min_requests: {pace.min_requests}{shadow}}}
analysis:
  window: {pace.window}
  interval: {pace.interval}
  min_requests: {pace.analysis_min_requests}
  errors: {{warning: 0.05, critical: 0.10}}
  latency: {{p95_warning: {pace.p95_warning}, p99_critical: {pace.p99_critical}}}
  on_warning: step_back
  on_critical: rollback
{_state_line(redis_url)}
logging: {{level: info, format: json}}
"""
    path = workdir / "canary.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _state_line(redis_url: str | None) -> str:
    if redis_url is None:
        return 'state: {path: "state/canary-state.json"}'
    return (
        f'state: {{path: "state/canary-state.json", backend: redis, '
        f'redis: {{url: "{redis_url}", key_prefix: canary-demo}}}}  # the replicas share one rollout'
    )


# -- the run ------------------------------------------------------------------------------------


async def run_demo(options: DemoOptions, out: TextIO) -> int:
    """Run the story as one task; SIGINT/SIGTERM cancel it, and its clean-up runs."""
    loop = asyncio.get_running_loop()
    demo = _Demo(options, out)
    story = asyncio.create_task(demo.story())
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, demo.interrupt, story)
    try:
        return await story
    except asyncio.CancelledError:
        if not demo.interrupted:
            raise
        return demo.interrupted_exit()
    except (OSError, CanaryError) as exc:
        print(f"canary demo: cannot run: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


class _Demo:
    def __init__(self, options: DemoOptions, out: TextIO) -> None:
        self.options = options
        self.pace = options.pace
        self.out = out
        self.tty = out.isatty()
        self.interrupted = False
        self.workdir: Path | None = None
        self.story_over = False

    # -- control ------------------------------------------------------------------------------
    def interrupt(self, story: asyncio.Task[int]) -> None:
        if self.interrupted:
            return  # already shutting down (the drain takes at most 2 s)
        self.interrupted = True
        self._clear_line()
        self.say("Ctrl-C: stopping the traffic, the proxy and the upstreams...")
        story.cancel()

    def interrupted_exit(self) -> int:
        where = f" Files are in {self.workdir}." if self.workdir else ""
        self.say(("Stopped." if self.story_over else "Interrupted: everything is shut down.") + where)
        return EXIT_OK if self.story_over else EXIT_INTERRUPTED

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _clear_line(self) -> None:
        if self.tty:
            self.out.write("\r\033[K")

    # -- the story ------------------------------------------------------------------------------
    async def story(self) -> int:
        self.workdir = Path(tempfile.mkdtemp(prefix="canary-demo-"))
        async with contextlib.AsyncExitStack() as stack:
            redis_url = await stack.enter_async_context(demo_redis()) if self.options.replicas > 1 else None
            urls = await self._start_upstreams(stack)
            config_path = write_config(
                self.workdir, self.pace, baseline_url=urls[0], canary_url=urls[1], protect=self.options.protect,
                redis_url=redis_url,
            )
            self._introduce(config_path)
            log_path = self.workdir / "canary.log"
            stack.enter_context(_logs_to(log_path))
            started = time.time()
            servers = []
            for _ in range(self.options.replicas):  # >1: replicas of one rollout, through Redis
                servers.append(CanaryServer(load_settings(config_path)))
                await servers[-1].start()
                stack.push_async_callback(servers[-1].stop)
            server = servers[0]
            proxies = [f"http://127.0.0.1:{each.proxy_port}" for each in servers]
            traffic = TrafficGenerator(proxies, self._traffic_plan())
            await traffic.start()
            stack.push_async_callback(traffic.stop, 1.0)
            finished = await self._watch(server, started)
            ended = time.time()
            if not (self.options.keep_running and finished):
                await traffic.stop()
            outcome = _outcome(server, traffic, (started, ended), finished, config_path, log_path)
            self.story_over = True
            self.say(summary(outcome, shutil.get_terminal_size((100, 24)).columns))
            if server.replica is not None:
                for _round in range(2):  # every heartbeat written, then read: the replicas now
                    for each in servers:
                        await each.replica.exchange()  # type: ignore[union-attr]
                self._show_replicas(server)
            if self.options.keep_running and finished:
                await self._keep_running(server, started)
        return EXIT_OK if finished else EXIT_RUNTIME

    def _show_replicas(self, server: CanaryServer) -> None:
        assert server.replica is not None
        status = server.replica.status()
        self.say(f"Replicas: {len(status['replicas'])} proxies, one rollout (Redis {status['backend']['url']}):")
        for line in replicas_lines(status):
            self.say(line)

    async def _start_upstreams(self, stack: contextlib.AsyncExitStack) -> tuple[str, str]:
        urls = []
        for profile in upstream_profiles(self.options):
            runner = await stack.enter_async_context(_serving(make_demo_upstream(profile)))
            urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
        return urls[0], urls[1]

    def _traffic_plan(self) -> TrafficPlan:
        return TrafficPlan(concurrency=self.pace.concurrency, think=self.pace.think, seed=self.options.seed)

    def _introduce(self, config_path: Path) -> None:
        options = self.options
        self.say(
            f"canary demo: canary error rate {options.canary_error_rate:g}, added latency "
            f"{options.canary_latency:g}s, seed {options.seed}{', fast' if options.fast else ''}"
            f"{', protect (shadow stage, fallback)' if options.protect else ''}"
            f"{f', {options.replicas} replicas sharing one Redis' if options.replicas > 1 else ''}"
        )
        self.say(f"Config written to {config_path}:")
        for line in config_path.read_text(encoding="utf-8").splitlines()[1:]:
            self.say("    " + line)
        plan = self._traffic_plan()
        self.say(
            f"Traffic: {plan.concurrency} concurrent calls from {plan.users} sticky users (X-User-Id), "
            f"{plan.stream_share:.0%} streaming (SSE), the rest plain JSON."
        )
        self.say(f"Live: {PROGRESS_LEGEND}")

    async def _watch(self, server: CanaryServer, started: float) -> bool:
        """Show progress until the rollout ends (True) or the time limit passes (False)."""
        assert server.controller is not None
        limit = self.options.time_limit or self.pace.time_limit
        every = 0.25 if self.tty else 2.0
        shown, next_line = 0, 0.0
        while True:
            status = server.controller.status()
            shown = self._print_transitions(server, shown, started)
            elapsed = time.time() - started
            if is_finished(status) or elapsed > limit:
                self._clear_line()
                return is_finished(status)
            if elapsed >= next_line:
                next_line = elapsed + every
                self._show_progress(progress_line(status, elapsed, server.settings.rollout.min_requests))
            await asyncio.sleep(0.05)

    def _show_progress(self, line: str) -> None:
        if not self.tty:
            self.say(line)
            return
        width = shutil.get_terminal_size((100, 24)).columns
        self.out.write("\r" + line[: max(20, width - 1)] + "\033[K")
        self.out.flush()

    def _print_transitions(self, server: CanaryServer, shown: int, started: float) -> int:
        assert server.controller is not None
        history = server.controller.history()
        for transition in history[shown:]:
            self._clear_line()
            self.say(transition_line(transition, started))
        return len(history)

    async def _keep_running(self, server: CanaryServer, started: float) -> None:
        admin = f"http://127.0.0.1:{server.admin_port}"
        proxy = f"http://127.0.0.1:{server.proxy_port}"
        self.say("Still running; Ctrl-C stops everything. The traffic generator keeps sending calls.")
        self.say(f"  proxy      {proxy}/v1/chat/completions  (send X-User-Id; X-Canary: canary forces the arm)")
        self.say(f"  dashboard  {admin}/")
        self.say(f"  admin API  {admin}  (Authorization: Bearer {server.admin_token})")
        self.say(f"  CLI        CANARY_ADMIN_URL={admin} CANARY_ADMIN_TOKEN={server.admin_token} canary status")
        assert server.controller is not None
        shown = len(server.controller.history())
        while True:
            shown = self._print_transitions(server, shown, started)
            await asyncio.sleep(0.5)


def upstream_profiles(options: DemoOptions) -> tuple[UpstreamProfile, UpstreamProfile]:
    """The legacy sync baseline (a fixed worker pool) and the async canary (the faulty one)."""
    pace = options.pace
    baseline = UpstreamProfile(
        flavour="legacy-sync", model="demo-chat-legacy", workers=pace.legacy_workers, seed=options.seed,
        first_token=pace.first_token, per_token=pace.per_token, tokens=pace.tokens,
    )
    canary = replace(
        baseline, flavour="async", model="demo-chat-async", workers=None,
        error_rate=options.canary_error_rate, extra_latency=options.canary_latency,
    )
    return baseline, canary


def _outcome(
    server: CanaryServer, traffic: TrafficGenerator, span: tuple[float, float], finished: bool,
    config_path: Path, log_path: Path,
) -> DemoOutcome:
    assert server.controller is not None
    return DemoOutcome(
        status=server.controller.status(),
        history=server.controller.history(),
        tally=traffic.tally,
        users=traffic.plan.users,
        started_at=span[0],
        ended_at=span[1],
        finished=finished,
        config_path=config_path,
        state_path=server.settings.state.path,
        log_path=log_path,
        protection=_protection(server, traffic) if server.settings.routing.fallback.enabled else None,
    )


def _protection(server: CanaryServer, traffic: TrafficGenerator) -> Protection:
    canary = server.recorder.arms["canary"]
    return Protection(
        client_errors=sum(arm.errors for arm in traffic.tally.arms.values()),
        canary_errors=canary.code_totals[3] + canary.code_totals[4],  # 5xx, and the proxy's 502/503/504
        fallbacks=sum(server.fallback.counts.values()),
        mirrored=server.mirror.sent,
        dropped=sum(server.mirror.dropped.values()),
    )


@contextlib.asynccontextmanager
async def _serving(app: web.Application) -> AsyncIterator[web.AppRunner]:
    """Serve `app` on a free port of 127.0.0.1 until the block ends."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield runner
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def _logs_to(path: Path) -> Iterator[None]:
    """The proxy's JSON logs go to `path` (the terminal shows the story); undone after."""
    root = logging.getLogger()
    before = list(root.handlers)
    with open(path, "a", encoding="utf-8", buffering=1) as stream:
        configure_logging(level="info", fmt="json", stream=stream)
        try:
            yield
        finally:
            structlog.reset_defaults()
            for handler in root.handlers[:]:
                if handler not in before:
                    root.removeHandler(handler)
