"""Helpers for the operator-control tests: configs, a running `canary serve`, the admin
API, the CLI as a child process, and continuous traffic through the proxy."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.serve_process import ServeProcess, write_config

__all__ = [
    "CliResult",
    "TOKEN",
    "Traffic",
    "admin_get",
    "admin_post",
    "canary",
    "control_config",
    "edit",
    "free_port",
    "run_cli",
    "stays",
    "until_status",
    "upstream_url",
]

TOKEN = "test-token"
ROOT = Path(__file__).resolve().parent.parent


def upstream_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def control_config(
    path: Path,
    upstreams: dict[str, TestServer],
    *,
    weight: int | None = None,
    token: str | None = TOKEN,
    admin_port: int = 0,
    canary_url: str | None = None,
    canary_timeout: str = "10s",
    window: str = "60s",
) -> Path:
    """A config for a rollout that never promotes by itself (long bake), judged every 100 ms."""
    token_line = f', token: "{token}"' if token is not None else ""
    weight_line = f"\n  weight: {weight}" if weight is not None else ""
    return write_config(
        path,
        f"""listen: "127.0.0.1:0"
drain_timeout: 5s
admin: {{listen: "127.0.0.1:{admin_port}"{token_line}}}
upstreams:
  baseline: {{url: "{upstream_url(upstreams['baseline'])}"}}
  canary: {{url: "{canary_url or upstream_url(upstreams['canary'])}", timeout: {{total: {canary_timeout}}}, retries: {{attempts: 1}}}}
rollout:
  stages: [5, 25, 50, 100]
  bake: 1h{weight_line}
analysis: {{interval: 100ms, window: {window}}}
state: {{path: "var/state.json"}}
logging: {{level: info, format: json}}
""",
    )


def edit(path: Path, old: str, new: str) -> str:
    """Replace `old` by `new` in the config, saved the way editors do (write + rename)."""
    text = path.read_text()
    assert old in text, old
    write_config(path, text.replace(old, new))
    return text.replace(old, new)


# -- the admin API ----------------------------------------------------------------------
async def admin_get(proxy: ServeProcess, path: str) -> Any:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.admin_url}{path}") as response:
            assert response.status == 200, await response.text()
            return await response.json()


async def admin_post(
    proxy: ServeProcess, path: str, body: Any = None, *, token: str | None = TOKEN, raw: bytes | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy.admin_url}{path}", data=data, headers=headers) as response:
            return response.status, await response.json()


async def until_status(proxy: ServeProcess, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
    """Poll /status until `predicate(status)` holds; returns that status."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status = await admin_get(proxy, "/status")
        if predicate(status):
            return status
        assert loop.time() < deadline, f"status never matched in {timeout}s; last: {status['state']} {status['weight']}% config={status['config']}"
        await asyncio.sleep(0.02)


async def stays(predicate: Any, duration: float, what: str = "condition") -> None:
    """Assert `predicate` holds throughout `duration` seconds (checked continually)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + duration
    while loop.time() < end:
        assert predicate(), f"{what} stopped holding"
        await asyncio.sleep(0.02)


# -- the CLI ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str


def _clean_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANARY_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 20.0) -> CliResult:
    """`python -m proxy ARGS` (or a script, when args[0] ends in .sh) as a child process."""
    command = ["bash", *args] if args[0].endswith(".sh") else [sys.executable, "-m", "proxy", *args]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_clean_env(env), cwd=ROOT
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return CliResult(process.returncode, out.decode(), err.decode())


# -- continuous traffic -----------------------------------------------------------------------
@dataclass
class Traffic:
    """Requests through the proxy from `workers` loops until stopped; every outcome kept."""

    url: str
    workers: int = 4
    path: str = "/work"
    read_arm_from_body: bool = False
    results: list[tuple[float, int, str]] = field(default_factory=list)  # (time, status, arm)
    failures: list[str] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stop: bool = False

    async def __aenter__(self) -> Traffic:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]
        await self.wait_for(20)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._stop = True
        await asyncio.gather(*self._tasks)
        await self._session.close()

    async def _worker(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop:
            try:
                async with self._session.get(f"{self.url}{self.path}") as response:
                    body = await response.json() if self.read_arm_from_body else await response.read()
                    arm = body["arm"] if self.read_arm_from_body else response.headers.get("X-Canary-Arm", "?")
                    self.results.append((loop.time(), response.status, arm))
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")

    async def wait_for(self, more: int, timeout: float = 10.0) -> None:
        """Until `more` further requests completed."""
        target = len(self.results) + more
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.results) < target:
            assert not self.failures, self.failures[:3]
            assert loop.time() < deadline, f"traffic stalled at {len(self.results)} requests"
            await asyncio.sleep(0.01)

    def arms_since(self, start: int) -> Counter[str]:
        return Counter(arm for _t, _status, arm in self.results[start:])

    def statuses(self) -> Counter[int]:
        return Counter(status for _t, status, _arm in self.results)


@pytest.fixture
async def canary(tmp_path: Path, upstreams: dict[str, TestServer]) -> Any:
    """`await canary(**control_config kwargs)` starts a real `canary serve`; killed at the end."""
    started: list[ServeProcess] = []

    async def start(config: Path | None = None, **kwargs: Any) -> ServeProcess:
        if config is None:
            config = control_config(tmp_path / "canary.yaml", upstreams, **kwargs)
        process = await ServeProcess(config).start()
        started.append(process)
        return process

    yield start
    for process in started:
        await process.kill()
