"""`canary serve`: both listeners, the rollout tick, config hot reload, signals and drain.

`CanaryServer` wires the pieces once (uvicorn-style: the settings only store values,
`start()` does the side effects); the background tick loop is owned by the admin app's
cleanup context; the upstream clients are closed by `stop()` once the proxy listener (a
low-level `web.Server`, which has no cleanup context) has drained.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import signal
import ssl
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import structlog
from aiohttp import web

from config.errors import StateError
from config.settings import Settings
from config.watch import ConfigStatus
from proxy.admin.app import make_admin_app
from proxy.front.websocket import WebSockets, open_from_counters
from proxy.front.fallback import Fallback
from proxy.front.shadow import Mirror, MirrorLimits
from proxy.front.forward import ProxyState, make_proxy_server
from proxy.front.guard import ConnectionGuard, GuardedAppRunner, GuardedServer, ListenerLimits
from proxy.front.reloading import ConfigReloader
from proxy.front.resources import DescriptorLimit, raise_descriptor_limit
from proxy.front.routing import Router, RoutingSnapshot
from proxy.front.shedding import Shedding
from proxy.front.tls import ListenerTls
from proxy.front.worker import summed_fallbacks, summed_shedding
from proxy.front.workers import WorkerPool
from proxy.upstream.pool import CLIENT_ENV, UpstreamClients, client_override
from rollout.controller import RolloutController
from rollout.evidence import EvidenceSource, OutcomeRecorder
from rollout.redis_store import RedisKeys, RedisLink, RedisStore
from rollout.replica import Replica, SharedEvidence
from rollout.store import JsonFileStore, StateStore

__all__ = ["CanaryServer", "token_path"]

log = structlog.get_logger("canary.server")
_WATCH_EVERY = 0.25  # seconds between config-file polls
_ADMIN_MAX_CONNECTIONS = 64  # the admin listener's own cap (dashboards, scrapers, the CLI)


def token_path(settings: Settings) -> Path:
    return settings.state.path.parent / "admin.token"


def _remove_stale_temp_files(store: JsonFileStore) -> None:
    """Temp files left by a state write that was killed halfway (SIGKILL, power loss)."""
    try:
        removed = store.remove_stale_temp_files()
    except StateError as exc:
        log.warning("stale_temp_files_kept", error=str(exc))
        return
    if removed:
        log.info("stale_temp_files_removed", files=[str(path) for path in removed])


def series_step(interval: float) -> float:
    """The dashboard's chart resolution: 5 s at the default 1 s interval, finer when the
    analysis runs faster (0.5 s at most, so ten minutes stay a small JSON document)."""
    return min(5.0, max(0.5, 5 * interval))


class CanaryServer:
    """`workers` (default: `settings.workers`) > 1 makes this process the supervisor of
    that many proxy worker processes (`proxy.front.workers`); 1 serves in-process."""

    def __init__(
        self, settings: Settings, *, clock: Callable[[], float] = time.time, workers: int | None = None
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.config = ConfigStatus(path=str(settings.source) if settings.source else None, loaded_at=clock())
        self.admin_token = settings.admin.token
        self._local = OutcomeRecorder(
            window=settings.analysis.window,
            warn_limit=settings.analysis.latency.p95_warning,
            crit_limit=settings.analysis.latency.p99_critical,
        )
        count = settings.workers if workers is None else workers
        self.pool = WorkerPool(settings, count) if count > 1 else None
        self.recorder: EvidenceSource = self.pool.evidence if self.pool else self._local
        self.router = Router(RoutingSnapshot.from_settings(settings.routing, 0))
        self.fallback = Fallback(settings.routing.fallback, body_timeout=settings.upstreams.canary.timeout.total)
        self.mirror = Mirror(  # sends copies only in this process's own proxy listener (no workers)
            recorder=self._local.arms["canary"],
            transport=lambda: self.proxy_state.transports["canary"],
            clock=lambda: asyncio.get_running_loop().time(),
        )
        self.mirror.configure(settings.rollout, MirrorLimits.from_settings(settings))
        self.shedding = Shedding()
        self.descriptors: DescriptorLimit | None = None
        self.proxy_guard: ConnectionGuard | None = None
        self.admin_guard: ConnectionGuard | None = None
        self._workers_shed: dict[str, int] = {}
        self.upstreams: UpstreamClients | None = None
        self.proxy_state: ProxyState | None = None
        self.controller: RolloutController | None = None
        self.replica: Replica | None = None  # state.backend: redis
        self.tls: ListenerTls | None = None
        self.reloader = ConfigReloader(
            settings.source, status=self.config, clock=clock, apply=self._apply,
            max_bytes=lambda: self.settings.limits.max_config_bytes, ready=lambda: self._started.is_set(),
        )
        self.websockets: WebSockets | None = None  # in-process; with workers each has its own
        self._runners: list[web.BaseRunner] = []
        self._started = asyncio.Event()
        self.proxy_port = 0
        self.admin_port = 0

    def weight(self) -> int:
        """The weight the proxy listener applies now."""
        return self.pool.weight() if self.pool else self.router.snapshot.weight

    def websockets_open(self) -> dict[str, int]:
        """Open WebSockets by arm (summed over the workers)."""
        if self.pool:
            return dict(open_from_counters(self.pool.evidence.counters()))
        return dict(self.websockets.counts()) if self.websockets else {}

    def workers_status(self) -> list[dict[str, Any]] | None:
        """Each worker process (slot, pid, restarts, requests); None with one process."""
        return self.pool.status() if self.pool else None

    def monotonic(self) -> float:
        """The proxy listener's clock (0 before it started)."""
        if self.pool:
            return asyncio.get_running_loop().time()
        return self.proxy_state.clock() if self.proxy_state else 0.0

    # -- start / stop -------------------------------------------------------------
    async def start(self) -> None:
        """Bind both listeners (traffic goes to the baseline until the rollout state is
        loaded), then load the state and start the tick. A failed bind leaves nothing
        behind but the token file (reused next time): no client sessions, no state written."""
        loop = asyncio.get_running_loop()
        self._ensure_token()
        self._guard_listeners()
        self.tls = ListenerTls(self.settings.tls) if self.settings.tls else None
        if self.pool is None:
            self.upstreams = UpstreamClients(self.settings.upstreams)
            self.websockets = WebSockets(self.settings.upstreams, self.settings.routing.websocket)
            self.router.on_weight = self.websockets.weight_changed
            self.proxy_state = ProxyState(
                router=self.router, recorder=self._local, transports=self.upstreams.transports, clock=loop.time,
                fallback=self.fallback, mirror=self.mirror, shedding=self.shedding, websockets=self.websockets,
            )
        files = JsonFileStore(self.settings.state.path)
        store: StateStore = files
        evidence = self.recorder
        if self.settings.state.backend == "redis":
            store, evidence = self._join_replicas(loop.time)
        else:
            _remove_stale_temp_files(files)
        self.controller = RolloutController(
            self.settings,
            recorder=evidence,
            split=self.pool or self.router,
            store=store,
            clock=self.clock,
            monotonic=loop.time,
            series_step=series_step(self.settings.analysis.interval),
            gate=self.replica.allows if self.replica else None,
        )
        try:
            await self._bind()
            if self.replica:
                await self._first_exchange()
            self.controller.start()
            if self.pool:  # each worker starts at the loaded weight
                await self.pool.start()
        except BaseException:
            await self.stop(quiet=True)
            raise
        self._started.set()
        log.info(
            "serving",
            workers=self.pool.count if self.pool else 1,
            proxy=f"{'https' if self.tls else 'http'}://{self.settings.listen.host}:{self.proxy_port}",
            admin=f"http://{self.settings.admin.listen.host}:{self.admin_port}",
            weight=self.weight(),
            config=self.config.path,
            max_connections=self.proxy_guard.limits.max_connections if self.proxy_guard else None,
        )

    def _join_replicas(self, monotonic: Callable[[], float]) -> tuple[StateStore, EvidenceSource]:
        """`state.backend: redis`: the shared store, and the evidence summed over replicas."""
        redis = self.settings.state.redis
        link = RedisLink(redis)
        store = RedisStore(link, RedisKeys.of(redis.key_prefix, self.settings.rollout.name))
        self.replica = Replica(
            self.settings, link, store, state_of=lambda: self.controller.state, local=self.recorder,
            clock=self.clock, monotonic=monotonic,
        )
        return store, SharedEvidence(self.recorder, self.replica)

    async def _first_exchange(self) -> None:
        """Read the shared state before serving it; unreachable: weight 0 until it answers."""
        assert self.replica is not None and self.controller is not None
        if not await self.replica.exchange():
            log.error(
                "redis_unreachable_at_start", url=self.replica.link.url, error=self.replica.store.error,
                weight=0, detail="serving the baseline only until Redis answers",
            )
        self.replica.listen(self.controller.refresh)

    def _guard_listeners(self) -> None:
        """Raise the descriptor limit (logged both ways) and size both listeners' guards."""
        self.descriptors = limit = raise_descriptor_limit()
        log.info("descriptor_limit", soft_before=limit.soft_before, soft=limit.soft, hard=limit.hard, error=limit.error)
        if client_override():
            log.warning("deprecated_environment", variable=CLIENT_ENV, use="upstreams.NAME.client in the config")
        proxy_limits = ListenerLimits.from_settings(self.settings.limits, limit.soft)
        self.proxy_guard = ConnectionGuard(proxy_limits, self.shedding)
        self.admin_guard = ConnectionGuard(replace(proxy_limits, max_connections=_ADMIN_MAX_CONNECTIONS), self.shedding)

    def body_timeout(self) -> float:
        return self.settings.limits.header_timeout

    def shed_totals(self) -> dict[str, int]:
        """Requests refused for the proxy's own lack of resources, by reason (this
        process's listeners and every worker's)."""
        own = self.shedding.snapshot()
        return {reason: count + self._workers_shed.get(reason, 0) for reason, count in own.items()}

    async def _bind(self) -> None:
        admin_app = make_admin_app(self)
        admin_app.cleanup_ctx.append(self._tick_ctx)
        drain = {"handle_signals": False, "shutdown_timeout": self.settings.drain_timeout}
        if self.pool:  # the workers serve the proxy listener
            self.proxy_port = self.pool.bind()
        else:  # the low-level server, guarded: no URL dispatch on the hot path
            server_class = functools.partial(GuardedServer, guard=self.proxy_guard)
            proxy_server = make_proxy_server(self.proxy_state, access_log=None, server_class=server_class)
            proxy_runner = web.ServerRunner(proxy_server, **drain)
            tls = self.tls.context if self.tls else None
            self.proxy_port = await self._listen(proxy_runner, self.settings.listen.host, self.settings.listen.port, tls)
        admin_runner = GuardedAppRunner(admin_app, guard=self.admin_guard, access_log=None, **drain)
        self.admin_port = await self._listen(admin_runner, self.settings.admin.listen.host, self.settings.admin.listen.port)

    async def _listen(self, runner: web.BaseRunner, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        self._runners.append(runner)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True, ssl_context=tls)
        await site.start()
        return runner.addresses[0][1]

    async def stop(self, *, quiet: bool = False) -> None:
        """Stop accepting, let in-flight requests finish (up to drain_timeout), close.
        Every step runs even if an earlier one failed: a shutdown always finishes."""
        if not quiet:
            log.info("draining", timeout=self.settings.drain_timeout)
        self.reloader.cancel()
        if self.pool is not None:
            try:
                await self.pool.stop()
            except Exception:
                log.exception("shutdown_step_failed", step="workers")
        # WebSockets never end by themselves: they get drain_timeout, then 1001.
        going_away = asyncio.ensure_future(self.websockets.close_all_after(self.settings.drain_timeout)) if self.websockets else None
        for runner in self._runners:
            try:
                await runner.cleanup()
            except Exception:
                log.exception("shutdown_step_failed", step="listener")
        self._runners.clear()
        await self.mirror.close()  # copies in flight: their answers are discarded anyway
        if going_away is not None:
            going_away.cancel()
        if self.upstreams is not None:  # the proxy has drained: no request uses them now
            try:
                await self.upstreams.close()
            except Exception:
                log.exception("shutdown_step_failed", step="upstream clients")
            self.upstreams = None
        if self.replica is not None:  # after the listeners: the tick loop has stopped
            await asyncio.to_thread(self.replica.close)
            self.replica = None
        if not quiet:
            log.info("stopped")

    async def _tick_ctx(self, _app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(self._tick_loop())  # it waits for start() to finish
        yield
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    def _ensure_token(self) -> None:
        """No token configured: use the token file beside the state file, making it once
        (mode 0600). Reusing it means a restart, or a second `serve` that fails to bind,
        never invalidates the token the CLI and operators already hold."""
        if self.admin_token:
            return
        path = token_path(self.settings)
        try:
            existing = path.read_text().strip()
        except FileNotFoundError:
            existing = ""
        if existing:
            self.admin_token = existing
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        tmp.replace(path)
        self.admin_token = token
        log.info("admin_token_created", path=str(path))

    # -- the tick: rollout analysis and config watching -----------------------------
    async def _tick_loop(self) -> None:
        await self._started.wait()
        loop = asyncio.get_running_loop()
        last_analysis = float("-inf")
        while True:
            now = loop.time()
            try:
                # Measured from the last tick with the current interval, so a reloaded
                # (shorter) analysis.interval applies at once.
                if now - last_analysis >= self.settings.analysis.interval:
                    last_analysis = now
                    if self.pool:  # the workers' counts, fresh for this decision
                        await self.pool.collect(timeout=min(0.5, self.settings.analysis.interval / 2))
                        summed_fallbacks(self.pool.evidence.counters(), into=self.fallback)
                        self.mirror.absorb(self.pool.evidence.counters())
                        self._workers_shed = summed_shedding(self.pool.evidence.counters())
                    if self.replica:  # this replica's counts out, everyone's in: one round trip
                        await self.replica.exchange()
                    self.controller.tick()
                self.reloader.poll(now)
            except Exception:  # the tick must survive anything; the error is logged
                log.exception("tick_failed")
            due = last_analysis + self.settings.analysis.interval
            await asyncio.sleep(min(_WATCH_EVERY, max(0.01, due - loop.time())))

    def request_reload(self) -> None:
        """SIGHUP: reload in the background (`proxy.front.reloading`)."""
        self.reloader.request()

    async def reload(self) -> bool:
        """Re-read the config file now; False when it was rejected (or nothing to do)."""
        return await self.reloader.reload()

    def _apply(self, fresh: Settings) -> None:
        old = self.settings
        if fresh.listen != old.listen or fresh.admin.listen != old.admin.listen:
            log.warning("listen_change_needs_restart", listen=str(fresh.listen), admin=str(fresh.admin.listen))
        self._apply_tls(fresh)
        if fresh.logging != old.logging:
            log.warning("logging_change_needs_restart", level=fresh.logging.level, format=fresh.logging.format)
        if fresh.workers != old.workers:
            log.warning("workers_change_needs_restart", workers=fresh.workers)
        if fresh.admin.token and fresh.admin.token != self.admin_token:
            self.admin_token = fresh.admin.token
        if self.pool:
            self.pool.reconfigure(fresh)
        self._local.configure(
            window=fresh.analysis.window,
            warn_limit=fresh.analysis.latency.p95_warning,
            crit_limit=fresh.analysis.latency.p99_critical,
        )
        self.router.set_routing(fresh.routing)
        if self.websockets is not None:
            self.websockets.configure(fresh.upstreams, fresh.routing.websocket)
        self.fallback.configure(fresh.routing.fallback, body_timeout=fresh.upstreams.canary.timeout.total)
        self.mirror.configure(fresh.rollout, MirrorLimits.from_settings(fresh))
        if fresh.limits != old.limits and self.proxy_guard is not None and self.descriptors is not None:
            self.proxy_guard.limits = limits = ListenerLimits.from_settings(fresh.limits, self.descriptors.soft)
            if self.admin_guard is not None:
                self.admin_guard.limits = replace(limits, max_connections=_ADMIN_MAX_CONNECTIONS)
        if self.upstreams is not None and fresh.upstreams != old.upstreams:
            self.proxy_state.transports = self.upstreams.replace(fresh.upstreams, drain=old.drain_timeout)
        self.settings = fresh
        self.controller.apply_settings(fresh)

    def _apply_tls(self, fresh: Settings) -> None:
        """Re-read the certificate on every reload (a renewed one applies to the next
        connection); turning TLS on or off changes the listener: that needs a restart."""
        if (fresh.tls is None) != (self.tls is None):
            log.warning("tls_change_needs_restart", tls="on" if fresh.tls else "off")
        elif self.tls is not None and fresh.tls is not None:
            self.tls.load(fresh.tls)

    # -- foreground run -------------------------------------------------------------
    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        await self.start()
        await stop.wait()
        await self.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Done: a repeated signal while the interpreter exits must not turn exit 0 into
            # death by signal (closing the loop would restore the default action).
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
