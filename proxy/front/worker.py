"""One worker process of `canary serve --workers N`: the proxy listener and nothing else.

The supervisor (`proxy.front.workers.WorkerPool`) binds the listen socket and starts this
module with the socket and its end of a private channel as inherited descriptors. A
worker serves exactly as `canary serve` with one process does (same handler, same O(1)
recording in its own recorder); it never decides and never touches the state store. On
`Sync` it applies the weight and stage id and, when asked, answers its counts; on SIGTERM
or a closed channel (the supervisor is gone) it drains and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import socket
import sys
from typing import Sequence

import structlog
from aiohttp import web

from config.settings import Settings
from proxy.front.channel import Hello, Ready, Reconfigure, Sync, receive, send
from proxy.front.fallback import Fallback
from proxy.front.forward import ProxyState, make_proxy_server
from proxy.front.guard import ConnectionGuard, GuardedServer, ListenerLimits
from proxy.front.resources import raise_descriptor_limit
from proxy.front.routing import Router, RoutingSnapshot
from proxy.front.shadow import Mirror, MirrorLimits
from proxy.front.shedding import Shedding
from proxy.front.tls import ListenerTls
from proxy.front.websocket import WebSockets
from proxy.logs import configure_logging
from proxy.upstream.pool import UpstreamClients
from rollout.evidence import OutcomeRecorder
from rollout.summed import WorkerReport, report_of

__all__ = ["ProxyWorker", "fallback_counters", "install_uvloop", "main", "summed_fallbacks", "summed_shedding"]

log = structlog.get_logger("canary.worker")


class ProxyWorker:
    """The proxy listener of one worker, on a socket its supervisor bound. It is built
    like `CanaryServer`'s in-process listener (same ProxyState, server, TLS, fallback):
    a setting the proxy listener gains there must be applied here too."""

    def __init__(self, hello: Hello, listen: socket.socket) -> None:
        self.settings = hello.settings
        self.stage_id = hello.stage_id
        self._listen = listen
        analysis = hello.settings.analysis
        self.recorder = OutcomeRecorder(
            window=analysis.window, warn_limit=analysis.latency.p95_warning, crit_limit=analysis.latency.p99_critical
        )
        self.router = Router(RoutingSnapshot.from_settings(hello.settings.routing, hello.weight))
        self.router.set_shadow(hello.shadow)
        self.upstreams = UpstreamClients(hello.settings.upstreams)
        self.fallback = Fallback(hello.settings.routing.fallback, body_timeout=hello.settings.upstreams.canary.timeout.total)
        self.websockets = WebSockets(hello.settings.upstreams, hello.settings.routing.websocket)
        self.router.on_weight = self.websockets.weight_changed
        self.state = ProxyState(
            websockets=self.websockets,
            router=self.router,
            recorder=self.recorder,
            transports=self.upstreams.transports,
            clock=asyncio.get_running_loop().time,
            fallback=self.fallback,
            mirror=Mirror(
                recorder=self.recorder.arms["canary"],
                transport=lambda: self.state.transports["canary"],
                clock=asyncio.get_running_loop().time,
            ),
            shedding=Shedding(),
        )
        self.state.mirror.configure(hello.settings.rollout, MirrorLimits.from_settings(hello.settings))
        self.tls = ListenerTls(hello.settings.tls) if hello.settings.tls else None
        # its own descriptors, its own connection cap (inherited limit already raised)
        self.descriptors = raise_descriptor_limit()
        self.guard = ConnectionGuard(ListenerLimits.from_settings(hello.settings.limits, self.descriptors.soft), self.state.shedding)
        server_class = functools.partial(GuardedServer, guard=self.guard)
        server = make_proxy_server(self.state, access_log=None, server_class=server_class)
        self._runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=hello.settings.drain_timeout
        )

    async def start(self) -> None:
        await self._runner.setup()
        tls = self.tls.context if self.tls else None
        await web.SockSite(self._runner, self._listen, ssl_context=tls).start()

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to drain_timeout), close."""
        going_away = asyncio.ensure_future(self.websockets.close_all_after(self.settings.drain_timeout))
        try:
            await self._runner.cleanup()
            await self.state.mirror.close()
        finally:
            going_away.cancel()
            await self.upstreams.close()

    def sync(self, message: Sync) -> WorkerReport | None:
        if message.stage_id != self.stage_id:
            self.router.set_weight(message.weight)
            self.recorder.reset_stage()  # in-flight requests of the old stage no longer count
            self.stage_id = message.stage_id
        elif message.weight != self.router.snapshot.weight:
            self.router.set_weight(message.weight)
        if message.shadow != self.router.snapshot.shadow:
            self.router.set_shadow(message.shadow)
        return self.report() if message.report else None

    def report(self) -> WorkerReport:
        now = self.state.clock()
        self.recorder.sweep(now)
        counters = {
            **fallback_counters(self.fallback), **self.state.mirror.counters(), **shed_counters(self.state.shedding),
            **self.websockets.counters(),
        }
        return report_of(self.recorder.arms, self.stage_id, now, counters=counters)

    def reconfigure(self, fresh: Settings) -> None:
        old = self.settings
        analysis = fresh.analysis
        self.recorder.configure(
            window=analysis.window, warn_limit=analysis.latency.p95_warning, crit_limit=analysis.latency.p99_critical
        )
        self.router.set_routing(fresh.routing)
        self.websockets.configure(fresh.upstreams, fresh.routing.websocket)
        self.fallback.configure(fresh.routing.fallback, body_timeout=fresh.upstreams.canary.timeout.total)
        self.state.mirror.configure(fresh.rollout, MirrorLimits.from_settings(fresh))
        self.guard.limits = ListenerLimits.from_settings(fresh.limits, self.descriptors.soft)
        if self.tls is not None and fresh.tls is not None:  # on/off needs a restart
            self.tls.load(fresh.tls)
        if fresh.upstreams != old.upstreams:
            self.state.transports = self.upstreams.replace(fresh.upstreams, drain=old.drain_timeout)
        self.settings = fresh


async def run_worker(slot: int, listen_fd: int, channel_fd: int) -> int:
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=channel_fd))
    hello = await receive(reader)
    if not isinstance(hello, Hello):
        raise RuntimeError(f"worker {slot}: expected Hello first, got {type(hello).__name__}")
    configure_logging(level=hello.settings.logging.level, fmt=hello.settings.logging.format)
    structlog.contextvars.bind_contextvars(worker=slot)
    worker = ProxyWorker(hello, socket.socket(fileno=listen_fd))
    await worker.start()
    send(writer, Ready(pid=os.getpid()))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    channel_open = await _serve_channel(worker, reader, writer, stop)
    await worker.stop()
    # Done: a second SIGTERM (e.g. to the whole process group) must not turn exit 0
    # into death by signal once the loop is gone.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if channel_open:  # the last counts, so the supervisor's totals miss nothing
        send(writer, worker.report())
        try:
            await writer.drain()
        except ConnectionError:
            pass
    writer.close()
    return 0


async def _serve_channel(
    worker: ProxyWorker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event
) -> bool:
    """Apply the supervisor's messages until SIGTERM or EOF; whether the channel
    is still open."""
    stopped = asyncio.create_task(stop.wait())
    try:
        while True:
            incoming = asyncio.create_task(receive(reader))
            done, _ = await asyncio.wait({incoming, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if incoming not in done:
                incoming.cancel()
                return True
            try:
                message = incoming.result()
            except (asyncio.IncompleteReadError, ConnectionError):
                log.warning("worker_supervisor_gone")
                return False
            if isinstance(message, Sync):
                report = worker.sync(message)
                if report is not None:
                    send(writer, report)
            elif isinstance(message, Reconfigure):
                worker.reconfigure(message.settings)
    finally:
        stopped.cancel()


_FALLBACK = "fallback:"


def fallback_counters(fallback: Fallback) -> dict[str, int]:
    """A worker's fallback counts as report counters (`fallback:KIND`)."""
    return {_FALLBACK + kind: count for kind, count in fallback.counts.items()}


def summed_fallbacks(counters: dict[str, int], into: Fallback) -> None:
    """The supervisor forwards nothing itself: its `Fallback` shows the workers' sums."""
    for name, count in counters.items():
        if name.startswith(_FALLBACK):
            into.counts[name.removeprefix(_FALLBACK)] = count  # type: ignore[index]


_SHED = "shed:"


def shed_counters(shedding: Shedding) -> dict[str, int]:
    """A worker's refusals for want of its own resources as report counters (`shed:REASON`)."""
    return {_SHED + reason: count for reason, count in shedding.snapshot().items()}


def summed_shedding(counters: dict[str, int]) -> dict[str, int]:
    """The workers' summed refusals by reason, from the summed report counters."""
    return {name.removeprefix(_SHED): count for name, count in counters.items() if name.startswith(_SHED)}


def install_uvloop() -> None:
    """uvloop is an optional speed-up (`pip install canary-proxy[speed]`)."""
    if os.environ.get("CANARY_NO_UVLOOP"):
        return
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: Sequence[str] | None = None) -> int:
    # The supervisor coordinates: a Ctrl-C or a hangup sent to the whole process group
    # must not kill the workers behind its back (SIGTERM still drains one directly).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="python -m proxy.front.worker")
    parser.add_argument("slot", type=int)
    parser.add_argument("listen_fd", type=int)
    parser.add_argument("channel_fd", type=int)
    args = parser.parse_args(argv)
    install_uvloop()
    return asyncio.run(run_worker(args.slot, args.listen_fd, args.channel_fd))


if __name__ == "__main__":
    sys.exit(main())
