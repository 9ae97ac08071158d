"""The reseed recoveryd runs (`dtfd reseed`) is crash-safe: interrupted anywhere, running it again finishes it,
and a node started in between never finds an empty data dir it could vote from."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtfd.raft.messages import HardState
from dtfd.storage import datadir
from dtfd.storage.datadir import DiskStorage, finish_reseed, open_or_exit, rejoin_term, reseed


class Crash(Exception):
    """The process dies here."""


def node_dir(tmp_path: Path, term: int = 4) -> Path:
    path = tmp_path / "node2"
    storage = DiskStorage(str(path))
    storage.set_hard_state(HardState(term, "node1", 0))
    storage.sync()
    storage.close()
    return path


def backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.backup-*"))


def assert_reseeded_once(path: Path, term: int) -> None:
    assert sorted(p.name for p in path.iterdir()) == ["REJOIN"] and rejoin_term(str(path)) == term
    (backup,) = backups(path)
    assert (backup / "hardstate").exists() and (backup / "wal").is_dir()  # the old data, whole
    assert not Path(f"{path}{datadir.RESEED_SUFFIX}").exists()


def crash_at(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    def pause(name: str) -> None:
        if name == point:
            raise Crash(name)

    monkeypatch.setattr(datadir, "_pause_point", pause)


def test_a_reseed_moves_the_dir_aside_and_leaves_only_the_marker(tmp_path):
    path = node_dir(tmp_path)
    report = reseed(str(path))
    assert report["rejoin_term"] == 4 and report["old_term"] == 4 and report["backup"] == str(backups(path)[0])
    assert_reseeded_once(path, 4)


def test_reseeding_a_reseeded_dir_changes_nothing(tmp_path):
    path = node_dir(tmp_path)
    first = reseed(str(path))
    again = reseed(str(path), min_term=9)
    assert (again["backup"], again["rejoin_term"]) == (first["backup"], 4)
    assert_reseeded_once(path, 4)


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_a_reseed_interrupted_after_the_swap_is_finished_by_running_it_again(tmp_path, monkeypatch, exchange):
    path = node_dir(tmp_path)
    if not exchange:
        monkeypatch.setattr(datadir, "_exchange", lambda a, b: False)
    crash_at(monkeypatch, "reseed_swapped")
    with pytest.raises(Crash):
        reseed(str(path), min_term=6)
    if exchange:
        assert sorted(p.name for p in path.iterdir()) == ["REJOIN"]  # never without its marker
    else:
        assert not path.exists()
    monkeypatch.undo()
    report = reseed(str(path))
    assert report["rejoin_term"] == 6 and report["backup"] == str(backups(path)[0])
    assert_reseeded_once(path, 6)


def test_a_node_started_between_the_two_renames_finishes_the_swap_and_rejoins(tmp_path, monkeypatch):
    path = node_dir(tmp_path)
    monkeypatch.setattr(datadir, "_exchange", lambda a, b: False)
    crash_at(monkeypatch, "reseed_swapped")
    with pytest.raises(Crash):
        reseed(str(path))
    storage = open_or_exit(str(path))  # dtfd's start: it must not create an empty dir without the marker
    try:
        assert rejoin_term(str(path)) == 4
    finally:
        storage.close()
    assert len(backups(path)) == 1 and finish_reseed(str(path)) is None


def test_a_stage_never_swapped_in_is_discarded_and_the_reseed_done_once(tmp_path, monkeypatch):
    path = node_dir(tmp_path)

    def power_cut(a: str, b: str) -> bool:
        raise Crash("before the swap")

    monkeypatch.setattr(datadir, "_exchange", power_cut)
    with pytest.raises(Crash):
        reseed(str(path))
    assert (path / "wal").is_dir() and not backups(path)  # nothing moved yet
    monkeypatch.undo()
    reseed(str(path))
    assert_reseeded_once(path, 4)
