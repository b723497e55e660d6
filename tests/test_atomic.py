"""Atomic writes: the final name only ever holds a complete file."""

from __future__ import annotations

import pytest
import torch

from features.atomic import atomic_path, torch_save_atomic, write_text_atomic


def test_success_renames_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    write_text_atomic(target, "hello")
    assert target.read_text() == "hello"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]
    torch_save_atomic({"x": torch.arange(3)}, tmp_path / "t.pt")
    assert torch.equal(torch.load(tmp_path / "t.pt")["x"], torch.arange(3))


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_suffix_keeps_the_extension_for_format_sniffing_writers(tmp_path):
    with atomic_path(tmp_path / "clip.mp4", suffix=".partial.mp4") as tmp:
        assert tmp.name.endswith(".partial.mp4") and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "clip.mp4").read_bytes() == b"x"
