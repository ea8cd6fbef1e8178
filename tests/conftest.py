"""Shared pytest settings: a hard per-test time limit, so that a hung test fails CI quickly
with every thread's stack in the log instead of stalling until CI's own timeout (the slowest
test takes about a minute here).

pytest itself prints every thread's stack when a test passes `faulthandler_timeout`
(pyproject.toml); a test still running 30 s after that ends the whole run with exit code 3."""
import os
import threading

import pytest

TEST_LIMIT_S = 600  # pyproject.toml's faulthandler_timeout


@pytest.fixture(autouse=True)
def hard_time_limit():
    timer = threading.Timer(TEST_LIMIT_S + 30, lambda: os._exit(3))
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()
