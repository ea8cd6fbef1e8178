"""Shared pytest settings: a hard per-test time limit, so that a hung test fails CI quickly
with every thread's stack in the log instead of stalling until CI's own timeout (the slowest
test takes about a minute here).

pytest itself prints every thread's stack when a test passes `faulthandler_timeout`
(pyproject.toml); a test still running 30 s after that ends the whole run with exit code 3."""
import os
import threading

import pytest

from tiny import tiny_checkpoint, write_books

TEST_LIMIT_S = 600  # pyproject.toml's faulthandler_timeout


@pytest.fixture(autouse=True)
def hard_time_limit():
    timer = threading.Timer(TEST_LIMIT_S + 30, lambda: os._exit(3))
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()


@pytest.fixture(scope="session")
def books(tmp_path_factory):
    """60 synthetic books, one .txt each: a corpus folder for the scripts' tests."""
    return write_books(tmp_path_factory.mktemp("books"), seed=3, n_docs=60)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A token cache folder shared by the tests that read `books`."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The one-layer cl100k checkpoint (tests/tiny.py)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")[0]
