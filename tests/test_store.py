"""The JSON state store: round trip, atomic writes, corrupt files kept, locked updates, and the
append-only history file beside the state file."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from config.errors import StateCorrupt, StateError
from rollout.state import RolloutState, Transition
from rollout.store import RECENT_HISTORY, JsonFileStore, Stored, Write

T0 = 1_700_000_000.0


def transition(n: int, action: str = "promote") -> Transition:
    return Transition(at=T0 + n, action=action, trigger="auto", from_state="progressing", state="progressing",
                      from_weight=5, weight=25, reason=f"step {n}", evidence={"canary": {"requests": n}})


def stored(weight: int = 25, history: int = 1, first: int = 0) -> Write:
    """A write of `history` transitions numbered from `first`."""
    state = RolloutState(state="progressing", weight=weight, stage_started_at=T0, reason="why")
    return Write(state=state, transitions=tuple(transition(i) for i in range(first, first + history)))


def reasons(transitions: tuple[Transition, ...] | list[Transition]) -> list[str]:
    return [t.reason for t in transitions]


def test_an_absent_file_loads_as_none(tmp_path: Path) -> None:
    assert JsonFileStore(tmp_path / "state.json").load() is None


def test_save_then_load_round_trips_and_counts_revisions(tmp_path: Path) -> None:
    store = JsonFileStore(tmp_path / "var" / "state.json")  # the directory is created
    first = store.save(stored(history=2))
    second = store.save(stored(weight=50, history=3, first=2))
    assert (first.state.revision, second.state.revision) == (1, 2)
    loaded = store.load()
    assert loaded == second and loaded.version == store.version() == second.version
    assert loaded is not None and loaded.history[-1].evidence == {"canary": {"requests": 4}}
    assert reasons(loaded.history) == reasons(store.history()) == [f"step {n}" for n in range(5)]


def test_the_file_is_readable_json_with_iso_times(tmp_path: Path) -> None:
    store = JsonFileStore(tmp_path / "state.json")
    store.save(stored())
    data = json.loads((tmp_path / "state.json").read_text())
    assert data["state"]["state"] == "progressing" and data["state"]["weight"] == 25
    assert data["recent"][0]["at"].startswith("2023-11-14T22:13:20") and "history" not in data
    assert set(data["recent"][0]) >= {"at", "action", "trigger", "from_weight", "weight", "state", "reason", "evidence"}
    assert data["history_file"] == "state.history.jsonl"
    lines = (tmp_path / "state.history.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == {"revision": 1, "seq": 0, **data["recent"][0]}


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.history.jsonl", "state.json", "state.json.lock"]


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


def test_the_state_keeps_the_newest_transitions_the_history_file_all(tmp_path: Path) -> None:
    store = JsonFileStore(tmp_path / "state.json")
    result = store.save(stored(history=RECENT_HISTORY + 25))
    assert reasons(result.history) == [f"step {n}" for n in range(25, RECENT_HISTORY + 25)]
    assert result == store.load()
    assert reasons(store.history()) == [f"step {n}" for n in range(RECENT_HISTORY + 25)]


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
        def append(current: Stored | None, n: int = n) -> Write:
            state = current.state if current else stored().state
            return Write(state=state, transitions=(transition(worker * 1000 + n, f"w{worker}"),))
        store.update(append)


def test_concurrent_updates_from_processes_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "state.json")
    context = multiprocessing.get_context("spawn")  # fork() of a threaded process is unsafe (3.12 warns)
    workers = [context.Process(target=_append_many, args=(path, w, 25)) for w in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=60)
        assert process.exitcode == 0
    store = JsonFileStore(path)
    result, history = store.load(), store.history()
    assert result is not None
    assert result.state.revision == 100 and len(history) == 100 and result.history == tuple(history[-50:])
    for worker in range(4):
        mine = [t.at for t in history if t.action == f"w{worker}"]
        assert mine == sorted(mine) and len(mine) == 25
    revisions = [json.loads(line)["revision"] for line in store.history_path.read_text().splitlines()]
    assert revisions == list(range(1, 101))  # one line per write, in commit order


def io_error(*_args: object) -> None:
    raise OSError(5, "Input/output error")


@pytest.fixture
def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thousands of writes in a test: durability is not what is measured there."""
    monkeypatch.setattr(os, "fsync", lambda _fd: None)


@pytest.mark.usefixtures("no_fsync")
def test_over_a_thousand_transitions_are_all_kept_and_the_state_file_stays_small(tmp_path: Path) -> None:
    store = JsonFileStore(tmp_path / "state.json")
    sizes = {}
    for n in range(1200):
        store.update(lambda current, n=n: Write(state=stored().state, transitions=(transition(n),)))
        if n + 1 in (RECENT_HISTORY, 1200):
            sizes[n + 1] = store.path.stat().st_size
    history = store.history()
    assert reasons(history) == [f"step {n}" for n in range(1200)]
    loaded = store.load()
    assert loaded is not None and loaded.state.revision == 1200 and len(loaded.history) == RECENT_HISTORY
    assert sizes[1200] < sizes[RECENT_HISTORY] * 1.1  # bounded by RECENT_HISTORY, not by the count


def test_a_torn_last_history_line_is_skipped_and_kept(tmp_path: Path) -> None:
    store = JsonFileStore(tmp_path / "state.json")
    store.save(stored(history=3))
    torn = b'{"revision": 2, "seq": 0, "at": "2023-11-14T22:1'
    with store.history_path.open("ab") as handle:
        handle.write(torn)  # a crash in the middle of an append
    assert reasons(store.history()) == ["step 0", "step 1", "step 2"]
    assert store.load() is not None
    store.save(stored(history=1, first=3))
    assert reasons(store.history()) == [f"step {n}" for n in range(4)]
    raw = store.history_path.read_bytes()
    assert torn + b"\n" in raw and raw.endswith(b"\n")  # the torn bytes stay, on a line of their own


def test_an_unreadable_line_anywhere_is_skipped(tmp_path: Path) -> None:
    store = JsonFileStore(tmp_path / "state.json")
    store.save(stored(history=1))
    with store.history_path.open("ab") as handle:
        handle.write(b"\xff\xfe garbage\n[]\n{\"revision\": true}\n\n")
    store.save(stored(history=1, first=1))
    assert reasons(store.history()) == ["step 0", "step 1"]


def test_a_crash_between_the_history_append_and_the_state_replace_leaves_no_phantom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JsonFileStore(tmp_path / "state.json")
    store.save(stored(history=2))
    before = store.load()
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", io_error)
    with pytest.raises(StateError):
        store.save(stored(history=1, first=90))  # the line is appended, the state is not
    assert b'"step 90"' in store.history_path.read_bytes()
    assert store.load() == before and reasons(store.history()) == ["step 0", "step 1"]
    monkeypatch.setattr(os, "replace", real_replace)
    store.save(stored(history=1, first=2))  # the same revision again: this one is committed
    assert reasons(store.history()) == ["step 0", "step 1", "step 2"]
    assert reasons(store.load().history) == ["step 0", "step 1", "step 2"]  # type: ignore[union-attr]


def test_a_write_without_transitions_after_a_crash_still_hides_the_phantom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JsonFileStore(tmp_path / "state.json")
    store.save(stored(history=1))
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", io_error)
    with pytest.raises(StateError):
        store.save(stored(history=1, first=90))
    monkeypatch.setattr(os, "replace", real_replace)
    assert store.save(stored(weight=50, history=0)).state.revision == 2
    store.save(stored(history=1, first=1))
    assert reasons(store.history()) == ["step 0", "step 1"]


def test_a_removed_state_file_keeps_the_history_and_its_revisions(tmp_path: Path) -> None:
    store = JsonFileStore(tmp_path / "state.json")
    store.save(stored(history=3))
    store.save(stored(history=1, first=3))
    store.path.unlink()  # the operator restarts the plan
    assert store.load() is None and len(store.history()) == 4
    again = store.save(stored(history=1, first=4))
    assert again.state.revision == 3 and reasons(again.history) == [f"step {n}" for n in range(5)]
    assert reasons(store.history()) == [f"step {n}" for n in range(5)]


def legacy_file(path: Path, count: int, revision: int) -> None:
    """A state file as the store wrote it before the history file: the history inside."""
    state = RolloutState(state="progressing", weight=25, stage_started_at=T0, revision=revision)
    document = {"format": 1, "state": state.to_json(), "history": [transition(n).to_json() for n in range(count)]}
    path.write_text(json.dumps(document, indent=1, sort_keys=True))


def test_an_older_state_file_loads_and_the_next_write_moves_its_history_out(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    legacy_file(path, 1000, revision=1400)
    store = JsonFileStore(path)
    loaded = store.load()
    assert loaded is not None and loaded.state.revision == 1400
    assert reasons(loaded.history) == [f"step {n}" for n in range(950, 1000)]
    assert reasons(store.history()) == [f"step {n}" for n in range(1000)]
    size = path.stat().st_size
    after = store.save(stored(history=1, first=1000))
    assert after.state.revision == 1401 and reasons(after.history) == [f"step {n}" for n in range(951, 1001)]
    assert "history" not in json.loads(path.read_text()) and path.stat().st_size < size / 10
    assert reasons(store.history()) == [f"step {n}" for n in range(1001)]


def test_an_interrupted_migration_is_neither_lost_nor_doubled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    legacy_file(path, 20, revision=30)
    store = JsonFileStore(path)
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", io_error)
    with pytest.raises(StateError):
        store.save(stored(history=1, first=90))  # the old history is copied, the state is not
    assert len(store.history_path.read_text().splitlines()) == 21
    assert reasons(store.history()) == [f"step {n}" for n in range(20)]
    monkeypatch.setattr(os, "replace", real_replace)
    store.save(stored(history=1, first=20))
    assert reasons(store.history()) == [f"step {n}" for n in range(21)]
