"""The proxy listener: choose an arm, forward, stream the answer back, record the outcome.

Per request this does only: read the routing snapshot, pick an arm, build the upstream
headers, forward through that arm's transport, stream the body back and record the
outcome in O(1). No config reads, no rollout logic, no info-level logging.

It runs on aiohttp's low-level `web.Server` (`make_proxy_server`): a proxy has a single
catch-all route, so URL dispatch, match info and middleware plumbing of a
`web.Application` would only cost time (~11 µs per request: 19.5k → 24.8k req/s for aiohttp
answering by itself on one core).
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any, AsyncIterable, Awaitable, Callable

import structlog
from aiohttp import HttpVersion11, web
from multidict import CIMultiDict

from config.errors import PoolExhausted, ProxyOverloaded, UpstreamError, UpstreamTimeout
from config.settings import ArmName, FallbackKind, FallbackSettings
from proxy.upstream.base import Transport, UpstreamResponse
from proxy.front.fallback import FALLBACK_HEADER, BodyNotKept, Fallback, FallbackNeeded, failure_kind
from proxy.front.headers import client_response_headers, upstream_request_headers
from proxy.front.routing import Router
from proxy.front.shadow import Mirror
from proxy.front.shedding import RETRY_AFTER, Shedding
from proxy.front.websocket import WebSockets, is_websocket_upgrade
from rollout.evidence import ArmRecorder, OutcomeRecorder

__all__ = ["PROXY_SERVER_OPTIONS", "REFUSED_METHODS", "ProxyHandler", "ProxyState", "forward", "make_proxy_handler", "make_proxy_server"]

log = structlog.get_logger("canary.proxy")

ProxyHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# Request bodies pass through as they came: a gzip upload stays gzip (Content-Encoding).
PROXY_SERVER_OPTIONS: dict[str, Any] = {"max_field_size": 16384, "auto_decompress": False}


class ProxyState:
    """What the hot path reads. `transports` is swapped whole on a config reload."""

    def __init__(
        self,
        *,
        router: Router,
        recorder: OutcomeRecorder,
        transports: dict[ArmName, Transport],
        clock: Callable[[], float],
        fallback: Fallback | None = None,
        mirror: Mirror | None = None,
        shedding: Shedding | None = None,
        websockets: WebSockets | None = None,
    ) -> None:
        self.shedding = shedding or Shedding()  # refusals for the proxy's own lack of resources
        self.websockets = websockets  # None: upgrades are not passed (Upgrade is hop-by-hop)
        self.router = router
        self.recorder = recorder
        self.recorders: dict[ArmName, ArmRecorder] = recorder.arms
        self.transports = transports
        self.clock = clock
        self.fallback = fallback or Fallback(FallbackSettings())
        self.mirror = mirror  # copies to the canary during the shadow stage


def make_proxy_handler(state: ProxyState) -> ProxyHandler:
    return functools.partial(forward, state=state)


def make_proxy_server(
    state: ProxyState, *, server_class: Callable[..., web.Server] = web.Server, **kwargs: Any
) -> web.Server:
    """The proxy listener's aiohttp server; `kwargs` go to `server_class` (e.g. access_log).
    A client that goes away cancels its handler, so its upstream exchange stops at once
    (and, as aiohttp's test server does too, tests see what production does)."""
    options = {**PROXY_SERVER_OPTIONS, "handler_cancellation": True, **kwargs}
    return server_class(make_proxy_handler(state), **options)


def _target(request: web.BaseRequest) -> str:
    """Origin-form path and query; an absolute-form target never picks the upstream."""
    raw = request.raw_path
    if raw.startswith("/") and not raw.startswith("//"):
        return raw
    return "/" + request.rel_url.raw_path_qs.lstrip("/")


def _error_response(exc: UpstreamError, arm: ArmName, arm_header: str) -> web.Response:
    body = json.dumps({"error": f"{arm}: {exc.public}", "kind": exc.kind, "arm": arm})
    response = web.Response(status=exc.status, text=body, content_type="application/json")
    if arm_header:
        response.headers[arm_header] = arm
    return response


# A tunnel (CONNECT) has no place behind a reverse proxy, and its bytes after the head are
# not HTTP: forwarded, they poison a pooled upstream connection. TRACE reflects the
# request (cookies included) back; nginx refuses both too.
REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})
_ALLOWED = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def _refuse_method(request: web.BaseRequest) -> web.Response:
    """405 from the proxy itself; the connection closes (what follows the head is unknown)."""
    body = json.dumps({"error": f"method {request.method} is not forwarded by this proxy"})
    response = web.Response(status=405, text=body, content_type="application/json", headers={"Allow": _ALLOWED})
    response.force_close()
    return response


async def forward(request: web.BaseRequest, *, state: ProxyState) -> web.StreamResponse:
    if request.method in REFUSED_METHODS:
        return _refuse_method(request)
    router = state.router
    arm = router.choose_arm(request)
    request_headers = request.headers
    if "Upgrade" in request_headers and state.websockets is not None and is_websocket_upgrade(request):
        return await state.websockets.relay(
            request, arm=arm, recorder=state.recorders[arm], clock=state.clock, arm_header=router.snapshot.arm_header
        )
    headers = upstream_request_headers(
        request_headers, client_ip=request.remote, scheme=request.scheme, host=request.host
    )
    body = None
    if request.body_exists:
        if "Expect" in request_headers:
            await _expect_continue(request)  # before begin(): a 417 is not an upstream outcome
        body = request.content.iter_any()
    if arm == "canary" and state.fallback.enabled:
        return await _forward_with_fallback(request, state, headers, body)
    snapshot = router.snapshot
    if snapshot.shadow and arm == "baseline" and state.mirror is not None and state.mirror.wants(request, snapshot):
        body = state.mirror.offer(request, _target(request), headers, body)
    return await _exchange(request, state, arm, headers, body)


async def _forward_with_fallback(
    request: web.BaseRequest, state: ProxyState, headers: CIMultiDict[str], body: AsyncIterable[bytes] | None
) -> web.StreamResponse:
    """The canary's answer, or the baseline's when the canary failed in a way
    `routing.fallback.on` lists before any byte reached the client (CONTRACT §8)."""
    fallback = state.fallback
    length = fallback.replayable_length(request)
    if length is None:  # too large, unknown length or over budget: streams, no fallback
        return await _exchange(request, state, "canary", headers, body)
    try:
        kept = await fallback.keep(request, length, fallback.body_timeout) if length else None
    except BodyNotKept as exc:
        if exc.timed_out:
            return web.json_response({"error": "the request body did not arrive in time", "arm": "canary"}, status=408)
        return web.Response(status=499, reason="Client Closed Request")  # never delivered
    try:
        try:
            return await _exchange(request, state, "canary", headers, kept, fallback_on=fallback.kinds)
        except FallbackNeeded as need:
            fallback.count(need.kind)
            return await _exchange(request, state, "baseline", headers, kept, fallback_kind=need.kind)
    finally:
        fallback.release(length)


async def _exchange(
    request: web.BaseRequest, state: ProxyState, arm: ArmName, headers: CIMultiDict[str],
    body: AsyncIterable[bytes] | None, *,
    fallback_on: frozenset[FallbackKind] = frozenset(), fallback_kind: FallbackKind | None = None,
) -> web.StreamResponse:
    """Send to `arm`, stream its answer back, record the outcome. A failure listed in
    `fallback_on` raises `FallbackNeeded` instead of answering; `fallback_kind` marks
    the baseline's answer to a replayed request."""
    router = state.router
    recorder = state.recorders[arm]
    clock = state.clock
    request_id = recorder.begin(clock())
    try:
        upstream = await state.transports[arm].send(request.method, _target(request), headers, body)
    except UpstreamError as exc:
        if isinstance(exc, (ProxyOverloaded, PoolExhausted)):  # the proxy's own limits
            recorder.abandon(request_id)  # never the arm's error
            if isinstance(exc, PoolExhausted) and "connect" in fallback_on:
                raise FallbackNeeded("connect") from None
            return _shed(state, exc, arm)
        if _client_gone(request):  # its upload broke off: not the upstream's fault
            recorder.abandon(request_id)
            return web.Response(status=499, reason="Client Closed Request")  # never delivered
        if isinstance(exc, UpstreamTimeout) and body is not None and _client_stalled(request):
            recorder.abandon(request_id)  # the upstream was waiting for the client's body
            return web.json_response({"error": "the request body did not arrive in time", "arm": arm}, status=408)
        recorder.finish(request_id, exc.status, clock(), proxy_error=True)
        kind = failure_kind(exc)
        log.warning(
            "upstream_failed", arm=arm, kind=exc.kind, status=exc.status, detail=str(exc),
            method=request.method, path=request.path,  # no query string: it may carry secrets
            fallback=kind in fallback_on,
        )
        if kind in fallback_on:
            raise FallbackNeeded(kind) from None  # type: ignore[arg-type]
        response = _error_response(exc, arm, router.snapshot.arm_header)
        if fallback_kind:
            response.headers[FALLBACK_HEADER] = fallback_kind
        return response
    except BaseException:
        recorder.abandon(request_id)
        raise
    recorder.headers_received(request_id, clock())
    if upstream.status >= 500 and "5xx" in fallback_on:
        recorder.finish(request_id, upstream.status, clock())
        await upstream.aclose()
        raise FallbackNeeded("5xx")
    response_headers = client_response_headers(upstream.headers)
    arm_header = router.snapshot.arm_header
    if arm_header:
        response_headers[arm_header] = arm
    if fallback_kind:
        response_headers[FALLBACK_HEADER] = fallback_kind
    try:
        return await _stream_back(request, upstream, response_headers, recorder, request_id, clock)
    finally:
        await upstream.aclose()


def _shed(state: ProxyState, exc: ProxyOverloaded | PoolExhausted, arm: ArmName) -> web.Response:
    """503 + Retry-After for a request the proxy could not take on; never the arm's error."""
    state.shedding.shed(exc.reason if isinstance(exc, ProxyOverloaded) else "pool_exhausted", str(exc))  # type: ignore[arg-type]
    response = _error_response(exc, arm, state.router.snapshot.arm_header)
    response.headers["Retry-After"] = RETRY_AFTER
    return response


async def _stream_back(
    request: web.BaseRequest, upstream: UpstreamResponse, headers: CIMultiDict[str],
    recorder: ArmRecorder, request_id: int, clock: Callable[[], float],
) -> web.StreamResponse:
    """Stream the body chunk by chunk as it arrives (SSE events reach the client at once);
    a body that came whole with the headers goes out in one write, head and body."""
    try:
        whole = upstream.complete_body()
        if whole is not None:
            response: web.StreamResponse = web.Response(
                status=upstream.status, reason=upstream.reason, headers=headers, body=whole
            )
            await response.prepare(request)
            await response.write_eof()
        else:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
            await response.prepare(request)
            async for chunk in upstream.iter_body():
                await response.write(chunk)
            await response.write_eof()
    except UpstreamError as exc:
        recorder.finish(request_id, exc.status, clock(), proxy_error=True)
        log.warning(
            "upstream_broke_mid_response", arm=recorder.arm, kind=exc.kind, detail=str(exc),
            method=request.method, path=request.path,
        )
        _abort(request)  # the client must see a truncated response, not a complete one
    except (ConnectionError, asyncio.CancelledError) as exc:
        recorder.abandon(request_id)  # the client went away: not the upstream's fault
        if isinstance(exc, asyncio.CancelledError):
            raise
    except Exception as exc:  # e.g. a header value aiohttp refuses to send (control chars)
        recorder.finish(request_id, 502, clock(), proxy_error=True)
        log.warning("upstream_response_unforwardable", arm=recorder.arm, error=exc.__class__.__name__,
                    method=request.method, path=request.path)
        _abort(request)
        return web.StreamResponse(status=502)  # never delivered: the connection is closed
    else:
        recorder.finish(request_id, upstream.status, clock())
    return response


async def _expect_continue(request: web.BaseRequest) -> None:
    """`Expect: 100-continue`: answer it here, as aiohttp's URL dispatcher would."""
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue" or request.version != HttpVersion11:
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing() or request.content.exception() is not None


def _client_stalled(request: web.BaseRequest) -> bool:
    """The body is unfinished and nothing of it is waiting to be sent: the proxy (and so
    the upstream) was waiting for the client, not the other way round."""
    content = request.content
    return not content.is_eof() and getattr(content, "_size", 0) == 0  # aiohttp keeps no public size


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
