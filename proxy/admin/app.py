"""The admin listener: status, history, metrics, health, the dashboard and the control actions.

A thin edge over a running server (an `AdminBackend`, stored under `ADMIN_SERVER`): reads answer JSON from
the rollout controller and the config status; every POST needs `Authorization: Bearer
TOKEN` (compared in constant time) and answers the new status. Endpoints: CONTRACT §6.
"""

from __future__ import annotations

import asyncio

import hmac
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from config.errors import CanaryError, StateCorrupt, StateError
from config.watch import ConfigStatus
from proxy.front.fallback import Fallback
from proxy.front.shadow import Mirror
from proxy.admin.metrics import MetricsSource, make_registry, render
from rollout.controller import RolloutController
from rollout.evidence import EvidenceSource
from rollout.state import to_iso

__all__ = ["ADMIN_SERVER", "COMMANDS", "AdminBackend", "make_admin_app", "status_document"]

log = structlog.get_logger("canary.admin")
STATIC_DIR = Path(__file__).parent / "static"
ADMIN_SERVER: web.AppKey[AdminBackend] = web.AppKey("canary_server")
METRICS: web.AppKey[CollectorRegistry] = web.AppKey("metrics_registry")
COMMANDS = ("promote", "pause", "resume", "rollback", "reset")
_MAX_BODY = 16 * 1024
_MAX_REASON = 500
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_CSP = "default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'; base-uri 'none'"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminBackend(Protocol):
    """What the admin API needs of a running server (`proxy.front.server.CanaryServer`)."""

    admin_token: str | None
    config: ConfigStatus
    recorder: EvidenceSource
    controller: RolloutController | None
    fallback: Fallback
    mirror: Mirror

    def weight(self) -> int: ...

    def monotonic(self) -> float: ...

    def workers_status(self) -> list[dict[str, Any]] | None: ...

    def shed_totals(self) -> dict[str, int]: ...

    def body_timeout(self) -> float:
        """How long an admin request body may take to arrive (`limits.header_timeout`)."""
        ...

    def websockets_open(self) -> dict[str, int]: ...


class BadRequest(CanaryError):
    """A request body the admin API cannot act on; the message names the problem."""


def status_document(server: AdminBackend) -> dict[str, Any]:
    """CONTRACT §6 /status: the controller's view plus the config file's."""
    assert server.controller is not None
    document = {**server.controller.status(), "config": _config_document(server)}
    shadow = server.controller.policy.shadow
    document["shadow"] = {
        "active": document["state"] == "shadow", "duration": shadow, **server.mirror.status()
    }
    for arm, count in server.websockets_open().items():
        document["arms"][arm]["websockets_open"] = count
    workers = server.workers_status()
    if workers is not None:
        document["workers"] = workers
    replica = getattr(server, "replica", None)
    if replica is not None:  # state.backend: redis (CONTRACT §7)
        document.update(replica.status())
    return document


def _config_document(server: AdminBackend) -> dict[str, Any]:
    config = server.config
    return {
        "path": config.path,
        "loaded_at": to_iso(config.loaded_at),
        "error": config.error,
        "reloads": {"ok": config.reloads_ok, "rejected": config.reloads_failed},
    }


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


# -- middlewares ------------------------------------------------------------------------
@web.middleware
async def _security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # 404 / 405 / 413 as JSON, like every other answer
        if exc.status < 400:
            raise
        response = _error(exc.status, exc.reason, path=request.path)
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


@web.middleware
async def _require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every state-changing request carries the admin token."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return await handler(request)
    expected = request.app[ADMIN_SERVER].admin_token or ""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    valid = scheme.lower() == "bearer" and bool(expected)
    # Always compare, so the time taken does not depend on how the header is wrong.
    matches = hmac.compare_digest(given.strip().encode(), expected.encode())
    if not (valid and matches):
        log.warning("admin_unauthorized", path=request.path, remote=request.remote, had_token=bool(given))
        response = _error(
            401,
            "missing or wrong admin token: send 'Authorization: Bearer TOKEN' with admin.token "
            "from the config, or the admin.token file beside the state file",
        )
        response.headers["WWW-Authenticate"] = 'Bearer realm="canary-admin"'
        return response
    return await handler(request)


# -- reads ------------------------------------------------------------------------------
async def get_status(request: web.Request) -> web.Response:
    return web.json_response(status_document(request.app[ADMIN_SERVER]))


async def get_history(request: web.Request) -> web.Response:
    controller = request.app[ADMIN_SERVER].controller
    assert controller is not None
    # The whole history file is read: off the event loop, so the proxy keeps serving.
    return web.json_response(await asyncio.to_thread(controller.history))


async def get_series(request: web.Request) -> web.Response:
    """Both arms' error rate and p95 over the last minutes (for the dashboard's charts)."""
    controller = request.app[ADMIN_SERVER].controller
    assert controller is not None
    return web.json_response(controller.series())


async def get_metrics(request: web.Request) -> web.Response:
    body = render(request.app[METRICS])
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def get_healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def get_dashboard(_request: web.Request) -> web.FileResponse:
    response = web.FileResponse(STATIC_DIR / "dashboard.html")
    response.headers["Content-Security-Policy"] = _CSP
    return response


# -- control actions ----------------------------------------------------------------------
async def _read_body(request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object body (empty means {}); BadRequest names what is wrong. A body that
    does not arrive in time is a 408: a stalled client must not hold the handler."""
    try:
        async with asyncio.timeout(request.app[ADMIN_SERVER].body_timeout()):
            raw = await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="the request body did not arrive in time") from None
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object such as {{\"reason\": \"...\"}}, got {type(body).__name__}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    reason = body.get("reason", "")
    if not isinstance(reason, str):
        raise BadRequest(f"reason: expected a string, got {type(reason).__name__}")
    if len(reason) > _MAX_REASON:
        raise BadRequest(f"reason: at most {_MAX_REASON} characters, got {len(reason)}")
    return body


def _percent(body: dict[str, Any]) -> int:
    if "percent" not in body:
        raise BadRequest('percent: required, e.g. {"percent": 25}')
    percent = body["percent"]
    if isinstance(percent, float) and percent.is_integer():
        percent = int(percent)
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise BadRequest(f"percent: expected a whole number 0..100, got {json.dumps(percent)}")
    return percent


async def _run(request: web.Request, action: str, call: Callable[[Any], dict[str, Any]]) -> web.Response:
    server = request.app[ADMIN_SERVER]
    try:
        status = call(server.controller)
    except StateCorrupt as exc:
        return _error(409, str(exc), action=action)
    except StateError as exc:
        return _error(503, f"{exc}; the rollout was not changed, try again", action=action)
    except ValueError as exc:
        return _error(400, str(exc), action=action)
    log.info("admin_command", action=action, remote=request.remote)
    return web.json_response({**status, "config": _config_document(server)})


def _command_handler(action: str) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        try:
            body = await _read_body(request, ("reason",))
        except BadRequest as exc:
            return _error(400, str(exc), action=action)
        reason = body.get("reason", "")
        return await _run(request, action, lambda controller: getattr(controller, action)(reason=reason))

    handle.__name__ = f"post_{action}"
    return handle


async def post_weight(request: web.Request) -> web.Response:
    try:
        body = await _read_body(request, ("percent", "reason"))
        percent = _percent(body)
    except BadRequest as exc:
        return _error(400, str(exc), action="set_weight")
    reason = body.get("reason", "")
    return await _run(request, "set_weight", lambda controller: controller.set_weight(percent, reason=reason))


# -- the app ------------------------------------------------------------------------------
def _metrics_source(server: AdminBackend) -> MetricsSource:
    def controller() -> Any:
        assert server.controller is not None
        return server.controller

    return MetricsSource(
        recorder=server.recorder,
        weight=server.weight,
        state=lambda: controller().state.state,
        rollbacks=lambda: controller().rollbacks_total,
        reloads=lambda: {"ok": server.config.reloads_ok, "rejected": server.config.reloads_failed},
        monotonic=server.monotonic,
        fallbacks=lambda: server.fallback.counts,
        shadow_mirrored=lambda: server.mirror.sent,
        shadow_dropped=lambda: server.mirror.dropped,
        shed=server.shed_totals,
        websockets_open=server.websockets_open,
    )


def make_admin_app(server: AdminBackend) -> web.Application:
    app = web.Application(middlewares=[_security_headers, _require_token], client_max_size=_MAX_BODY)
    app[ADMIN_SERVER] = server
    app[METRICS] = make_registry(_metrics_source(server))
    app.router.add_get("/", get_dashboard)
    app.router.add_get("/status", get_status)
    app.router.add_get("/history", get_history)
    app.router.add_get("/series", get_series)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", get_healthz)
    for action in COMMANDS:
        app.router.add_post(f"/{action}", _command_handler(action))
    app.router.add_post("/weight", post_weight)
    app.router.add_static("/static/", STATIC_DIR, show_index=False, append_version=False)
    return app
