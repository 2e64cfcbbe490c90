"""Run the real `canary serve` as a child process and learn its ports from its log."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import psutil

__all__ = ["ServeProcess", "write_config"]


def write_config(path: Path, text: str) -> Path:
    """Write a config atomically (as an editor that saves via rename would)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


class ServeProcess:
    def __init__(
        self, config: Path, *, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.args = args
        self.preexec_fn = preexec_fn  # e.g. to lower the child's descriptor limit
        self.env = {**os.environ, **(env or {})}
        self.events: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.proxy_port = 0
        self.admin_port = 0
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 20.0) -> ServeProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "-c", str(self.config), *self.args,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=self.env,
            preexec_fn=self.preexec_fn,
        )
        self._reader = asyncio.create_task(self._read_log())
        serving = await self.wait_for_event("serving", timeout=timeout)
        self.proxy_port = int(serving["proxy"].rsplit(":", 1)[1])
        self.admin_port = int(serving["admin"].rsplit(":", 1)[1])
        return self

    async def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for line in self.proc.stderr:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"event": "raw", "line": line.decode(errors="replace")})

    async def wait_for_event(self, name: str, *, timeout: float = 10.0, after: int = 0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for event in self.events[after:]:
                if event.get("event") == name:
                    return event
            if self.proc is not None and self.proc.returncode is not None:
                raise AssertionError(f"canary serve exited {self.proc.returncode}: {self.events[-5:]}")
            if loop.time() > deadline:
                raise AssertionError(f"no {name!r} log event in {timeout}s; last: {self.events[-5:]}")
            await asyncio.sleep(0.02)

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def rss(self) -> int:
        assert self.proc is not None
        return psutil.Process(self.proc.pid).memory_info().rss

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
