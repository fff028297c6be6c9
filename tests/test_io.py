"""io.py: an atomic write either replaces the destination completely or leaves it as it was, with no temp left."""

from __future__ import annotations

import pytest

from longtune.io import atomic_dir, atomic_open, atomic_write_text


def test_atomic_open_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "table.bin"
    with atomic_open(path, "wb") as fh:
        fh.write(b"first")
    old_inode = path.stat().st_ino
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert path.stat().st_ino != old_inode  # renamed over, never truncated in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.bin"]


def test_atomic_open_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk gone"):
        with atomic_open(path) as fh:
            fh.write("half a ro")
            raise RuntimeError("disk gone")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_atomic_dir_replaces_the_folder_or_leaves_it(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "stale.txt").write_text("earlier run")
    (tmp_path / ".tmp-final").mkdir()  # left by a killed run: cleared, not reused
    (tmp_path / ".tmp-final" / "junk").write_text("x")
    with atomic_dir(final, ".tmp-final") as tmp:
        (tmp / "model.safetensors").write_text("weights")
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final, ".tmp-final") as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise KeyboardInterrupt
    assert (final / "model.safetensors").read_text() == "weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
