"""Tests for harness/files.py: folder publishing (the first finished copy wins, the loser is
dropped), permissions that follow the umask, and the readers' one-line errors (pipes, deep
nesting) that never block."""
import os
from contextlib import contextmanager

import pytest

from harness.files import FileError, parse_json_line, publish_dir, read_json, read_jsonl, write_json


@contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_publish_dir_moves_a_finished_folder_in_and_keeps_the_first_one(tmp_path):
    first, second, dst = tmp_path / "a.tmp", tmp_path / "b.tmp", tmp_path / "cache"
    for folder, text in ((first, "first"), (second, "second")):
        folder.mkdir()
        (folder / "meta.json").write_text(text)
    assert publish_dir(str(first), str(dst)) is True
    assert publish_dir(str(second), str(dst)) is False  # another process finished first
    assert (dst / "meta.json").read_text() == "first"
    assert not first.exists() and not second.exists()


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755),
                                                          (0o077, 0o600, 0o700),
                                                          (0o002, 0o664, 0o775)])
def test_written_files_and_published_folders_follow_the_umask(tmp_path, mask, file_mode,
                                                               folder_mode):
    """As any program's files: readable by a colleague under 022, private under 077 (the
    temporary-file helpers would make them 0600 and 0700 whatever the umask)."""
    src = tmp_path / "cache.tmp"
    with umask(mask):
        src.mkdir(mode=0o700)  # as mkdtemp makes it
        write_json(str(src / "meta.json"), {"a": 1})
        publish_dir(str(src), str(tmp_path / "cache"))
    assert mode(tmp_path / "cache" / "meta.json") == file_mode
    assert mode(tmp_path / "cache") == folder_mode


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


def test_read_json_refuses_pipes_folders_and_deep_nesting_in_one_line(tmp_path):
    pipe = tmp_path / "config.json"
    os.mkfifo(pipe)  # open() would wait for a writer forever
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)  # json recurses: RecursionError
    for path, says in [(pipe, "is a named pipe, not a regular file"),
                       (tmp_path, "is a folder, not a regular file"),
                       (deep, "is not valid JSON (nested too deeply)"),
                       (tmp_path / "missing.json", "does not exist")]:
        with pytest.raises(FileError) as e:
            read_json(str(path))
        assert says in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert read_json(str(tmp_path / "missing.json"), missing_ok=True) == {}
    assert parse_json_line(b"[" * 100_000) == (None, "not JSON (nested too deeply)")
