"""Wait for a condition with a deadline (tests never sleep on the clock to wait for state)."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

__all__ = ["until", "until_async"]


async def until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s")
        await asyncio.sleep(0.01)


async def until_async(
    fetch: Callable[[], Awaitable[Any]], predicate: Callable[[Any], object], timeout: float = 10.0
) -> Any:
    """Fetch (e.g. an admin endpoint) until `predicate(value)` holds; returns the value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate(value := await fetch()):
        if loop.time() > deadline:
            raise AssertionError(f"condition not reached in {timeout}s; last value: {value!r}")
        await asyncio.sleep(0.02)
    return value
