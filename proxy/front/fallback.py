"""Fallback to the baseline (CONTRACT §8): which canary failures are replayed, and the
request body kept so that they can be.

A canary request is replayable when its body is absent or has a Content-Length of at most
`routing.fallback.max_body`: such a body is read whole before the canary is contacted (it
usually arrives with the request head) and kept in memory, within a budget for all
requests at once, until the answer is chosen. Larger, chunked (unknown-length) or
over-budget bodies stream as before and get no fallback. `proxy.front.forward` does the
replay itself; this module decides and keeps the count (`canary_fallbacks_total{kind}`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import ClientPayloadError, web

from config.errors import (
    PoolExhausted,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from config.settings import FALLBACK_KINDS, FallbackKind, FallbackSettings

__all__ = [
    "FALLBACK_HEADER",
    "BodyNotKept",
    "Fallback",
    "FallbackNeeded",
    "KeptBody",
    "failure_kind",
]

FALLBACK_HEADER = "X-Canary-Fallback"
_BUDGET_BODIES = 64  # bodies of max_body kept at once, at most (64 MiB at the default)
_BUDGET_CAP = 256 * 1024 * 1024  # and never more than this in all, whatever max_body is


class FallbackNeeded(Exception):
    """The canary failed in a way `routing.fallback.on` lists, before any byte reached the
    client; its outcome is recorded. Raised by the canary's exchange, caught by the replay."""

    def __init__(self, kind: FallbackKind) -> None:
        super().__init__(kind)
        self.kind: FallbackKind = kind


class BodyNotKept(Exception):
    """The client's body did not arrive in time (`timed_out`) or the client went away."""

    def __init__(self, *, timed_out: bool) -> None:
        super().__init__("request body not received")
        self.timed_out = timed_out


def failure_kind(exc: UpstreamError) -> FallbackKind | None:
    """The fallback kind of a failure the proxy would answer 502/503/504 for; None for a
    request the proxy refuses to send at all (the baseline would refuse it too)."""
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, (UpstreamConnectError, PoolExhausted)):
        return "connect"
    return None


@dataclass(frozen=True)
class KeptBody:
    """A request body held in memory, sent as many times as needed (canary, then baseline)."""

    data: bytes

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        if self.data:
            yield self.data


class Fallback:
    """`routing.fallback` as the request path reads it, the memory budget for kept bodies,
    and the count of fallbacks by kind. One per proxy; `configure` applies a reload."""

    def __init__(self, settings: FallbackSettings, *, body_timeout: float = 30.0) -> None:
        self.counts: dict[FallbackKind, int] = {kind: 0 for kind in FALLBACK_KINDS}
        self.held = 0  # body bytes kept right now
        self.configure(settings, body_timeout=body_timeout)

    def configure(self, settings: FallbackSettings, *, body_timeout: float = 30.0) -> None:
        """`body_timeout`: how long a kept body may take to arrive (the canary's total timeout)."""
        self.body_timeout = body_timeout
        self.kinds: frozenset[FallbackKind] = frozenset(settings.on)
        self.enabled = settings.enabled and bool(self.kinds)
        self.max_body = settings.max_body
        self.budget = min(max(settings.max_body, 1) * _BUDGET_BODIES, _BUDGET_CAP)

    def replayable_length(self, request: web.BaseRequest) -> int | None:
        """The body length to keep (0 for none), or None when the body must stream."""
        if not request.body_exists:
            return 0
        length = request.content_length
        if length is None or "Transfer-Encoding" in request.headers:
            return None
        if length > self.max_body or self.held + length > self.budget:
            return None
        return length

    async def keep(self, request: web.BaseRequest, length: int, timeout: float) -> KeptBody:
        """Read the whole body (held against the budget until `release`)."""
        self.held += length
        try:
            async with asyncio.timeout(timeout):
                data = await request.content.read()
        except TimeoutError:
            self.held -= length
            raise BodyNotKept(timed_out=True) from None
        except (OSError, asyncio.IncompleteReadError, ClientPayloadError) as exc:
            self.held -= length
            raise BodyNotKept(timed_out=False) from exc
        except BaseException:
            self.held -= length
            raise
        if request.content.exception() is not None:
            self.held -= length
            raise BodyNotKept(timed_out=False)
        return KeptBody(data)

    def release(self, length: int) -> None:
        self.held -= length

    def count(self, kind: FallbackKind) -> None:
        self.counts[kind] += 1
