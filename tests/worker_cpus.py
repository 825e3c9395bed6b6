"""One CPU per pytest-xdist worker.

Each worker, and every process it starts (jobs in the jail, the trainers they run, servers),
is pinned to one of the machine's CPUs, round robin. The trainers size their thread pools
from the CPUs they may use (`os.sched_getaffinity`), so on a 2-core machine three workers
no longer run three jobs of two threads each plus the host's own threads on two cores:
oversubscribed OpenMP pools spin against each other (an in-process scvi fit took 341 s
beside two workers, 24 s alone). Sequential runs are left as they are.
FORGE_TEST_PIN_CPUS=0 turns it off.
"""

from __future__ import annotations

import os


def pytest_configure(config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... on xdist workers only
    if not worker or os.environ.get("FORGE_TEST_PIN_CPUS", "1") == "0":
        return
    cpus = sorted(os.sched_getaffinity(0))
    mine = cpus[int(worker.removeprefix("gw")) % len(cpus)]
    os.sched_setaffinity(0, {mine})
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = "1"  # libraries that count cores instead of reading the affinity
