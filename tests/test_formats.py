"""The one temporary-folder-then-rename helper every folder-writing stage uses (pipeline.formats.atomic_dir)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ClaspError
from pipeline.formats import atomic_dir


def test_a_finished_block_puts_the_folder_in_place(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "set"
    with atomic_dir(out) as tmp:
        assert tmp.is_dir() and tmp.parent == out.parent and not out.exists()
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"
    assert sorted(p.name for p in out.parent.iterdir()) == ["set"]


def test_a_failed_block_leaves_nothing_and_keeps_the_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "set"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out, replace=True) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with atomic_dir(out, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_other_data_is_refused_unless_replace(tmp_path: Path) -> None:
    out = tmp_path / "set"
    out.mkdir()
    with atomic_dir(out) as tmp:  # an empty folder is fine
        (tmp / "x").write_text("x")
    with pytest.raises(ClaspError, match=r"set already exists and is not empty"), atomic_dir(out):
        pass
    assert [p.name for p in out.iterdir()] == ["x"]
