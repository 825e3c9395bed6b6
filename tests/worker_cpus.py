"""One CPU per pytest-xdist worker while it trains.

While a test that trains, starts the jail or is slow runs on an xdist worker (its fixtures'
setup included: the in-process scvi fits of tests/test_family_scvi.py are slow, unmarked
train), the worker and every process it starts (jobs in the jail, the trainers they run)
are pinned to one of the machine's CPUs: one that no other worker holds, where there is
one (three workers on two CPUs pinned gw0 and gw2 both to CPU 0 by number, and CPU 1 could idle
beside them; a worker holds its CPU by a lock file of the run's). The trainers size their
thread pools from the CPUs they may use (`os.sched_getaffinity`), so on a 2-core machine
three workers no longer run three jobs of two threads each plus the host's own threads on
two cores: oversubscribed OpenMP pools spin against each other (an in-process scvi fit took 341 s
beside two workers, 24 s alone). Other tests keep every CPU, and sequential runs are left
as they are. FORGE_TEST_PIN_CPUS=0 turns it off.
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PINNED_TIERS = ("train", "sandbox", "slow")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextmanager
def claim() -> Iterator[int | None]:
    """The CPU this xdist worker pins to while the block runs: the first, from its own number
    on, that no other worker of the run holds; its own by number where every one is held.
    None in a sequential run or with FORGE_TEST_PIN_CPUS=0."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... on xdist workers only
    if not worker or os.environ.get("FORGE_TEST_PIN_CPUS", "1") == "0":
        yield None
        return
    cpus = sorted(os.sched_getaffinity(0))
    first = int(worker.removeprefix("gw")) % len(cpus)
    order = cpus[first:] + cpus[:first]
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", "run")  # the same on every worker of a run
    folder = Path(tempfile.gettempdir()) / f"forge-test-cpus-{run}"
    folder.mkdir(exist_ok=True)
    for cpu in order:
        with open(folder / f"cpu{cpu}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when closed
            except BlockingIOError:
                continue
            yield cpu
            return
    yield order[0]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not any(item.get_closest_marker(m) for m in PINNED_TIERS):
        return (yield)
    with claim() as cpu:
        if cpu is None:
            return (yield)
        return (yield from _pinned(cpu))


def _pinned(cpu: int):
    cpus, env = os.sched_getaffinity(0), {n: os.environ.get(n) for n in THREAD_VARS}
    os.sched_setaffinity(0, {cpu})  # this thread and those it starts, not the ones running
    os.environ.update(dict.fromkeys(THREAD_VARS, "1"))  # libraries that count cores
    # torch in this process (an in-process fit) keeps the pool it made while unpinned: its
    # threads were not pinned with this one and spin on the other CPU at every barrier.
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(1)
    try:
        return (yield)
    finally:
        os.sched_setaffinity(0, cpus)
        if torch:
            torch.set_num_threads(threads)
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
