"""Each test starts with denormal floats as the session found them.

The scGPT recipe flushes denormal floats to zero for its whole process
(`torch.set_flush_denormal(True)`: denormal Adam states slow CPU kernels several-fold),
which is right in the jail, where a job is a process of its own. A test that runs the
entrypoint in an xdist worker (test_trainer_entrypoint's test_same_seed_same_metrics) left the
worker flushing them for every later test: hypothesis then refuses to draw floats ("we can't
represent subnormal floats right now"), and three property tests of test_compose failed once
that module ran first (its xdist group) on their worker.
After each test's teardown, a worker that has imported torch flushes denormals no more.
"""

from __future__ import annotations

import sys

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    yield
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_flush_denormal(False)
