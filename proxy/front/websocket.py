"""WebSocket passthrough: hand an upgrade to the arm chosen at the handshake, then relay
its bytes both ways unchanged, and record the connection's outcome for that arm.

After the upstream answered 101 the proxy takes the client's connection over from
aiohttp (`transport.set_protocol`) and splices the two sockets: frames, fragmentation,
ping/pong, extensions and close codes pass byte for byte. `FrameTracker` only reads frame
headers to know the close codes and where the proxy may put its own close frame (1012
when the canary loses its traffic, 1001 at shutdown). Backpressure is the transports'
own: a side whose write buffer passes its high-water mark pauses reading on the other,
so a slow reader costs at most one buffer per direction.

Outcome of a connection (one request of its arm, finished when the connection ends):
its handshake status and the time to it; an upstream that closes with 1006/1011 or
drops the connection without a close frame is an error; a client that leaves is not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from config.errors import UpstreamError
from config.settings import ARMS, ArmName, Upstreams, WebSocketSettings
from proxy.front.headers import client_response_headers, upstream_request_headers
from proxy.front.ws_frames import ABNORMAL_CLOSE_CODES, FrameTracker, close_frame
from proxy.front.ws_upstream import Handshake, UpstreamConnection, open_upstream
from rollout.evidence import ArmRecorder

__all__ = ["CLOSE_GRACE", "WebSockets", "is_websocket_upgrade", "open_from_counters"]

log = structlog.get_logger("canary.websocket")
CLOSE_GRACE = 2.0  # seconds a proxy-initiated close waits for the client's answer
SERVICE_RESTART = 1012
GOING_AWAY = 1001


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    headers = request.headers
    return (
        request.method == "GET"
        and headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in headers.get("Connection", "").lower()
    )


class _ClientSide(asyncio.Protocol):
    """Takes the client's transport over from aiohttp once the upgrade is answered."""

    __slots__ = ("previous", "relay")

    def __init__(self, relay: Relay, previous: asyncio.BaseProtocol) -> None:
        self.relay = relay
        self.previous = previous  # aiohttp's handler: told when the connection ends

    def data_received(self, data: bytes) -> None:
        self.relay.from_client(data)

    def eof_received(self) -> bool:
        return False  # half-closed by the client: close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.client_lost(exc)
        self.previous.connection_lost(exc)  # aiohttp forgets the connection, ends the handler

    def pause_writing(self) -> None:
        self.relay.client_backlogged(True)

    def resume_writing(self) -> None:
        self.relay.client_backlogged(False)


class Relay:
    """One open WebSocket: both transports, both directions' frame trackers, the outcome."""

    __slots__ = (
        "__weakref__",
        "_finished",
        "_first_close",
        "_grace",
        "_stop_to_client",
        "_stop_to_upstream",
        "_to_client",
        "_to_upstream",
        "arm",
        "client",
        "done",
        "from_client_frames",
        "from_upstream_frames",
        "upstream",
        "upstream_transport",
    )

    def __init__(
        self, arm: ArmName, client: asyncio.Transport, upstream: UpstreamConnection,
        finished: Callable[[Relay, bool, str], None],
    ) -> None:
        self.arm = arm
        self.client = client
        self.upstream = upstream
        assert upstream.transport is not None
        self.upstream_transport: asyncio.Transport = upstream.transport
        self.from_client_frames = FrameTracker()
        self.from_upstream_frames = FrameTracker()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._finished = finished
        self._first_close: str | None = None  # "client", "upstream" or "proxy"
        self._to_client: bytes | None = None  # a proxy close frame waiting for a frame boundary
        self._to_upstream: bytes | None = None
        self._stop_to_client = self._stop_to_upstream = False
        self._grace: asyncio.TimerHandle | None = None

    def start(self, tail: bytes) -> None:
        self.upstream.relay = self
        if tail:
            self.from_upstream(tail)
        self.upstream_transport.resume_reading()

    # -- bytes -----------------------------------------------------------------------------
    def from_client(self, data: bytes) -> None:
        frames = self.from_client_frames
        closed_before = frames.close_code is not None
        if self._stop_to_upstream:
            frames.feed(data)
        elif self._to_upstream is not None:
            taken = frames.feed(data, stop_at_boundary=True)
            self.upstream_transport.write(data[:taken])
            if frames.at_boundary:
                self._send_upstream_close()
                frames.feed(data[taken:])
        else:
            frames.feed(data)
            self.upstream_transport.write(data)
        if not closed_before and frames.close_code is not None:
            self._first_close = self._first_close or "client"
            if self._first_close == "proxy":  # the client answered our close: done with it
                self.client.close()

    def from_upstream(self, data: bytes) -> None:
        frames = self.from_upstream_frames
        closed_before = frames.close_code is not None
        if self._stop_to_client:
            frames.feed(data)
        elif self._to_client is not None:
            taken = frames.feed(data, stop_at_boundary=True)
            self.client.write(data[:taken])
            if frames.at_boundary:
                self._send_client_close()
                frames.feed(data[taken:])
        else:
            frames.feed(data)
            self.client.write(data)
        if not closed_before and frames.close_code is not None:
            self._first_close = self._first_close or "upstream"

    # -- backpressure: a full write buffer on one side pauses reading on the other ----------
    def client_backlogged(self, paused: bool) -> None:
        _set_reading(self.upstream_transport, not paused)

    def upstream_backlogged(self, paused: bool) -> None:
        _set_reading(self.client, not paused)

    # -- closing ---------------------------------------------------------------------------
    def close(self, code: int, reason: str) -> None:
        """Close both sides from the proxy: `code` to the client, 1001 to the upstream,
        each between two frames; after CLOSE_GRACE both connections are dropped."""
        if self.done.done() or self._first_close == "proxy":
            return
        self._first_close = "proxy"
        self._to_client = close_frame(code, reason, masked=False)
        self._to_upstream = close_frame(GOING_AWAY, "proxy closing", masked=True)
        if self.from_upstream_frames.at_boundary:
            self._send_client_close()
        if self.from_client_frames.at_boundary:
            self._send_upstream_close()
        self._grace = asyncio.get_running_loop().call_later(CLOSE_GRACE, self.abort)

    def _send_client_close(self) -> None:
        if self._to_client is not None:
            self.client.write(self._to_client)
            self._to_client, self._stop_to_client = None, True

    def _send_upstream_close(self) -> None:
        if self._to_upstream is not None:
            self.upstream_transport.write(self._to_upstream)
            self._to_upstream, self._stop_to_upstream = None, True

    def abort(self) -> None:
        """Drop both connections now (the handler was cancelled, or a close timed out)."""
        self.upstream_transport.abort()
        self.client.abort()
        self._finish(error=False, why="closed by the proxy")

    def client_lost(self, _exc: Exception | None) -> None:
        self.upstream.close()
        if self._first_close == "upstream":
            self._finish_after_upstream_close()
        else:
            self._finish(error=False, why="client closed")

    def upstream_lost(self, exc: Exception | None) -> None:
        self.client.close()  # whatever the upstream sent (its close frame too) goes out first
        if self._first_close == "upstream":
            self._finish_after_upstream_close()
        elif self._first_close is None:
            why = f"upstream dropped the connection ({exc.__class__.__name__})" if exc else "upstream closed without a close frame (1006)"
            self._finish(error=True, why=why)
        else:
            self._finish(error=False, why="closed")

    def _finish_after_upstream_close(self) -> None:
        code = self.from_upstream_frames.close_code
        self._finish(error=code in ABNORMAL_CLOSE_CODES, why=f"upstream closed with {code}")

    def _finish(self, *, error: bool, why: str) -> None:
        if self.done.done():
            return
        if self._grace is not None:
            self._grace.cancel()
        self.done.set_result(None)
        self._finished(self, error, why)


def _set_reading(transport: asyncio.Transport, reading: bool) -> None:
    if transport.is_closing():
        return
    if reading:
        transport.resume_reading()
    else:
        transport.pause_reading()


class WebSockets:
    """The proxy's open WebSockets by arm: relays them, counts them for the gauge, closes
    the canary's when it loses its traffic (`routing.websocket.on_rollback: close`) and
    all of them at shutdown."""

    def __init__(self, upstreams: Upstreams, settings: WebSocketSettings | None = None) -> None:
        self.upstreams = upstreams
        self.settings = settings or WebSocketSettings()
        self.open: dict[ArmName, set[Relay]] = {arm: set() for arm in ARMS}
        self.opened: dict[ArmName, int] = dict.fromkeys(ARMS, 0)  # cumulative, for workers' sums
        self._outcomes: dict[Relay, tuple[ArmRecorder, int, Callable[[], float]]] = {}

    def configure(self, upstreams: Upstreams, settings: WebSocketSettings) -> None:
        """A reload: new connections use the new upstreams; open ones stay where they are."""
        self.upstreams, self.settings = upstreams, settings

    def counts(self) -> dict[ArmName, int]:
        return {arm: len(self.open[arm]) for arm in ARMS}

    def counters(self) -> dict[str, int]:
        """Cumulative opened/closed counts (a worker reports them; open = opened - closed)."""
        out: dict[str, int] = {}
        for arm in ARMS:
            out[f"websockets_opened:{arm}"] = self.opened[arm]
            out[f"websockets_closed:{arm}"] = self.opened[arm] - len(self.open[arm])
        return out

    def weight_changed(self, before: int, after: int) -> None:
        """The router's weight moved: the canary losing its traffic closes its WebSockets."""
        if before > 0 and after == 0:
            self.canary_lost_traffic()

    def canary_lost_traffic(self) -> None:
        if self.settings.on_rollback == "close":
            self.close(("canary",), SERVICE_RESTART, "canary rolled back: reconnect")

    def close(self, arms: tuple[ArmName, ...], code: int, reason: str) -> int:
        closing = [relay for arm in arms for relay in self.open[arm]]
        for relay in closing:
            relay.close(code, reason)
        if closing:
            log.info("websockets_closing", arms=list(arms), code=code, count=len(closing))
        return len(closing)

    async def close_all_after(self, delay: float) -> None:
        """Shutdown: open WebSockets get `delay` (drain_timeout) to end, then 1001."""
        await asyncio.sleep(delay)
        self.close(ARMS, GOING_AWAY, "proxy shutting down")

    # -- one connection -------------------------------------------------------------------
    async def relay(
        self, request: web.BaseRequest, *, arm: ArmName, recorder: ArmRecorder,
        clock: Callable[[], float], arm_header: str,
    ) -> web.StreamResponse:
        headers = upstream_request_headers(request.headers, client_ip=request.remote, scheme=request.scheme, host=request.host)
        request_id = recorder.begin(clock())
        try:
            connection, answer = await open_upstream(self.upstreams.get(arm), _target(request), headers)
        except UpstreamError as exc:
            recorder.finish(request_id, exc.status, clock(), proxy_error=True)
            log.warning("websocket_handshake_failed", arm=arm, kind=exc.kind, detail=str(exc), path=request.path)
            return _refusal(exc.status, exc.kind, f"{arm}: {exc.public}", arm, arm_header)
        except BaseException:
            recorder.abandon(request_id)
            raise
        recorder.headers_received(request_id, clock())
        if answer.status != 101:
            connection.close()
            recorder.finish(request_id, answer.status, clock())
            return _forward_refusal(answer, arm, arm_header)
        return await self._run(request, connection, answer, arm, arm_header, (recorder, request_id, clock))

    async def _run(
        self, request: web.BaseRequest, connection: UpstreamConnection, answer: Handshake, arm: ArmName,
        arm_header: str, outcome: tuple[ArmRecorder, int, Callable[[], float]],
    ) -> web.StreamResponse:
        client = request.transport
        if client is None or client.is_closing():
            connection.close()
            outcome[0].abandon(outcome[1])
            return web.Response(status=499)  # never delivered: the client is gone
        response = web.StreamResponse(status=101, reason=answer.reason or "Switching Protocols", headers=_switch_headers(answer.headers, arm, arm_header))
        response.force_close()
        relay = Relay(arm, client, connection, self._finished)
        self.open[arm].add(relay)
        self.opened[arm] += 1
        self._outcomes[relay] = outcome
        client.set_protocol(_ClientSide(relay, request.protocol))
        await response.prepare(request)
        await response.write_eof()  # the 101 head goes out; from here on the relay owns the bytes
        relay.start(answer.tail)
        connection.answer = answer = None  # type: ignore[assignment]  # the head is not needed any more
        try:
            await asyncio.shield(relay.done)
        except asyncio.CancelledError:
            relay.abort()
            raise
        return response

    def _finished(self, relay: Relay, error: bool, why: str) -> None:
        self.open[relay.arm].discard(relay)
        recorder, request_id, clock = self._outcomes.pop(relay)
        recorder.finish(request_id, 502 if error else 101, clock(), proxy_error=error)
        if error:
            log.warning("websocket_upstream_failed", arm=relay.arm, detail=why)


def open_from_counters(counters: Mapping[str, int]) -> dict[ArmName, int]:
    """Open WebSockets by arm from (summed) `WebSockets.counters`."""
    return {arm: counters.get(f"websockets_opened:{arm}", 0) - counters.get(f"websockets_closed:{arm}", 0) for arm in ARMS}


def _target(request: web.BaseRequest) -> str:
    raw = request.raw_path
    return raw if raw.startswith("/") and not raw.startswith("//") else "/" + request.rel_url.raw_path_qs.lstrip("/")


def _switch_headers(upstream: CIMultiDict[str], arm: ArmName, arm_header: str) -> CIMultiDict[str]:
    headers = client_response_headers(upstream)
    headers["Upgrade"] = "websocket"
    headers["Connection"] = "Upgrade"
    if arm_header:
        headers[arm_header] = arm
    return headers


def _forward_refusal(answer: Handshake, arm: ArmName, arm_header: str) -> web.Response:
    """The upstream refused the upgrade (e.g. 401, 404): the client gets its answer."""
    headers = client_response_headers(CIMultiDictProxy(answer.headers))
    headers.popall("Content-Length", None)
    if arm_header:
        headers[arm_header] = arm
    response = web.Response(status=answer.status, reason=answer.reason or None, headers=headers, body=answer.body)
    response.force_close()
    return response


def _refusal(status: int, kind: str, message: str, arm: ArmName, arm_header: str) -> web.Response:
    response = web.json_response({"error": message, "kind": kind, "arm": arm}, status=status)
    if arm_header:
        response.headers[arm_header] = arm
    response.force_close()
    return response
