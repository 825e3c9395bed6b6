"""One CPU per pytest-xdist worker while it trains.

While a test that trains, starts the jail or is slow runs on an xdist worker (its fixtures'
setup included: the in-process scvi fits of tests/test_family_scvi.py are slow, unmarked
train), the worker and every process it starts (jobs in the jail, the trainers they run)
are pinned to one of the machine's CPUs, round robin. The trainers size their thread pools
from the CPUs they may use (`os.sched_getaffinity`), so on a 2-core machine three workers no
longer run three jobs of two threads each plus the host's own threads on two cores:
oversubscribed OpenMP pools spin against each other (an in-process scvi fit took 341 s
beside two workers, 24 s alone). Other tests keep every CPU, and sequential runs are left
as they are. FORGE_TEST_PIN_CPUS=0 turns it off.
"""

from __future__ import annotations

import os

import pytest

PINNED_TIERS = ("train", "sandbox", "slow")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _one_cpu() -> int | None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... on xdist workers only
    if not worker or os.environ.get("FORGE_TEST_PIN_CPUS", "1") == "0":
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[int(worker.removeprefix("gw")) % len(cpus)]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu = _one_cpu()
    if cpu is None or not any(item.get_closest_marker(m) for m in PINNED_TIERS):
        return (yield)
    cpus, env = os.sched_getaffinity(0), {n: os.environ.get(n) for n in THREAD_VARS}
    os.sched_setaffinity(0, {cpu})
    os.environ.update(dict.fromkeys(THREAD_VARS, "1"))  # libraries that count cores
    try:
        return (yield)
    finally:
        os.sched_setaffinity(0, cpus)
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
