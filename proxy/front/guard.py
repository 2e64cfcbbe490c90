"""What a client connection may cost a listener: the connection cap and the timeouts.

`GuardedServer` is aiohttp's low-level `web.Server` with three defences nginx has by
default and aiohttp lacks:

- a request head must arrive whole within `header_timeout` of its first byte (of the
  connection, for the first request), and within `MAX_HEAD_BYTES` (slowloris; nginx's
  `client_header_timeout`, `large_client_header_buffers`); an idle keep-alive
  connection is closed after `keepalive_timeout` (aiohttp's own timer);
- a client that stops reading its response is dropped once the proxy's output to it has
  stayed blocked for `send_timeout` (nginx's `send_timeout`);
- past `max_connections` a new connection first takes the place of an idle keep-alive
  one (as nginx reuses them); when none is idle it is answered 503 with `Retry-After`
  at once, before any request is read, and counted in `Shedding`.

The timers are per connection and armed only while a head or an answer is waiting, so
the request path pays nothing for them.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from config.settings import LimitsSettings
from proxy.front.resources import derived_max_connections
from proxy.front.shedding import RETRY_AFTER, Shedding

__all__ = ["MAX_HEAD_BYTES", "ConnectionGuard", "GuardedAppRunner", "GuardedServer", "ListenerLimits"]

MAX_HEAD_BYTES = 64 * 1024  # a request head's bytes over several reads (Envoy: 60 KiB, nginx: 4 x 8 KiB)
_MAX_LINGERING = 64  # refused connections kept open to read the rest of their request
_LINGER = 2.0  # seconds a refused connection may take to read its 503 and close


def _plain_answer(status: str, body: str, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n{body}"
    ).encode()


_SHED_ANSWER = _plain_answer(
    "503 Service Unavailable", '{"error": "the proxy is at its connection limit; retry shortly"}',
    f"Retry-After: {RETRY_AFTER}\r\n",
)
_TIMEOUT_ANSWER = _plain_answer("408 Request Timeout", '{"error": "the request head did not arrive in time"}')
_TOO_LARGE_ANSWER = _plain_answer(
    "431 Request Header Fields Too Large", f'{{"error": "the request head is over {MAX_HEAD_BYTES} bytes"}}'
)


@dataclass(frozen=True, kw_only=True)
class ListenerLimits:
    header_timeout: float
    keepalive_timeout: float
    max_connections: int  # resolved: never 0 here
    send_timeout: float

    @classmethod
    def from_settings(cls, limits: LimitsSettings, soft_descriptors: int) -> ListenerLimits:
        """The proxy listener's limits; `max_connections: 0` is derived from the descriptor limit."""
        return cls(
            header_timeout=limits.header_timeout,
            keepalive_timeout=limits.keepalive_timeout,
            max_connections=limits.max_connections or derived_max_connections(soft_descriptors),
            send_timeout=limits.send_timeout,
        )


class ConnectionGuard:
    """One listener's limits and its counts; `limits` may be replaced (a config reload):
    connections made afterwards, and timers armed afterwards, use the new values."""

    def __init__(self, limits: ListenerLimits, shedding: Shedding) -> None:
        self.limits = limits
        self.shedding = shedding
        self.live: weakref.WeakSet[GuardedRequestHandler] = weakref.WeakSet()
        self.lingering = 0
        self.closed: Counter[str] = Counter()  # header_timeout, head_too_large, send_timeout, idle_reclaimed


class GuardedServer(web.Server):
    """`web.Server` whose connections are guarded; `guard` is shared by its connections."""

    def __init__(self, handler: Any, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.guard = guard

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        guard = self.guard
        if len(guard.live) >= guard.limits.max_connections and not self._reclaim_idle():
            return _Refused(guard)
        kwargs = {**self._kwargs, "keepalive_timeout": guard.limits.keepalive_timeout}
        handler = GuardedRequestHandler(self, loop=self._loop, guard=guard, **kwargs)
        guard.live.add(handler)
        return handler

    def _reclaim_idle(self) -> bool:
        """Close the longest-connected idle keep-alive connection, if there is one."""
        for handler in self._connections:
            if isinstance(handler, GuardedRequestHandler) and handler.idle():
                self.guard.closed["idle_reclaimed"] += 1
                handler.force_close()
                return True
        return False


class GuardedRequestHandler(RequestHandler):
    __slots__ = ("__weakref__", "_guard", "_head_bytes", "_head_timer", "_send_timer")

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._send_timer: asyncio.TimerHandle | None = None

    def idle(self) -> bool:
        """Between requests with nothing of the next one received."""
        return self._waiter is not None and not self._messages and self._head_bytes == 0 and not self._force_close

    # -- the request head -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()  # the first request's head, from the connection on

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count
        # between requests (or before the first): these bytes begin a head
        waiting = self._waiter is not None or self._request_count == 0
        super().data_received(data)
        if self._request_count != parsed:
            self._head_done()
        elif data and waiting:
            self._head_bytes += len(data)
            if self._head_timer is None:
                self._arm_head_timer()
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse("head_too_large", _TOO_LARGE_ANSWER)

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self._guard.limits.header_timeout, self._on_head_timeout)

    def _head_done(self) -> None:
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if self._waiter is None or self._messages:
            return  # a request is being handled: the head arrived
        self._refuse("header_timeout", _TIMEOUT_ANSWER if self._head_bytes else b"")

    def _refuse(self, reason: str, answer: bytes) -> None:
        """Answer (if there is anything to say) and close. The client may still be
        sending: its bytes are read and dropped for a moment, so that it reads the
        answer rather than a reset."""
        self._guard.closed[reason] += 1
        self._head_done()
        transport = self.transport
        if transport is None or not answer or not transport.can_write_eof():
            if transport is not None and answer:
                transport.write(answer)
            self.force_close()
            return
        transport.write(answer)
        transport.write_eof()
        self._force_close = True  # aiohttp reads no more requests on it
        if self._waiter is not None:
            self._waiter.cancel()
        self._loop.call_later(_LINGER, transport.abort)  # closed sooner when the client closes

    # -- the answer -----------------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self._loop.call_later(self._guard.limits.send_timeout, self._on_send_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _on_send_timeout(self) -> None:
        self._send_timer = None
        self._guard.closed["send_timeout"] += 1
        if self.transport is not None:
            self.transport.abort()  # the handler sees the client gone: not the arm's fault

    def connection_lost(self, exc: BaseException | None) -> None:
        self._head_done()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self._guard.live.discard(self)
        super().connection_lost(exc)


class _Refused(asyncio.Protocol):
    """A connection over the cap: 503 at once, the rest of its request read and dropped
    for a moment (so the client reads the answer rather than a reset), then closed."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        guard.shedding.shed("max_connections", f"{guard.limits.max_connections} client connections open")
        transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        transport.write(_SHED_ANSWER)
        if guard.lingering >= _MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        guard.lingering += 1
        transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(_LINGER, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not read: it was refused

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._guard.lingering -= 1


class GuardedAppRunner(web.AppRunner):
    """`web.AppRunner` (for the admin app) whose server is a `GuardedServer`."""

    def __init__(self, app: web.Application, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._guard = guard

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return GuardedServer(
            plain.request_handler, guard=self._guard, request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation, loop=plain._loop, **plain._kwargs,
        )
