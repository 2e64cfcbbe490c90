"""The JSON state store: round trip, atomic writes, corrupt files kept, locked updates."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from config.errors import StateCorrupt, StateError
from rollout.state import RolloutState, Transition
from rollout.store import JsonFileStore, Stored

T0 = 1_700_000_000.0


def transition(n: int, action: str = "promote") -> Transition:
    return Transition(at=T0 + n, action=action, trigger="auto", from_state="progressing", state="progressing",
                      from_weight=5, weight=25, reason=f"step {n}", evidence={"canary": {"requests": n}})


def stored(weight: int = 25, history: int = 1) -> Stored:
    state = RolloutState(state="progressing", weight=weight, stage_started_at=T0, reason="why")
    return Stored(state=state, history=tuple(transition(i) for i in range(history)))


def test_an_absent_file_loads_as_none(tmp_path: Path) -> None:
    assert JsonFileStore(tmp_path / "state.json").load() is None


def test_save_then_load_round_trips_and_counts_revisions(tmp_path: Path) -> None:
    store = JsonFileStore(tmp_path / "var" / "state.json")  # the directory is created
    first = store.save(stored(history=2))
    second = store.save(stored(weight=50, history=3))
    assert (first.state.revision, second.state.revision) == (1, 2)
    loaded = store.load()
    assert loaded == second
    assert loaded is not None and loaded.history[-1].evidence == {"canary": {"requests": 2}}


def test_the_file_is_readable_json_with_iso_times(tmp_path: Path) -> None:
    store = JsonFileStore(tmp_path / "state.json")
    store.save(stored())
    data = json.loads((tmp_path / "state.json").read_text())
    assert data["state"]["state"] == "progressing" and data["state"]["weight"] == 25
    assert data["history"][0]["at"].startswith("2023-11-14T22:13:20")
    assert set(data["history"][0]) >= {"at", "action", "trigger", "from_weight", "weight", "state", "reason", "evidence"}


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    store = JsonFileStore(path)
    store.save(stored(weight=5))
    before = path.read_bytes()

    def crash(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StateError, match="cannot write the rollout state"):
        store.save(stored(weight=50))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.lock"]


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[]", b'{"format": 1}', b'{"format": 1, "state": {"state": "sideways", "weight": 5, '
     b'"stage_started_at": "2024-01-01T00:00:00+00:00"}}', b'{"format": 1, "state": {"state": "paused", '
     b'"weight": "5", "stage_started_at": "2024-01-01T00:00:00+00:00"}}', b"\xff\xfe\x00garbage"],
)
def test_a_corrupt_file_is_reported_and_kept_byte_for_byte(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    store = JsonFileStore(path)
    with pytest.raises(StateCorrupt, match="state.json: the rollout state cannot be read"):
        store.load()
    with pytest.raises(StateCorrupt):
        store.save(stored())
    with pytest.raises(StateCorrupt):
        store.update(lambda current: stored())
    assert path.read_bytes() == content


def test_update_sees_the_current_value_and_none_leaves_it(tmp_path: Path) -> None:
    store = JsonFileStore(tmp_path / "state.json")
    store.save(stored(weight=5))
    seen: list[int] = []

    def look(current: Stored | None) -> Stored | None:
        assert current is not None
        seen.append(current.state.weight)
        return None

    assert store.update(look) == store.load()
    assert seen == [5] and store.load().state.revision == 1  # type: ignore[union-attr]


def test_history_is_bounded_oldest_dropped(tmp_path: Path) -> None:
    store = JsonFileStore(tmp_path / "state.json", history_limit=10)
    result = store.save(stored(history=25))
    assert [t.reason for t in result.history] == [f"step {n}" for n in range(15, 25)]


def test_version_changes_with_every_write(tmp_path: Path) -> None:
    store = JsonFileStore(tmp_path / "state.json")
    assert store.version() is None
    store.save(stored())
    first = store.version()
    store.save(stored())
    assert store.version() != first


def _append_many(path: str, worker: int, count: int) -> None:
    store = JsonFileStore(path)
    for n in range(count):
        def append(current: Stored | None, n: int = n) -> Stored:
            history = current.history if current else ()
            state = current.state if current else stored().state
            return Stored(state=state, history=(*history, transition(worker * 1000 + n, f"w{worker}")))
        store.update(append)


def test_concurrent_updates_from_processes_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "state.json")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(path, w, 25)) for w in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=60)
        assert process.exitcode == 0
    result = JsonFileStore(path).load()
    assert result is not None
    assert result.state.revision == 100 and len(result.history) == 100
    for worker in range(4):
        mine = [t.at for t in result.history if t.action == f"w{worker}"]
        assert mine == sorted(mine) and len(mine) == 25
