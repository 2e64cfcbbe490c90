"""Durable rollout state: the current `RolloutState` and the history of transitions.

`StateStore` is the narrow interface the controller and the CLI use. `JsonFileStore` keeps
two files beside each other:

- the state file (`state.path`): the state and the newest RECENT_HISTORY transitions, so it
  stays small; replaced atomically on every write (temp file in the same directory, fsync,
  rename, fsync the directory);
- the history file (`<stem>.history.jsonl`): every transition, one JSON line each, tagged
  with the revision that wrote it; only ever appended to, flushed and fsynced BEFORE the
  state file is replaced. The state file is the commit point: lines whose revision the
  state has not reached are a write that crashed in between and are never shown (the next
  write with that revision supersedes them). Unreadable lines (a torn last line) are
  skipped and left in place.

Read-modify-write runs under an exclusive lock on a sibling `.lock` file, so `canary
rollback -c FILE` and a running proxy never lose each other's update. `load()` reads only
the state file; `history()` reads the history file, on demand. A state file that cannot be
read is never overwritten: every write refuses with `StateCorrupt` until an operator fixes
or removes it. A state file from before the history file existed (its whole history
inside, under `history`) loads as it is and is migrated by the next write.

`record_offline_rollback` is the one write made without a running controller (`canary
rollback -c FILE` with the proxy down); `rollout.controller` re-exports it.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from config.errors import StateCorrupt, StateError
from rollout.engine import Policy, rollback
from rollout.state import RolloutState, Transition

__all__ = ["RECENT_HISTORY", "JsonFileStore", "StateStore", "Stored", "Write", "record_offline_rollback"]

RECENT_HISTORY = 50
_FORMAT = 1  # unchanged: older readers still load the state (and see no history)
_Line = tuple[int, int, Transition | None]  # revision, position in its write, transition


@dataclass(frozen=True, kw_only=True)
class Stored:
    """What a store holds: the state (its `revision` counts writes) and the newest
    transitions, oldest first (at most RECENT_HISTORY; `StateStore.history()` has them
    all). `version` is the store's `version()` of exactly what was read or written."""

    state: RolloutState
    history: tuple[Transition, ...] = ()
    version: Hashable = field(default=None, compare=False)


@dataclass(frozen=True, kw_only=True)
class Write:
    """What a change stores: the new state and the transitions that led to it (appended to
    the history, oldest first)."""

    state: RolloutState
    transitions: tuple[Transition, ...] = ()


Change = Callable[[Stored | None], Write | None]


class StateStore(Protocol):
    def load(self) -> Stored | None:
        """The stored rollout, or None when nothing was stored yet; StateCorrupt when
        something is stored but cannot be read."""

    def update(self, change: Change) -> Stored | None:
        """Atomically apply `change` to what is stored (None: leave it) and return what is
        stored afterwards; the revision goes up by one on every write."""

    def version(self) -> Hashable:
        """A cheap token that changes whenever the stored rollout changes."""

    def history(self) -> list[Transition]:
        """Every stored transition, oldest first (reads the whole history: on demand)."""


@dataclass(frozen=True)
class _Document:
    """A parsed state file; `legacy` is the history inside a file of the older layout."""

    stored: Stored
    legacy: tuple[Transition, ...] | None = None


class JsonFileStore:
    """The rollout state in a small JSON file, its history in an append-only JSON-lines file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.history_path = self.path.with_name(self.path.stem + ".history.jsonl")

    def load(self) -> Stored | None:
        document = self._read()
        return document.stored if document else None

    def save(self, write: Write) -> Stored:
        """Store `write` whatever is stored (still refusing to overwrite a corrupt file)."""
        result = self.update(lambda _current: write)
        assert result is not None
        return result

    def update(self, change: Change) -> Stored | None:
        with self._locked():
            document = self._read()
            current = document.stored if document else None
            write = change(current)
            if write is None:
                return current
            try:
                return self._commit(document, write)
            except OSError as exc:
                raise StateError(f"{self.path}: cannot write the rollout state: {exc}") from exc

    def remove_stale_temp_files(self) -> list[Path]:
        """Remove the temp files of state writes that never finished (a process killed
        between writing and renaming one). Under the lock, so no write in progress loses
        its own; returns what was removed."""
        removed: list[Path] = []
        with self._locked():
            for temp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                try:
                    temp.unlink()
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise StateError(f"{temp}: cannot remove a stale temp file: {exc}") from exc
                removed.append(temp)
        return removed

    def version(self) -> Hashable:
        try:
            return _signature(self.path.stat())
        except FileNotFoundError:
            return None

    def history(self) -> list[Transition]:
        document = self._read()  # first: lines appended after this are filtered out
        lines = self._read_lines()
        if document is None:
            return _visible(lines)
        revision = document.stored.state.revision
        if document.legacy is None:
            return _visible(lines, revision)
        # not migrated yet: lines of this revision or newer are an unfinished migration
        return [*_visible(lines, revision - 1), *document.legacy]

    # -- writing --------------------------------------------------------------------
    def _commit(self, document: _Document | None, write: Write) -> Stored:
        """History lines first, then the state file (the commit point)."""
        if document is None:  # the first write, or the state file was removed
            previous = self._read_lines()
            base = max((line[0] for line in previous), default=0)
            recent: Sequence[Transition] = _visible(previous)[-RECENT_HISTORY:]
            payload = b""
        else:
            base, recent = document.stored.state.revision, document.stored.history
            payload = _encode(document.legacy, base) if document.legacy is not None else b""
        revision = base + 1
        self._append(payload + _encode(write.transitions, revision))
        stored = Stored(
            state=replace(write.state, revision=revision),
            history=(*recent, *write.transitions)[-RECENT_HISTORY:],
        )
        return replace(stored, version=self._replace_state(stored))

    def _append(self, payload: bytes) -> None:
        created = not self.history_path.exists()
        fd = os.open(self.history_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if created:
                os.fchmod(fd, 0o644)  # like the state file, whatever the umask
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                payload = b"\n" + payload  # a torn last line stays alone on its line
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_directory(self.path.parent)

    def _replace_state(self, stored: Stored) -> Hashable:
        """Write the state file atomically; its version."""
        payload = self._state_document(stored)
        directory = self.path.parent
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fchmod(handle.fileno(), 0o644)
                os.fsync(handle.fileno())
                version = _signature(os.fstat(handle.fileno()))
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        _fsync_directory(directory)
        return version

    def _state_document(self, stored: Stored) -> bytes:
        """Readable (the state indented, one recent transition a line) and cheap to write
        (the C encoder does the transitions; `indent` would make it pure Python)."""
        head: dict[str, Any] = {"format": _FORMAT, "history_file": self.history_path.name}
        head["state"] = stored.state.to_json()
        text = json.dumps(head, indent=1, sort_keys=True).removesuffix("\n}")
        recent = ",\n  ".join(json.dumps(t.to_json(), sort_keys=True) for t in stored.history)
        return f'{text},\n "recent": [\n  {recent}\n ]\n}}\n'.encode()

    # -- reading --------------------------------------------------------------------
    def _read(self) -> _Document | None:
        try:
            with open(self.path, "rb") as handle:
                version = _signature(os.fstat(handle.fileno()))
                raw = handle.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read the rollout state: {exc}") from exc
        return self._parse(raw, version)

    def _parse(self, raw: bytes, version: Hashable) -> _Document:
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("format") != _FORMAT:
                raise ValueError(f"not a canary-proxy state file (format {_FORMAT})")
            state = RolloutState.from_json(data["state"])
            legacy = _transitions(data["history"], "history") if "history" in data else None
            recent = legacy if legacy is not None else _transitions(data.get("recent", []), "recent")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            detail = f"{type(exc).__name__}: {exc}"
            raise StateCorrupt(
                f"{self.path}: the rollout state cannot be read ({detail}); the file is kept "
                f"as it is and nothing is written until it is fixed or removed "
                f"(removing it restarts the rollout plan)"
            ) from exc
        stored = Stored(state=state, history=recent[-RECENT_HISTORY:], version=version)
        return _Document(stored, legacy)

    def _read_lines(self) -> list[_Line]:
        try:
            raw = self.history_path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateError(f"{self.history_path}: cannot read the rollout history: {exc}") from exc
        return [line for line in map(_decode, raw.split(b"\n")) if line is not None]

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


def record_offline_rollback(
    store: StateStore, *, reason: str, now: float, config_weight: int | None = None
) -> Stored:
    """`canary rollback -c FILE` with the proxy down: record it so the next start (or the
    running proxy, on its next tick) serves weight 0. Raises StateCorrupt/StateError.
    `config_weight` is the config's `rollout.weight`, so a first start does not take a
    pinned weight in the file as an operator edit that undoes this rollback."""

    def change(current: Stored | None) -> Write | None:
        state = current.state if current else RolloutState(
            state="progressing", weight=0, stage_started_at=now, config_weight=config_weight
        )
        new, decision = rollback(state, Policy(), now, reason=reason or "operator rollback (offline)")
        return None if decision is None else Write(state=new, transitions=(decision.transition,))

    stored = store.update(change)
    assert stored is not None
    return stored


def _transitions(items: Any, key: str) -> tuple[Transition, ...]:
    if not isinstance(items, list):
        raise TypeError(f"{key}: expected a list")
    return tuple(Transition.from_json(item) for item in items)


def _encode(transitions: Sequence[Transition], revision: int) -> bytes:
    """One line per transition; a write without any leaves a marker line, so it still
    supersedes lines of its revision left by a write that crashed."""
    if not transitions:
        return json.dumps({"revision": revision, "seq": 0}).encode() + b"\n"
    return b"".join(
        json.dumps({"revision": revision, "seq": seq, **t.to_json()}, separators=(",", ":")).encode() + b"\n"
        for seq, t in enumerate(transitions)
    )


def _decode(line: bytes) -> _Line | None:
    """A history line, or None when it cannot be read (e.g. torn by a crash)."""
    try:
        data = json.loads(line) if line.strip() else None
        if not isinstance(data, dict):
            return None
        revision, seq = data["revision"], data.get("seq", 0)
        if type(revision) is not int or type(seq) is not int:
            return None
        return revision, seq, Transition.from_json(data) if "action" in data else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _visible(lines: Sequence[_Line], upto: int | None = None) -> list[Transition]:
    """The committed transitions: of several writes with one revision the last wins (the
    others crashed before their state was stored), none past revision `upto`."""
    writes: list[tuple[int, list[Transition | None]]] = []
    for revision, seq, transition in lines:
        if writes and seq > 0 and writes[-1][0] == revision:
            writes[-1][1].append(transition)
        else:
            writes.append((revision, [transition]))
    last = {revision: index for index, (revision, _) in enumerate(writes)}
    return [
        transition
        for index, (revision, group) in enumerate(writes)
        if last[revision] == index and (upto is None or revision <= upto)
        for transition in group
        if transition is not None
    ]


def _signature(stat: os.stat_result) -> Hashable:
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
