"""Writes that appear complete or not at all (models.atomic), for files and directories."""

from pathlib import Path

import pytest

from models.atomic import SCRATCH_SUFFIX, written_atomically


def _leftovers(directory: Path) -> list[Path]:
    return list(directory.glob(f"*{SCRATCH_SUFFIX}"))


def test_a_file_replaces_the_old_one_only_once_written(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "factors.json"
    with written_atomically(target) as scratch:
        scratch.write_text("old")
    with written_atomically(target) as scratch:
        scratch.write_text("new")
        assert target.read_text() == "old"  # readers see the old content until the block completes
    assert target.read_text() == "new"
    assert not _leftovers(target.parent)


def test_an_error_or_interrupt_leaves_the_target_and_no_scratch(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with written_atomically(target) as scratch:
        scratch.mkdir()
        (scratch / "config.json").write_text("{}")
    for stop in (RuntimeError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(stop)), written_atomically(target) as scratch:
            scratch.mkdir()
            (scratch / "half.bin").write_text("x")
            raise stop
    assert [path.name for path in target.iterdir()] == ["config.json"]
    assert not _leftovers(tmp_path)


def test_a_directory_replaces_the_old_one_and_keep_existing_keeps_it(tmp_path: Path) -> None:
    target = tmp_path / "export"
    for name in ("first", "second"):
        with written_atomically(target) as scratch:
            scratch.mkdir()
            (scratch / name).touch()
    assert [path.name for path in target.iterdir()] == ["second"]
    with written_atomically(target, keep_existing=True) as scratch:  # another process got there first
        scratch.mkdir()
        (scratch / "third").touch()
    assert [path.name for path in target.iterdir()] == ["second"]
    assert not _leftovers(tmp_path)


def test_concurrent_writers_get_their_own_scratch(tmp_path: Path) -> None:
    target = tmp_path / "cache.pt"
    with written_atomically(target) as first, written_atomically(target) as second:
        assert first != second
        first.write_text("1")
        second.write_text("2")
    assert target.read_text() == "1"  # the outer block completes last
