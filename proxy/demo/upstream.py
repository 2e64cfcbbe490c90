"""The demo's simulated upstreams: an OpenAI-compatible chat API with realistic latency.

`POST /v1/chat/completions` answers a `chat.completion` JSON object, or with `"stream":
true` a server-sent event stream of `chat.completion.chunk` objects ending in
`data: [DONE]`, the way the OpenAI API does; `GET /v1/models` lists the one model. Two
flavours stand for the two code paths: the **legacy sync** service runs a fixed pool of
workers (requests queue when all are busy) and the **async** one does not. Either can be
told to fail a share of requests (500/503 with an OpenAI-style error body) or to add a
fixed delay before the first token.

Every random draw of a request comes from an RNG seeded with (seed, flavour, the
request's `X-Request-Id`), so a seeded demo answers each request the same way whatever
the interleaving.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

__all__ = ["PROFILE", "UPSTREAM_STATS", "UpstreamProfile", "UpstreamStats", "make_demo_upstream"]

Flavour = Literal["legacy-sync", "async"]
_WORDS = (
    "the canary takes a small share of traffic while both arms are measured and compared ; "
    "a sequential test decides when the evidence is strong enough to promote or to roll "
    "back , so a rollout moves on its own from five percent to all of the requests"
).split()
_ERRORS = {
    500: ("The server had an error while processing your request. Sorry about that!", "server_error"),
    503: ("The engine is currently overloaded, please try again later.", "server_error"),
}


@dataclass(frozen=True, kw_only=True)
class UpstreamProfile:
    """How one simulated upstream behaves. Ranges are (low, high) seconds or counts."""

    flavour: Flavour
    model: str
    first_token: tuple[float, float] = (0.05, 0.30)
    per_token: tuple[float, float] = (0.010, 0.030)
    tokens: tuple[int, int] = (20, 80)
    workers: int | None = None  # a sync worker pool: at most this many requests at once
    error_rate: float = 0.0
    extra_latency: float = 0.0  # added before the first token
    seed: int = 0


@dataclass
class UpstreamStats:
    """What the demo (and the tests) can read off a running upstream."""

    requests: int = 0
    errors: int = 0
    streamed: int = 0
    inflight: int = 0
    queued_peak: int = 0  # most requests ever waiting for a legacy worker


PROFILE = web.AppKey("demo_upstream_profile", UpstreamProfile)
UPSTREAM_STATS = web.AppKey("demo_upstream_stats", UpstreamStats)
_WORKERS = web.AppKey("demo_upstream_workers", asyncio.Semaphore)
_FALLBACK_RNG = web.AppKey("demo_upstream_rng", random.Random)


def make_demo_upstream(profile: UpstreamProfile) -> web.Application:
    app = web.Application()
    app[PROFILE] = profile
    app[UPSTREAM_STATS] = UpstreamStats()
    app[_FALLBACK_RNG] = random.Random(f"{profile.seed}:{profile.flavour}")
    if profile.workers:
        app[_WORKERS] = asyncio.Semaphore(profile.workers)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    return app


async def list_models(request: web.Request) -> web.Response:
    profile = request.app[PROFILE]
    model = {"id": profile.model, "object": "model", "created": 1_700_000_000, "owned_by": "canary-demo"}
    return web.json_response({"object": "list", "data": [model]}, headers=_server_header(profile))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    profile, stats = request.app[PROFILE], request.app[UPSTREAM_STATS]
    stats.requests += 1
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(profile, 400, "We could not parse the JSON body of your request.", "invalid_request_error")
    problem = _invalid(body)
    if problem:
        return _error(profile, 400, problem, "invalid_request_error")
    rng = _request_rng(request)
    workers = request.app.get(_WORKERS)
    if workers is None:
        return await _answer(request, body, rng)
    stats.inflight += 1
    stats.queued_peak = max(stats.queued_peak, stats.inflight - profile.workers)
    try:
        async with workers:
            return await _answer(request, body, rng)
    finally:
        stats.inflight -= 1


async def _answer(request: web.Request, body: dict[str, Any], rng: random.Random) -> web.StreamResponse:
    profile, stats = request.app[PROFILE], request.app[UPSTREAM_STATS]
    failing = rng.random() < profile.error_rate
    await asyncio.sleep(profile.extra_latency + _between(rng, profile.first_token))
    if failing:
        stats.errors += 1
        status = 500 if rng.random() < 0.7 else 503
        return _error(profile, status, *_ERRORS[status])
    words = _completion(rng, profile, body.get("max_tokens"))
    model = str(body.get("model") or profile.model)
    if body.get("stream") is True:
        stats.streamed += 1
        return await _stream(request, profile, rng, words, model)
    await asyncio.sleep(sum(_between(rng, profile.per_token) for _ in words[1:]))
    return web.json_response(_completion_object(profile, rng, model, words), headers=_server_header(profile))


async def _stream(
    request: web.Request, profile: UpstreamProfile, rng: random.Random, words: list[str], model: str
) -> web.StreamResponse:
    """The first chunk goes out with the headers; each later token after its own delay."""
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **_server_header(profile)}
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    chunk_id, created = f"chatcmpl-{rng.getrandbits(64):016x}", int(time.time())
    try:
        await response.write(sse_event(_chunk(chunk_id, created, model, profile, {"role": "assistant", "content": ""})))
        for index, word in enumerate(words):
            if index:
                await asyncio.sleep(_between(rng, profile.per_token))
            await response.write(sse_event(_chunk(chunk_id, created, model, profile, {"content": word})))
        await response.write(sse_event(_chunk(chunk_id, created, model, profile, {}, finish="stop")))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionError:
        pass  # the client went away mid-stream; nothing left to tell it
    return response


def sse_event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _chunk(
    chunk_id: str, created: int, model: str, profile: UpstreamProfile, delta: dict[str, str],
    finish: str | None = None,
) -> dict[str, Any]:
    return {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": f"fp_{profile.flavour}",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _completion_object(profile: UpstreamProfile, rng: random.Random, model: str, words: list[str]) -> dict[str, Any]:
    message = {"role": "assistant", "content": "".join(words)}
    return {
        "id": f"chatcmpl-{rng.getrandbits(64):016x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": f"fp_{profile.flavour}",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": len(words), "total_tokens": 12 + len(words)},
    }


def _completion(rng: random.Random, profile: UpstreamProfile, max_tokens: Any) -> list[str]:
    count = rng.randint(*profile.tokens)
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0:
        count = min(count, max_tokens)
    start = rng.randrange(len(_WORDS))
    return [("" if i == 0 else " ") + _WORDS[(start + i) % len(_WORDS)] for i in range(count)]


def _invalid(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "The request body must be a JSON object."
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' is a required property and must be a non-empty array."
    if "stream" in body and not isinstance(body["stream"], bool):
        return "'stream' must be a boolean."
    return None


def _error(profile: UpstreamProfile, status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.json_response(body, status=status, headers=_server_header(profile))


def _server_header(profile: UpstreamProfile) -> dict[str, str]:
    return {"Server": f"demo-{profile.flavour}"}


def _request_rng(request: web.Request) -> random.Random:
    request_id = request.headers.get("X-Request-Id")
    if request_id is None:
        return request.app[_FALLBACK_RNG]
    profile = request.app[PROFILE]
    return random.Random(f"{profile.seed}:{profile.flavour}:{request_id}")


def _between(rng: random.Random, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return rng.uniform(low, high)
