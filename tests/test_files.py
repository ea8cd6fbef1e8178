"""Tests for files.py's folder publishing: the first finished copy wins, the loser is dropped."""
import os

from harness.files import publish_dir


def test_publish_dir_moves_a_finished_folder_in_and_keeps_the_first_one(tmp_path):
    first, second, dst = tmp_path / "a.tmp", tmp_path / "b.tmp", tmp_path / "cache"
    for folder, text in ((first, "first"), (second, "second")):
        folder.mkdir()
        (folder / "meta.json").write_text(text)
    assert publish_dir(str(first), str(dst)) is True
    assert publish_dir(str(second), str(dst)) is False  # another process finished first
    assert (dst / "meta.json").read_text() == "first"
    assert not first.exists() and not second.exists()
    assert oct(os.stat(dst).st_mode & 0o777) == oct(0o755)
