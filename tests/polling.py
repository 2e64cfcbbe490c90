"""Wait for a condition with a deadline (tests never sleep on the clock to wait for state)."""

from __future__ import annotations

import asyncio
from typing import Callable

__all__ = ["until"]


async def until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s")
        await asyncio.sleep(0.01)
