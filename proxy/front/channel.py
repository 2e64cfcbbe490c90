"""The private channel between `canary serve` (the supervisor) and one worker process.

A Unix socket pair per worker (inherited, never a path on disk), carrying length-prefixed
pickles of the small frozen messages below. Only a parent and the child it started ever
hold the two ends, so unpickling is between trusted peers.

    supervisor -> worker: Hello (first), Sync, Reconfigure
    worker -> supervisor: Ready (first), WorkerReport (answers Sync(report=True); the last
                          one after it drained on SIGTERM)
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from typing import Union

from config.settings import Settings
from rollout.summed import WorkerReport

__all__ = ["Hello", "Message", "Ready", "Reconfigure", "Sync", "receive", "send"]

_HEADER = struct.Struct("!I")
_MAX_MESSAGE = 16 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class Hello:
    """The first message a worker gets: what to serve and the rollout's current split."""

    slot: int
    settings: Settings
    weight: int
    stage_id: int
    shadow: bool = False  # state `shadow`: mirror copies to the canary


@dataclass(frozen=True, kw_only=True)
class Sync:
    """The current weight and stage id; `report` asks for a `WorkerReport` back."""

    weight: int
    stage_id: int
    report: bool
    shadow: bool = False


@dataclass(frozen=True, kw_only=True)
class Reconfigure:
    settings: Settings


@dataclass(frozen=True, kw_only=True)
class Ready:
    pid: int


Message = Union[Hello, Sync, Reconfigure, Ready, WorkerReport]


def send(writer: asyncio.StreamWriter, message: Message) -> None:
    """Queue one message (the caller awaits `writer.drain()` when it must)."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_HEADER.pack(len(data)) + data)


async def receive(reader: asyncio.StreamReader) -> Message:
    """The next message; `asyncio.IncompleteReadError` when the peer is gone."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > _MAX_MESSAGE:
        raise ValueError(f"worker channel: a {size}-byte message is too large")
    message = pickle.loads(await reader.readexactly(size))
    if not isinstance(message, (Hello, Sync, Reconfigure, Ready, WorkerReport)):
        raise ValueError(f"worker channel: unexpected {type(message).__name__}")
    return message
