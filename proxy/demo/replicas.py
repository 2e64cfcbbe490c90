"""`canary demo --replicas N`: one Redis for the demo, so N proxies are one rollout.

Starts Debian's `redis-server` (when installed) on a free port of 127.0.0.1 without
persistence, for the demo's lifetime only; says clearly what to install when it is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections.abc import AsyncIterator
from typing import Any

from config.errors import CanaryError

__all__ = ["DemoRedis", "demo_redis", "replicas_lines"]


class DemoRedis(CanaryError):
    """The demo's Redis cannot run (not installed, or it did not start)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def demo_redis() -> AsyncIterator[str]:
    """A throw-away redis-server; yields its URL, stops it at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise DemoRedis(
            "--replicas needs redis-server (the replicas share one rollout through Redis): "
            "install it (Debian/Ubuntu: sudo apt-get install redis-server) or run the demo without --replicas"
        )
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--loglevel", "warning", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await _wait_ready(port, process)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()


async def _wait_ready(port: int, process: asyncio.subprocess.Process) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PING\r\n")
            answer = await reader.readline()
            writer.close()
            if answer.startswith(b"+PONG"):
                return
        except OSError:
            pass
        if process.returncode is not None or loop.time() > deadline:
            raise DemoRedis(f"redis-server did not start on 127.0.0.1:{port}")
        await asyncio.sleep(0.05)


def replicas_lines(status: dict[str, Any]) -> list[str]:
    """One line per replica (from any replica's /status): its weight and who decides."""
    return [
        f"  replica {r['id']:<28} weight {r['weight']:>3}%  {r['state']:<12}{'  decider' if r['decider'] else ''}".rstrip()
        for r in status.get("replicas", [])
    ]
