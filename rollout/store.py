"""Durable rollout state: the current `RolloutState` and the history of transitions.

`StateStore` is the narrow interface the controller and the CLI use; `JsonFileStore` keeps
it in one JSON file (`state.path`). Writes are atomic (temp file in the same directory,
fsync, rename, fsync the directory) and read-modify-write runs under an exclusive lock on
a sibling `.lock` file, so `canary rollback -c FILE` and a running proxy never lose each
other's update. A file that cannot be read is never overwritten: every write refuses with
`StateCorrupt` until an operator fixes or removes it.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from config.errors import StateCorrupt, StateError
from rollout.state import RolloutState, Transition

__all__ = ["HISTORY_LIMIT", "JsonFileStore", "StateStore", "Stored"]

HISTORY_LIMIT = 1000
_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class Stored:
    """What a store holds: the state (its `revision` counts writes) and the history,
    oldest first."""

    state: RolloutState
    history: tuple[Transition, ...] = ()


Change = Callable[[Stored | None], Stored | None]


class StateStore(Protocol):
    def load(self) -> Stored | None:
        """The stored rollout, or None when nothing was stored yet; StateCorrupt when
        something is stored but cannot be read."""

    def update(self, change: Change) -> Stored | None:
        """Atomically apply `change` to what is stored (None: leave it) and return what is
        stored afterwards; the revision goes up by one on every write."""

    def version(self) -> Hashable:
        """A cheap token that changes whenever the stored rollout changes."""


class JsonFileStore:
    """The rollout state in one JSON file, with its history bounded to HISTORY_LIMIT."""

    def __init__(self, path: str | os.PathLike[str], *, history_limit: int = HISTORY_LIMIT) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.history_limit = history_limit

    def load(self) -> Stored | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read the rollout state: {exc}") from exc
        return self._parse(raw)

    def save(self, stored: Stored) -> Stored:
        """Replace what is stored (still refusing to overwrite a corrupt file)."""
        result = self.update(lambda _current: stored)
        assert result is not None
        return result

    def update(self, change: Change) -> Stored | None:
        with self._locked():
            current = self.load()
            new = change(current)
            if new is None:
                return current
            revision = current.state.revision + 1 if current else 1
            new = Stored(
                state=replace(new.state, revision=revision),
                history=tuple(new.history[-self.history_limit :]),
            )
            try:
                self._write(new)
            except OSError as exc:
                raise StateError(f"{self.path}: cannot write the rollout state: {exc}") from exc
            return new

    def version(self) -> Hashable:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    # -- internals ------------------------------------------------------------------
    def _parse(self, raw: bytes) -> Stored:
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("format") != _FORMAT:
                raise ValueError(f"not a canary-proxy state file (format {_FORMAT})")
            history = data.get("history", [])
            if not isinstance(history, list):
                raise TypeError("history: expected a list")
            return Stored(
                state=RolloutState.from_json(data["state"]),
                history=tuple(Transition.from_json(item) for item in history),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            detail = f"{type(exc).__name__}: {exc}"
            raise StateCorrupt(
                f"{self.path}: the rollout state cannot be read ({detail}); the file is kept "
                f"as it is and nothing is written until it is fixed or removed "
                f"(removing it restarts the rollout plan)"
            ) from exc

    def _write(self, stored: Stored) -> None:
        document: dict[str, Any] = {
            "format": _FORMAT,
            "state": stored.state.to_json(),
            "history": [transition.to_json() for transition in stored.history],
        }
        payload = json.dumps(document, indent=1, sort_keys=True).encode() + b"\n"
        directory = self.path.parent
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fchmod(handle.fileno(), 0o644)
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        _fsync_directory(directory)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.lock_path, "a+b")
        except OSError as exc:
            raise StateError(f"{self.lock_path}: cannot lock the rollout state: {exc}") from exc
        with handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
