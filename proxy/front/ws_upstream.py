"""The upstream side of a WebSocket: connect to the arm's configured upstream, send the
client's handshake, read the answer (101, or a refusal with its body).

Only the upstream URL of the chosen arm is ever contacted. Once the upstream switched
protocols the connection's bytes belong to the relay (`proxy.front.websocket`); until
then the answer is parsed by httptools within the upstream's connect and total timeouts.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import Protocol

import httptools
from multidict import CIMultiDict
from yarl import URL

from config.errors import UpstreamConnectError, UpstreamError, UpstreamTimeout
from config.settings import UpstreamSettings

__all__ = ["Handshake", "RelaySide", "UpstreamConnection", "open_upstream"]

MAX_HEAD = 65536  # bytes of the upstream's answer head, as the HTTP clients allow
MAX_REFUSAL_BODY = 1 << 20  # a refused handshake's body is read whole: at most 1 MiB


class RelaySide(Protocol):
    """What the upstream connection reports to once the relay owns it."""

    def from_upstream(self, data: bytes) -> None: ...

    def upstream_lost(self, exc: Exception | None) -> None: ...

    def upstream_backlogged(self, paused: bool) -> None: ...


@dataclass
class Handshake:
    """The upstream's answer: a 101 (`tail` holds frames sent right after it) or a refusal."""

    status: int = 0
    reason: str = ""
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytes = b""
    tail: bytes = b""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("_body", "_body_size", "_head_size", "_parser", "answer", "arm", "done", "relay", "transport")

    def __init__(self, arm: str, loop: asyncio.AbstractEventLoop) -> None:
        self.arm = arm
        self.transport: asyncio.Transport | None = None
        self.relay: RelaySide | None = None
        self.answer = Handshake()
        self.done: asyncio.Future[Handshake] = loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._head_size = 0
        self._body: list[bytes] = []
        self._body_size = 0

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.from_upstream(data)
            return
        if self.done.done():
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._switched(data[upgrade.args[0] :])
        except httptools.HttpParserError as exc:
            self._fail(UpstreamConnectError(self.arm, f"{self.arm}: invalid handshake answer: {exc}"))
        else:
            if not self.done.done() and self.answer.status == 0:
                self._head_size += len(data)
                if self._head_size > MAX_HEAD:
                    self._fail(UpstreamConnectError(self.arm, f"{self.arm}: handshake answer head over {MAX_HEAD} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.relay is not None:
            self.relay.upstream_lost(exc)
        else:
            self._fail(UpstreamConnectError(self.arm, f"{self.arm}: the upstream closed the connection during the handshake"))

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.upstream_backlogged(True)

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.upstream_backlogged(False)

    # -- httptools callbacks ---------------------------------------------------------
    def on_status(self, status: bytes) -> None:
        self.answer.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.answer.headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self.answer.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > MAX_REFUSAL_BODY:
            self._fail(UpstreamConnectError(self.arm, f"{self.arm}: refused handshake with a body over 1 MiB"))
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self.answer.status == 101:
            return  # the upgrade is reported by HttpParserUpgrade right after this
        self.answer.body = b"".join(self._body)
        if not self.done.done():
            self.done.set_result(self.answer)

    # -- outcome -----------------------------------------------------------------------
    def _switched(self, tail: bytes) -> None:
        if self.done.done():
            return
        self.answer.tail = tail
        self._parser = None  # type: ignore[assignment]  # the bytes are frames from now on
        self._body = []
        if self.transport is not None:
            self.transport.pause_reading()  # frames wait until the client's side is ready
        self.done.set_result(self.answer)

    def _fail(self, exc: UpstreamError) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Target:
    """Where the arm's upstream is and how its requests look (host header, path prefix)."""

    def __init__(self, upstream: UpstreamSettings) -> None:
        url = URL(upstream.url)
        self.host = url.raw_host or "localhost"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = 443 if url.scheme == "https" else 80
        self.host_header = host if self.port == default_port else f"{host}:{self.port}"
        self.prefix = url.raw_path.rstrip("/")


def _request_head(target: _Target, arm: str, path_qs: str, headers: CIMultiDict[str]) -> bytes:
    parts = ["GET ", target.prefix, path_qs, " HTTP/1.1\r\nHost: ", target.host_header, "\r\n"]
    for name, value in headers.items():
        parts += (name, ": ", value, "\r\n")
    parts.append("Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    text = "".join(parts)
    lines = len(headers) + 5
    if text.count("\n") != lines or text.count("\r") != lines:
        raise UpstreamError(arm, f"{arm}: refusing to forward a CR or LF inside the handshake head")
    return text.encode("utf-8", "surrogateescape")


async def open_upstream(
    upstream: UpstreamSettings, path_qs: str, headers: CIMultiDict[str]
) -> tuple[UpstreamConnection, Handshake]:
    """Connect (retrying connect failures as the HTTP clients do), send the handshake and
    wait for the answer, within `timeout.total`. Raises UpstreamError subclasses."""
    arm, target = upstream.name, _Target(upstream)
    head = _request_head(target, arm, path_qs, headers)
    loop = asyncio.get_running_loop()
    connection: UpstreamConnection | None = None
    try:
        async with asyncio.timeout(upstream.timeout.total):
            connection = await _connect(upstream, target, loop)
            assert connection.transport is not None
            connection.transport.write(head)
            return connection, await connection.done
    except TimeoutError:
        if connection is not None:
            connection.close()
        raise UpstreamTimeout(arm, f"{arm}: no handshake answer in {upstream.timeout.total:g}s") from None
    except BaseException:
        if connection is not None:
            connection.close()
        raise


async def _connect(upstream: UpstreamSettings, target: _Target, loop: asyncio.AbstractEventLoop) -> UpstreamConnection:
    arm, retries = upstream.name, upstream.retries
    attempt = 0
    while True:
        try:
            async with asyncio.timeout(upstream.timeout.connect):
                _, connection = await loop.create_connection(
                    lambda: UpstreamConnection(arm, loop), target.host, target.port,
                    ssl=target.ssl, server_hostname=target.host if target.ssl else None,
                )
            return connection
        except (OSError, TimeoutError) as exc:
            if attempt >= retries.attempts:
                if isinstance(exc, TimeoutError):
                    raise UpstreamTimeout(arm, f"{arm}: upstream timed out (connect {upstream.timeout.connect:g}s)") from None
                raise UpstreamConnectError(arm, f"{arm}: cannot connect to upstream: {exc}") from None
            await asyncio.sleep(retries.backoff * 2**attempt)
            attempt += 1
