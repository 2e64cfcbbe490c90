"""Load generation and the built-in upstream for `scripts/benchmark.py`.

Run as a child process by the benchmark (so it can be pinned to a core):

    python scripts/bench_load.py upstream PORT [PORT ...]      # tiny fast HTTP/1.1 server
    python scripts/bench_load.py load URL CONNECTIONS SECONDS [BODY_BYTES]  # built-in load generator
                                                               # (BODY_BYTES: POSTs with a body)

The upstream answers every request with a 13-byte body at once, or after S seconds for
`/sleep/S`. The load generator keeps CONNECTIONS keep-alive connections busy for SECONDS
and prints one JSON line (requests, rps, p50, p99, errors); it stands in for wrk when wrk
is not installed. `wrk()` runs wrk itself, `batch()` times N concurrent fresh requests.
"""

from __future__ import annotations

import asyncio
import ssl
import json
import re
import shutil
import subprocess
import sys
import time
from time import perf_counter
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

__all__ = ["BODY", "LoadResult", "Results", "Row", "batch", "builtin_load", "have_wrk", "wrk"]

BODY = b"hello, world\n"
_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    rps: float
    p50: float  # seconds
    p99: float
    errors: int  # non-2xx answers, socket errors and timeouts


# -- the built-in upstream ------------------------------------------------------------
class _UpstreamProtocol(asyncio.Protocol):
    """Keep-alive HTTP/1.1 for bodiless requests (all the benchmark sends; no pipelining)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            head = self._buffer[:end]
            length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            body = int(length.group(1)) if length else 0  # a request body is read and ignored
            if len(self._buffer) < end + 4 + body:
                return
            self._buffer = self._buffer[end + 4 + body :]
            path = head.split(b" ", 2)[1]
            if path.startswith(b"/sleep/"):
                asyncio.get_running_loop().call_later(float(path[7:]), self._answer)
            else:
                self._answer()

    def _answer(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_RESPONSE)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


async def serve_upstream(ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for port in ports:
        await loop.create_server(_UpstreamProtocol, "127.0.0.1", port, backlog=4096, reuse_address=True)
    print("ready", flush=True)
    await asyncio.Event().wait()


# -- wrk ----------------------------------------------------------------------------
def have_wrk() -> bool:
    return shutil.which("wrk") is not None


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def wrk(url: str, connections: int, seconds: float, *, core: int | None) -> LoadResult:
    """One wrk run (`-t1`), parsed."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", url]
    if core is not None:
        command = ["taskset", "-c", str(core), *command]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    requests = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return LoadResult(
        requests=requests,
        seconds=seconds,
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        p50=_seconds(re.search(r"\s50%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        p99=_seconds(re.search(r"\s99%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        errors=errors + (int(non2xx.group(1)) if non2xx else 0),
    )


# -- the built-in load generator and batches --------------------------------------------
async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one request on a keep-alive connection, read the answer, return the status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if match:
        await reader.readexactly(int(match.group(1)))
    elif re.search(rb"(?i)\r\ntransfer-encoding:\s*chunked", head):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


def _request(url: str, *, close: bool = False, body: int = 0) -> tuple[str, int, bytes]:
    """A GET, or with `body` bytes a POST with a Content-Length body."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    extra = b"Connection: close\r\n" if close else b""
    method = b"POST" if body else b"GET"
    if body:
        extra += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % body
    head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (method, target.encode(), parts.netloc.encode(), extra)
    return parts.hostname or "127.0.0.1", parts.port or 80, head + b"x" * body


def _client_tls(url: str) -> ssl.SSLContext | None:
    """https:// targets: TLS without verification (the benchmark's own self-signed cert)."""
    if not url.startswith("https://"):
        return None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def builtin_load(url: str, connections: int, seconds: float, body: int = 0) -> LoadResult:
    host, port, request = _request(url, body=body)
    tls = _client_tls(url)
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def one_connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port, ssl=tls)
        try:
            while loop.time() < deadline:
                start = perf_counter()  # uvloop's loop.time() counts whole milliseconds
                status = await _get(reader, writer, request)
                latencies.append(perf_counter() - start)
                errors += not 200 <= status < 400
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
        finally:
            writer.close()

    started = loop.time()
    await asyncio.gather(*(one_connection() for _ in range(connections)))
    elapsed = loop.time() - started
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0  # noqa: E731
    return LoadResult(len(latencies), elapsed, len(latencies) / elapsed, pick(0.50), pick(0.99), errors)


async def batch(url: str, n: int, *, timeout: float = 30.0) -> tuple[float, int]:
    """N concurrent requests, each on a fresh connection: (seconds for all, errors)."""
    host, port, request = _request(url, close=True)

    async def one() -> bool:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                return await asyncio.wait_for(_get(reader, writer, request), timeout) == 200
            finally:
                writer.close()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            return False

    started = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(n)))
    return time.perf_counter() - started, results.count(False)


def _run(coro_factory: object) -> None:
    try:
        import uvloop

        uvloop.run(coro_factory)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro_factory)  # type: ignore[arg-type]


def main(argv: list[str]) -> None:
    if argv[:1] == ["upstream"]:
        _run(serve_upstream([int(p) for p in argv[1:]]))
    elif argv[:1] == ["load"] and len(argv) in (4, 5):
        async def load() -> None:
            body = int(argv[4]) if len(argv) == 5 else 0
            result = await builtin_load(argv[1], int(argv[2]), float(argv[3]), body)
            print(json.dumps(asdict(result)), flush=True)

        _run(load())
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])


@dataclass
class Row:
    """One server's figures over the rounds."""

    name: str
    load: LoadResult  # the best of the rounds at --connections
    one_conn: LoadResult  # the best (lowest p50) of the rounds at 1 connection
    cpu_per_request: float | None = None  # seconds of the server's CPU per request (lowest)
    rounds_rps: list[float] = field(default_factory=list)


@dataclass
class Results:
    """Everything one benchmark run measured, for the report."""

    machine: dict[str, object] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    batches: dict[str, dict[int, tuple[float, int]]] = field(default_factory=dict)
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    analysis: dict[str, dict[str, float]] = field(default_factory=dict)
