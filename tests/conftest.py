"""Shared pytest settings: a hard per-test time limit, so a hung test fails CI quickly with every
thread's stack in the log instead of stalling until CI's own timeout (the slowest test takes
under a minute here)."""
import faulthandler
import os
import sys

import pytest

TEST_LIMIT_S = 600


def real_stderr(config):
    """The terminal's stderr: while a test runs pytest has pointed fd 2 at a capture file, whose
    contents are lost if the process exits, so use the copy pytest saved of the original."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    saved = getattr(getattr(getattr(capture, "_global_capturing", None), "err", None),
                    "targetfd_save", None)
    return os.fdopen(os.dup(saved if saved is not None else sys.__stderr__.fileno()), "w")


@pytest.fixture(scope="session")
def _stderr(pytestconfig):
    f = real_stderr(pytestconfig)
    yield f
    f.close()


@pytest.fixture(autouse=True)
def hard_time_limit(_stderr):
    faulthandler.dump_traceback_later(TEST_LIMIT_S, exit=True, file=_stderr)
    yield
    faulthandler.cancel_dump_traceback_later()
