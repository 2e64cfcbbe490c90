"""The proxy listener: choose an arm, forward, stream the answer back, record the outcome.

Per request this does only: read the routing snapshot, pick an arm, build the upstream
headers, forward through that arm's transport, stream the body back and record the
outcome in O(1). No config reads, no rollout logic, no info-level logging.
"""

from __future__ import annotations

import asyncio
import json
from typing import Callable

import structlog
from aiohttp import web
from multidict import CIMultiDict

from config.errors import UpstreamError
from config.settings import ArmName
from proxy.client_transport import Transport, UpstreamResponse
from proxy.headers import client_response_headers, upstream_request_headers
from proxy.routing import Router
from rollout.evidence import ArmRecorder, OutcomeRecorder

__all__ = ["PROXY_STATE", "ProxyState", "forward", "make_proxy_app"]

log = structlog.get_logger("canary.proxy")


class ProxyState:
    """What the hot path reads. `transports` is swapped whole on a config reload."""

    def __init__(
        self,
        *,
        router: Router,
        recorder: OutcomeRecorder,
        transports: dict[ArmName, Transport],
        clock: Callable[[], float],
    ) -> None:
        self.router = router
        self.recorder = recorder
        self.recorders: dict[ArmName, ArmRecorder] = recorder.arms
        self.transports = transports
        self.clock = clock


PROXY_STATE = web.AppKey("proxy_state", ProxyState)


def _target(request: web.BaseRequest) -> str:
    """Origin-form path and query; an absolute-form target never picks the upstream."""
    raw = request.raw_path
    if raw.startswith("/") and not raw.startswith("//"):
        return raw
    return "/" + request.rel_url.raw_path_qs.lstrip("/")


def _error_response(exc: UpstreamError, arm: ArmName, arm_header: str) -> web.Response:
    body = json.dumps({"error": str(exc), "kind": exc.kind, "arm": arm})
    response = web.Response(status=exc.status, text=body, content_type="application/json")
    if arm_header:
        response.headers[arm_header] = arm
    return response


async def forward(request: web.Request) -> web.StreamResponse:
    state = request.app[PROXY_STATE]
    snapshot = state.router.snapshot
    arm = state.router.choose_arm(request)
    recorder = state.recorders[arm]
    clock = state.clock
    request_id = recorder.begin(clock())
    headers = upstream_request_headers(
        request.headers, client_ip=request.remote, scheme=request.scheme, host=request.host
    )
    body = request.content.iter_any() if request.body_exists else None
    try:
        upstream = await state.transports[arm].send(request.method, _target(request), headers, body)
    except UpstreamError as exc:
        recorder.finish(request_id, exc.status, clock(), proxy_error=True)
        log.warning("upstream_failed", arm=arm, kind=exc.kind, status=exc.status, detail=str(exc))
        return _error_response(exc, arm, snapshot.arm_header)
    except BaseException:
        recorder.abandon(request_id)
        raise
    recorder.headers_received(request_id, clock())
    try:
        return await _stream_back(request, upstream, recorder, request_id, arm, snapshot.arm_header, clock)
    finally:
        await upstream.aclose()


async def _stream_back(
    request: web.BaseRequest,
    upstream: UpstreamResponse,
    recorder: ArmRecorder,
    request_id: int,
    arm: ArmName,
    arm_header: str,
    clock: Callable[[], float],
) -> web.StreamResponse:
    headers: CIMultiDict[str] = client_response_headers(upstream.headers)
    if arm_header:
        headers[arm_header] = arm
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    try:
        await response.prepare(request)
        async for chunk in upstream.iter_body():
            await response.write(chunk)
        await response.write_eof()
    except UpstreamError as exc:
        recorder.finish(request_id, exc.status, clock(), proxy_error=True)
        log.warning("upstream_broke_mid_response", arm=arm, kind=exc.kind, detail=str(exc))
        _abort(request)  # the client must see a truncated response, not a complete one
        return response
    except (ConnectionError, asyncio.CancelledError) as exc:
        recorder.abandon(request_id)  # the client went away: not the upstream's fault
        if isinstance(exc, asyncio.CancelledError):
            raise
        return response
    recorder.finish(request_id, upstream.status, clock())
    return response


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def make_proxy_app(state: ProxyState) -> web.Application:
    app = web.Application(handler_args={"max_field_size": 16384})
    app[PROXY_STATE] = state
    app.router.add_route("*", "/{tail:.*}", forward)
    return app
