"""How long the eval gate's paired bootstrap takes on the host, against the scipy reference.

For each size (the CBMC test split's 862 cells, and 10,000 and 100,000 cells), 13 classes,
synthetic predictions (candidate ~90% right, comparator ~85%), it times
runner.jobs.bootstrap.paired_bootstrap (1,000 resamples, macro-F1) N times and prints the
median and spread, and once the same interval by scipy.stats.bootstrap (paired, percentile,
vectorised over an axis-aware macro-F1) with the side-by-side ratio and the difference of the
interval ends. Target: well under a second per comparison at 10,000 cells on 2 CPUs (the
gate's host side must not cost more than its sandbox job).

    .venv/bin/python benchmarks/gate_bootstrap.py [N]
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
from scipy import stats

from runner.jobs.bootstrap import paired_bootstrap

K = 13  # CBMC's cell types
RESAMPLES = 1000


def _macro_f1(true, pred, axis=-1):
    """Macro-F1 over classes 0..K-1 along `axis` (scipy passes resamples on axis 0)."""
    f1 = []
    for c in range(K):
        tp = ((true == c) & (pred == c)).sum(axis=axis)
        denom = (true == c).sum(axis=axis) + (pred == c).sum(axis=axis)
        f1.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))
    return np.mean(f1, axis=0)


def main(n: int = 7) -> None:
    print(f"paired bootstrap, macro-F1, {RESAMPLES} resamples, {K} classes; {n} runs each")
    for cells in (862, 10_000, 100_000):
        rng = np.random.default_rng(cells)
        true = rng.integers(0, K, cells)
        a = np.where(rng.random(cells) < 0.90, true, rng.integers(0, K, cells))
        b = np.where(rng.random(cells) < 0.85, true, rng.integers(0, K, cells))
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            ours = paired_bootstrap(true, a, b, metric="macro_f1", n_classes=K,
                                    n_resamples=RESAMPLES, seed=i)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        line = (f"{cells:>7} cells: ours median {med * 1000:8.1f} ms "
                f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f})")
        if cells <= 10_000:
            t0 = time.perf_counter()
            ref = stats.bootstrap((true, a, b), lambda t, x, y, axis=-1: _macro_f1(t, x, axis)
                                  - _macro_f1(t, y, axis), paired=True, vectorized=True,
                                  n_resamples=RESAMPLES, method="percentile",
                                  random_state=np.random.default_rng(0))
            scipy_s = time.perf_counter() - t0
            low, high = ref.confidence_interval
            line += (f" | scipy {scipy_s * 1000:8.1f} ms, ratio {scipy_s / med:5.1f}x; CI ends "
                     f"differ by {abs(ours.low - low):.4f} / {abs(ours.high - high):.4f}")
        print(line, flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
