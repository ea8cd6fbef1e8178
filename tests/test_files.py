"""Tests for harness/files.py: folder publishing (the first finished copy wins, the loser is
dropped) and the JSON-lines reader's one-line errors."""
import os

import pytest

from harness.files import FileError, publish_dir, read_jsonl


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


def test_read_jsonl_returns_objects_and_names_the_bad_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}\r\n')
    assert read_jsonl(str(path), "pass X") == [{"a": 1}, {"a": 2}]  # blank lines skipped
    with pytest.raises(FileError, match="line 2: not JSON"):  # a blank line, refused
        read_jsonl(str(path), "pass X", skip_blank=False)
    for content, says in [(b'{"a": 1}\n[1, 2]\n', "line 2: not a JSON object"),
                          (b'{"a": 1}\n{"a": \n', "line 2: not JSON"),
                          (b'{"a": "caf\xe9"}\n', "line 1: not UTF-8 text")]:
        path.write_bytes(content)
        with pytest.raises(FileError) as e:
            read_jsonl(str(path), "pass X")
        assert says in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
        assert str(e.value).endswith("; pass X")
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n')
    with pytest.raises(FileError, match="line 2: no a; pass X"):
        read_jsonl(str(path), "pass X", check=lambda row: None if "a" in row else "no a")


def test_read_jsonl_refuses_what_is_not_a_regular_file_instead_of_blocking(tmp_path):
    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)  # opening a named pipe for reading waits for a writer forever
    for path in (pipe, tmp_path, tmp_path / "missing.jsonl"):
        with pytest.raises(FileError, match="does not exist or is not a file; pass X"):
            read_jsonl(str(path), "pass X")
