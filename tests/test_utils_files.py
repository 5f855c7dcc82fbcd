"""``detectkit.utils.files.atomic_write``: readers see the old file or the whole new one."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from detectkit.utils.files import DiskFullError, atomic_write, partial_path


def test_bytes_text_and_callback_replace_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "out.json"
    assert atomic_write(path, "[1, 2]") == path and path.read_text() == "[1, 2]"  # parents created
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    atomic_write(path, lambda partial: partial.write_text("from a writer"))
    assert path.read_text() == "from a writer"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]  # nothing left beside it


def test_a_failing_writer_leaves_the_old_file_and_no_partial(tmp_path):
    path = tmp_path / "graph.onnx"
    path.write_text("old")

    def broken(partial: Path) -> None:
        partial.write_text("half of a ")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        atomic_write(path, broken)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["graph.onnx"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_disk_full_is_one_clear_error_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "predictions.json"
    path.write_text("previous")
    partial_path(path).symlink_to("/dev/full")  # every write there fails with ENOSPC
    with pytest.raises(DiskFullError, match=f"no space left on device writing {re.escape(str(path))}") as e:
        atomic_write(path, "x" * 100_000)
    assert isinstance(e.value, OSError) and e.value.errno is not None
    assert path.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["predictions.json"]
