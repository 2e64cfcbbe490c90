"""What `workers: N | auto` (and `canary serve --workers N`) means: a process count."""

from __future__ import annotations

import os

__all__ = ["MAX_WORKERS", "WORKERS_HINT", "cpu_count", "worker_count"]

MAX_WORKERS = 256
WORKERS_HINT = f'expected a number of processes from 1 to {MAX_WORKERS} or "auto"'


def cpu_count() -> int:
    """The cores this process may run on (what `workers: auto` means)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def worker_count(text: str) -> int | None:
    """`text` as a worker count ("auto" = one per core); None when it is not one."""
    text = text.strip()
    if text == "auto":
        return cpu_count()
    if text.isdigit() and 1 <= int(text) <= MAX_WORKERS:
        return int(text)
    return None
