"""One HTTP/1.1 connection to an upstream and one request/response exchange on it.

The wire half of `proxy.upstream.lean`: an `asyncio.Protocol` whose bytes are parsed in C
by httptools, and an `Exchange` (the `UpstreamResponse` the proxy streams back). Flow
control both ways: reading pauses while more than `_HIGH_WATER` bytes of the body wait
for the client, and the request body waits while the socket's write buffer is full.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import AsyncIterable, AsyncIterator, Protocol

import httptools
from multidict import CIMultiDict

from config.errors import UpstreamConnectError, UpstreamTimeout
from proxy.upstream.base import MAX_RESPONSE_HEAD_BYTES, MAX_RESPONSE_HEADERS, describe

__all__ = ["Connection", "ConnectionOwner", "Exchange"]

_HIGH_WATER = 256 * 1024  # body bytes buffered for a slow client before reading pauses
_TOO_LARGE = f"the upstream's response head is over {MAX_RESPONSE_HEAD_BYTES} bytes or {MAX_RESPONSE_HEADERS} headers"


class ConnectionOwner(Protocol):
    """What a connection needs of the pool that owns it (`proxy.upstream.lean.Http1Transport`)."""

    arm: str
    total: float

    def release_slot(self) -> None: ...

    def release(self, conn: Connection, *, reuse: bool) -> None: ...

    def forget(self, conn: Connection) -> None: ...


class Exchange:
    """One request and its streaming response; also the `UpstreamResponse` handed out."""

    __slots__ = (
        "status", "reason", "headers", "conn", "head_only", "received", "body_task", "waiter", "error",
        "_owner", "_chunks", "_buffered", "_complete", "_timer", "_closed",
    )

    def __init__(self, owner: ConnectionOwner, conn: Connection, *, head_only: bool, deadline: float) -> None:
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDict[str] | None = None
        self.conn = conn
        self.head_only = head_only
        self.received = False  # any byte of the response seen
        self.body_task: asyncio.Task[None] | None = None
        self._owner = owner
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self.waiter: asyncio.Future[None] | None = None  # the one task waiting for progress
        self._complete = False
        self.error: BaseException | None = None
        self._closed = False
        self._timer = conn.loop.call_at(deadline, self._on_timeout)

    # -- fed by the connection ------------------------------------------------------
    def on_head(self, status: int, reason: str, headers: CIMultiDict[str]) -> None:
        self.status, self.reason, self.headers = status, reason, headers
        self._wake()

    def on_body(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > _HIGH_WATER:
            self.conn.pause_reading()
        self._wake()

    def on_complete(self) -> None:
        if not self._complete:
            self._complete = True
            self._timer.cancel()
            self._wake()

    def fail(self, exc: BaseException) -> None:
        """The exchange cannot go on; the connection is not reused."""
        if self.error is None and not self._complete:
            self.error = exc
            self._timer.cancel()
        self.conn.reusable = False
        self._wake()

    def _on_timeout(self) -> None:
        owner = self._owner
        self.fail(UpstreamTimeout(owner.arm, f"{owner.arm}: upstream timed out (total {owner.total:g}s)"))
        self.conn.abort()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- read by the proxy ----------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self._complete

    def complete_body(self) -> bytes | None:
        if not self._complete or self.error is not None:
            return None
        chunks = self._chunks
        body = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        return body

    async def iter_body(self) -> AsyncIterator[bytes]:
        chunks = self._chunks
        while True:
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                self.conn.resume_reading()
                yield data
            elif self.error is not None:
                raise self.error
            elif self._complete:
                return
            else:
                self.waiter = waiter = self.conn.loop.create_future()
                await waiter

    async def aclose(self) -> None:
        if self.discard():
            self._owner.release_slot()

    def discard(self) -> bool:
        """Give the connection back (reused only after a clean, complete exchange);
        False if that was done already. The pool slot is the caller's to release."""
        if self._closed:
            return False
        self._closed = True
        self._timer.cancel()
        task = self.body_task
        if task is not None and not task.done():
            task.cancel()
            self.conn.reusable = False
        self._owner.release(self.conn, reuse=self._complete and self.error is None)
        return True


class Connection(asyncio.Protocol):
    """A pooled upstream connection; httptools calls the `on_*` methods while parsing."""

    __slots__ = (
        "owner", "loop", "transport", "exchange", "reusable", "idle_since", "in_idle", "_parser",
        "_fresh_parser", "_headers", "_reason", "_interim", "_until_eof", "_reading_paused",
        "_write_paused", "_drain", "_head_bytes", "_raw_head",
    )

    def __init__(self, owner: ConnectionOwner, loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.reusable = True
        self.idle_since = 0.0
        self.in_idle = False
        self._parser = httptools.HttpResponseParser(self)
        self._fresh_parser = False
        self._headers: list[tuple[str, str]] = []
        self._reason = b""
        self._interim = False
        self._until_eof = False
        self._reading_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._head_bytes = 0
        self._raw_head = 0  # bytes received before the final response head was complete

    # -- asyncio.Protocol -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # nothing was asked: the connection is out of step
            self.reusable = False
            self.abort()
            return
        exchange.received = True
        unfinished_head = exchange.headers is None
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            too_large = isinstance(exc.__context__, _HeadTooLarge)
            self._refuse(exchange, _TOO_LARGE if too_large else f"invalid HTTP response from upstream: {exc}")
        else:
            if unfinished_head:
                self._raw_head += len(data)
                if exchange.headers is None and self._raw_head > MAX_RESPONSE_HEAD_BYTES:
                    self._refuse(exchange, _TOO_LARGE)  # httptools would buffer it all
        if self._fresh_parser:  # after a HEAD response the parser still expects a body
            self._fresh_parser = False
            self._parser = httptools.HttpResponseParser(self)

    def _refuse(self, exchange: Exchange, detail: str) -> None:
        arm = self.owner.arm
        exchange.fail(UpstreamConnectError(arm, f"{arm}: {detail}"))
        self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.owner.forget(self)
        exchange = self.exchange
        if exchange is not None and not exchange.complete:
            if self._until_eof and exchange.headers is not None and exc is None:
                exchange.on_complete()  # the body was delimited by the close (a reset cuts it short)
            else:
                arm = self.owner.arm
                detail = "closed the connection" if exc is None else f"broke the connection: {describe(exc)}"
                exchange.fail(UpstreamConnectError(arm, f"{arm}: upstream {detail}"))
        self._wake_drain()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    # -- httptools callbacks --------------------------------------------------------
    def on_message_begin(self) -> None:
        self._headers = []
        self._reason = b""
        self._head_bytes = 0

    def on_status(self, status: bytes) -> None:
        self._reason += status
        self._count_head(len(status))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        self._headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))
        if len(self._headers) > MAX_RESPONSE_HEADERS:
            raise _HeadTooLarge

    def _count_head(self, size: int) -> None:
        """httptools has no cap of its own; it may also hand over a line in pieces."""
        self._head_bytes += size
        if self._head_bytes > MAX_RESPONSE_HEAD_BYTES:
            raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        exchange = self.exchange
        if status < 200 or exchange is None:
            self._interim = True  # 1xx: an interim answer, the real one follows
            return
        headers: CIMultiDict[str] = CIMultiDict(self._headers)
        self._until_eof = (
            "Content-Length" not in headers and "Transfer-Encoding" not in headers and status not in (204, 304)
        )
        exchange.on_head(status, self._reason.decode("latin-1"), headers)
        if exchange.head_only:
            self._until_eof = False
            self._fresh_parser = True
            exchange.on_complete()

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.on_body(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if not self._parser.should_keep_alive():
            self.reusable = False
        if self.exchange is not None:
            self.exchange.on_complete()

    # -- used by the transport ------------------------------------------------------
    def start(
        self, exchange: Exchange, head: bytes, body: AsyncIterable[bytes] | None, *, chunked: bool = True
    ) -> None:
        self.exchange = exchange
        self._until_eof = False
        self._raw_head = 0
        self.transport.write(head)  # type: ignore[union-attr]
        if body is not None:
            exchange.body_task = self.loop.create_task(self._send_body(exchange, body, chunked))

    async def _send_body(self, exchange: Exchange, body: AsyncIterable[bytes], chunked: bool) -> None:
        """Stream the request body (chunked, or as is under the client's Content-Length);
        a client that breaks off fails the exchange."""
        transport = self.transport
        try:
            async for chunk in body:
                if not chunk:
                    continue
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))  # type: ignore[union-attr]
                else:
                    transport.write(chunk)  # type: ignore[union-attr]
                if self._write_paused:
                    await self._drained()
            if chunked:
                transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]
        except _Closed:
            return  # connection_lost already failed the exchange
        except Exception as exc:  # the client's body broke off: not the upstream's fault
            exchange.fail(exc)
            self.abort()

    async def _drained(self) -> None:
        while self._write_paused:
            if self.transport is None or self.transport.is_closing():
                raise _Closed
            self._drain = self.loop.create_future()
            await self._drain

    def _wake_drain(self) -> None:
        waiter = self._drain
        if waiter is not None:
            self._drain = None
            if not waiter.done():
                waiter.set_result(None)

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def usable(self) -> bool:
        transport = self.transport
        return self.reusable and transport is not None and not transport.is_closing()

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


class _HeadTooLarge(Exception):
    """The response head passed MAX_RESPONSE_HEAD_BYTES or MAX_RESPONSE_HEADERS."""


class _Closed(Exception):
    """The connection went away while the request body was being written."""
