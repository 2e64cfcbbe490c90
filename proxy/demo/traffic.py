"""The demo's traffic generator: many sticky users calling the chat API through the proxy.

A fixed number of workers (the concurrency bound) each loop: pick a user (sent as
`X-User-Id`, the proxy's sticky key), send a streaming or a plain chat completion, read
the answer to the end (every SSE event up to `data: [DONE]`), note which arm served it
(the proxy's `X-Canary-Arm` header) and whether it failed, think for a moment, repeat.
`stop()` lets in-flight calls finish (up to a grace period) before the workers go.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import aiohttp

__all__ = ["ArmTally", "TrafficGenerator", "TrafficPlan", "TrafficTally", "iter_sse_data"]

_PROMPTS = (
    "Summarise the release notes in three bullet points.",
    "Write a haiku about canary deployments.",
    "Explain what an SPRT is to a new engineer.",
    "Translate 'rollback complete' into French.",
    "List five things to check before promoting a release.",
)


@dataclass(frozen=True, kw_only=True)
class TrafficPlan:
    users: int = 200
    concurrency: int = 32
    stream_share: float = 0.6  # share of calls made with "stream": true
    think: tuple[float, float] = (0.0, 0.05)  # seconds a worker pauses between calls
    seed: int = 0
    max_tokens: int = 256


@dataclass
class ArmTally:
    requests: int = 0
    errors: int = 0  # 5xx answers and broken streams
    streamed: int = 0


@dataclass
class TrafficTally:
    """What the clients saw, per arm as named by the proxy's arm header."""

    arms: dict[str, ArmTally] = field(default_factory=lambda: {"baseline": ArmTally(), "canary": ArmTally()})
    users_seen: set[str] = field(default_factory=set)
    client_errors: int = 0  # 4xx: the generator's own fault, never expected

    @property
    def requests(self) -> int:
        return sum(arm.requests for arm in self.arms.values())

    def record(self, arm: str, *, failed: bool, streamed: bool) -> None:
        tally = self.arms.setdefault(arm, ArmTally())
        tally.requests += 1
        tally.errors += failed
        tally.streamed += streamed


class TrafficGenerator:
    """Sends `plan.concurrency` concurrent calls at a time to `base_url` until stopped;
    several base URLs (replicas behind a load balancer) share the workers round-robin."""

    def __init__(self, base_url: str | Sequence[str], plan: TrafficPlan, *, arm_header: str = "X-Canary-Arm") -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.base_urls = [url.rstrip("/") for url in urls]
        self.base_url = self.base_urls[0]
        self.plan = plan
        self.arm_header = arm_header
        self.tally = TrafficTally()
        self._stopping = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._workers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.plan.concurrency, force_close=False)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))
        self._workers = [
            asyncio.create_task(self._worker(index), name=f"demo-traffic-{index}")
            for index in range(self.plan.concurrency)
        ]

    async def stop(self, grace: float = 5.0) -> None:
        """No new calls; wait up to `grace` seconds for the ones in flight, then cancel."""
        self._stopping.set()
        if self._workers:
            _done, pending = await asyncio.wait(self._workers, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self._workers = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _worker(self, index: int) -> None:
        rng = random.Random(f"{self.plan.seed}:worker:{index}")
        sequence = 0
        while not self._stopping.is_set():
            sequence += 1
            user = f"user-{rng.randrange(self.plan.users):04d}"
            stream = rng.random() < self.plan.stream_share
            url = self.base_urls[index % len(self.base_urls)]
            await self._call(user, stream, f"demo-{self.plan.seed}-{index}-{sequence}", rng, url)
            pause = rng.uniform(*self.plan.think)
            if pause:
                try:
                    await asyncio.wait_for(self._stopping.wait(), pause)
                except TimeoutError:
                    pass

    async def _call(self, user: str, stream: bool, request_id: str, rng: random.Random, base_url: str) -> None:
        assert self._session is not None
        body = {
            "model": "demo-chat",
            "messages": [{"role": "user", "content": rng.choice(_PROMPTS)}],
            "stream": stream,
            "max_tokens": self.plan.max_tokens,
        }
        headers = {"X-User-Id": user, "X-Request-Id": request_id}
        self.tally.users_seen.add(user)
        arm, ok = "unknown", False
        try:
            async with self._session.post(f"{base_url}/v1/chat/completions", json=body, headers=headers) as resp:
                arm = resp.headers.get(self.arm_header, "unknown")
                if 400 <= resp.status < 500:
                    self.tally.client_errors += 1  # our own fault, not the arm's
                ok = resp.status < 500 and (resp.status >= 400 or await _read_answer(resp, stream))
        except (aiohttp.ClientError, TimeoutError, ValueError):
            ok = False
        self.tally.record(arm, failed=not ok, streamed=stream)


async def _read_answer(resp: aiohttp.ClientResponse, stream: bool) -> bool:
    """Read the whole answer; True when it is complete and well formed."""
    if not stream:
        data = await resp.json(content_type=None)
        return isinstance(data, dict) and data.get("object") == "chat.completion"
    async for event in iter_sse_data(resp.content):
        if event == "[DONE]":
            return True
        if json.loads(event).get("object") != "chat.completion.chunk":
            return False
    return False  # the stream ended without [DONE]


async def iter_sse_data(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The `data:` payloads of a server-sent event stream, one per event."""
    async for raw in content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith("data:"):
            yield line[5:].lstrip(" ")
