"""`workers: N`: the supervisor's side of N proxy worker processes on one listen address.

The supervisor (`canary serve`) binds one SO_REUSEPORT listening socket per worker slot
(the kernel spreads new connections over them) and keeps it across restarts, so a
restarted worker takes over its slot's queued connections. It starts each worker
(`python -m proxy.front.worker`) with that socket and a private channel, and is the
controller's `TrafficSplit`: a weight change or new stage goes to every worker at once.
Once per tick `collect` asks every worker for its counts (one round-trip each); a worker
that exits is logged and restarted, its last counts kept in the sums.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from config.errors import WorkerStartError
from config.settings import Settings
from proxy.front.channel import Hello, Ready, Reconfigure, Sync, receive, send
from rollout.state import to_iso
from rollout.summed import SummedEvidence, WorkerReport

__all__ = ["WorkerPool"]

log = structlog.get_logger("canary.workers")
_START_TIMEOUT = 30.0  # every worker must be accepting within this at start
_MAX_BACKOFF = 5.0  # between restarts of a worker that keeps dying at once
_STABLE = 1.0  # a worker that lived this long is restarted at once
_UNRESPONSIVE = 5.0  # seconds without a report (at least 10 intervals) before a worker is killed


@dataclass(eq=False)
class _Worker:
    slot: int
    proc: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    started_at: float  # wall clock
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None
    waiter: asyncio.Future[None] | None = None
    last_heard: float = 0.0  # the supervisor loop's clock: its last report (or its start)

    @property
    def alive(self) -> bool:
        return self.ready.is_set() and self.proc.returncode is None and not self.writer.is_closing()

    def tell(self, message: Sync | Reconfigure) -> None:
        if self.alive:
            send(self.writer, message)


class WorkerPool:
    """N worker processes serving `settings.listen`, summed into one `evidence` source."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self.evidence = SummedEvidence(on_new_stage=lambda _stage: self._changed())
        self.port = 0
        self._weight = 0
        self._shadow = False
        self._sockets: list[socket.socket] = []
        self._workers: dict[int, _Worker] = {}
        self._restarts: dict[int, int] = dict.fromkeys(range(count), 0)
        self._tasks: list[asyncio.Task[None]] = []
        self._first_ready: list[asyncio.Event] = [asyncio.Event() for _ in range(count)]
        self._flush_pending = False
        self._stopping = False

    # -- start -----------------------------------------------------------------------
    def bind(self) -> int:
        """One listening socket per slot on the same address (SO_REUSEPORT); the port."""
        host, port = self.settings.listen.host, self.settings.listen.port
        try:
            for _slot in range(self.count):
                self._sockets.append(_reuseport_socket(host, port))
                port = self._sockets[0].getsockname()[1]  # port 0: the others join the first
        except BaseException:
            self.close_sockets()
            raise
        self.port = port
        return port

    async def start(self) -> None:
        """Start every worker; return once all of them accept."""
        self._tasks = [asyncio.create_task(self._supervise(slot)) for slot in range(self.count)]
        waits = [asyncio.create_task(event.wait()) for event in self._first_ready]
        done, pending = await asyncio.wait(waits, timeout=_START_TIMEOUT)
        if pending:
            for task in pending:
                task.cancel()
            raise WorkerStartError(
                f"{len(pending)} of {self.count} workers did not start within {_START_TIMEOUT:g}s; see the log"
            )

    # -- TrafficSplit and the tick ----------------------------------------------------------
    def weight(self) -> int:
        return self._weight

    def set_weight(self, weight: int) -> None:
        self._weight = weight
        self._changed()

    def set_shadow(self, active: bool) -> None:
        if active != self._shadow:
            self._shadow = active
            self._changed()

    def _changed(self) -> None:
        """Coalesce a weight change and a new stage (one transition) into one message."""
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        self._tell_all(self._sync(report=False))

    def _sync(self, *, report: bool) -> Sync:
        return Sync(weight=self._weight, stage_id=self.evidence.stage_id, report=report, shadow=self._shadow)

    async def collect(self, timeout: float) -> None:
        """Ask every worker for its counts; wait up to `timeout` for the answers (a late
        one still counts, from the next tick)."""
        loop = asyncio.get_running_loop()
        waiters = []
        sync = self._sync(report=True)
        for worker in self._workers.values():
            if worker.alive:
                worker.waiter = loop.create_future()
                waiters.append(worker.waiter)
                worker.tell(sync)
        if waiters:
            await asyncio.wait(waiters, timeout=timeout)
        self._kill_unresponsive(loop.time(), max(_UNRESPONSIVE, 10 * timeout))

    def _kill_unresponsive(self, now: float, silence: float) -> None:
        """A worker that has not answered for `silence` seconds (a wedged event loop, a
        stopped process) still holds its share of the listen socket and would swallow
        connections: kill it, and `_supervise` restarts it."""
        for worker in self._workers.values():
            if worker.alive and now - worker.last_heard > silence:
                log.error("worker_unresponsive", slot=worker.slot, pid=worker.proc.pid, silent=round(now - worker.last_heard, 1))
                worker.proc.kill()

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        self._tell_all(Reconfigure(settings=settings))

    def _tell_all(self, message: Sync | Reconfigure) -> None:
        for worker in self._workers.values():
            try:
                worker.tell(message)
            except (ConnectionError, RuntimeError) as exc:  # it is exiting: restarted anyway
                log.warning("worker_unreachable", slot=worker.slot, error=str(exc))

    def status(self) -> list[dict[str, Any]]:
        """Each slot's process, for /status."""
        return [
            {
                "slot": slot,
                "pid": worker.proc.pid if worker else None,
                "alive": bool(worker and worker.alive),
                "started_at": to_iso(worker.started_at) if worker else None,
                "restarts": self._restarts[slot],
                "requests": self.evidence.requests_of(slot),
            }
            for slot, worker in ((slot, self._workers.get(slot)) for slot in range(self.count))
        ]

    # -- stop --------------------------------------------------------------------------------
    async def stop(self) -> None:
        """Drain every worker (each finishes its in-flight requests, up to drain_timeout),
        then make sure none is left."""
        self._stopping = True
        self.close_sockets()  # the workers hold their own copies until they stop accepting
        procs = [worker.proc for worker in self._workers.values() if worker.proc.returncode is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)  # each drains and sends its last counts
        limit = self.settings.drain_timeout + 5.0
        waits = [asyncio.create_task(proc.wait()) for proc in procs]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=limit)
            for proc in procs:
                if proc.returncode is None:
                    log.error("worker_kill", pid=proc.pid, reason=f"still running {limit:g}s after drain")
                    proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()

    # -- one slot's life ---------------------------------------------------------------
    async def _supervise(self, slot: int) -> None:
        backoff = 0.0
        while not self._stopping:
            try:
                worker = await self._spawn(slot)
            except OSError as exc:
                log.error("worker_start_failed", slot=slot, error=str(exc))
                backoff = min(_MAX_BACKOFF, max(0.25, backoff * 2))
                await asyncio.sleep(backoff)
                continue
            code = await worker.proc.wait()
            if worker.reader is not None:
                await asyncio.gather(worker.reader, return_exceptions=True)
            self.evidence.retire(slot)  # its last counts stay in the totals
            if self._stopping:
                log.info("worker_stopped", slot=slot, pid=worker.proc.pid, code=code)
                return
            lived = time.time() - worker.started_at
            log.error("worker_exited", slot=slot, pid=worker.proc.pid, code=code, how=_how(code), lived=round(lived, 3))
            backoff = 0.0 if lived >= _STABLE else min(_MAX_BACKOFF, max(0.1, backoff * 2))
            if backoff:
                await asyncio.sleep(backoff)
            self._restarts[slot] += 1

    async def _spawn(self, slot: int) -> _Worker:
        listen = self._sockets[slot]
        ours, theirs = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy.front.worker", str(slot), str(listen.fileno()), str(theirs.fileno()),
                pass_fds=(listen.fileno(), theirs.fileno()), stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        worker = _Worker(slot=slot, proc=proc, writer=writer, started_at=time.time())
        self._workers[slot] = worker
        hello = Hello(
            slot=slot, settings=self.settings, weight=self._weight, stage_id=self.evidence.stage_id, shadow=self._shadow
        )
        send(writer, hello)
        worker.reader = asyncio.create_task(self._read(worker, reader))
        return worker

    async def _read(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await receive(reader)
                if isinstance(message, WorkerReport):
                    worker.last_heard = asyncio.get_running_loop().time()
                    self.evidence.receive(worker.slot, message)
                    if worker.waiter is not None and not worker.waiter.done():
                        worker.waiter.set_result(None)
                elif isinstance(message, Ready):
                    self._on_ready(worker, message)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker exited; _supervise sees why
        except ValueError as exc:
            log.error("worker_channel_broken", slot=worker.slot, error=str(exc))
            worker.proc.kill()
        finally:
            worker.writer.close()

    def _on_ready(self, worker: _Worker, ready: Ready) -> None:
        worker.last_heard = asyncio.get_running_loop().time()
        worker.ready.set()
        first = not self._first_ready[worker.slot].is_set()
        self._first_ready[worker.slot].set()
        event = "worker_started" if first else "worker_restarted"
        log.info(event, slot=worker.slot, pid=ready.pid, restarts=self._restarts[worker.slot])
        # A transition may have happened while it started: bring it up to date.
        worker.tell(self._sync(report=False))


def _reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(4096)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
