"""How long the eval gate's paired bootstrap takes on the host, against the scipy reference.

For each size (the CBMC test split's 862 cells, and 10,000 and 100,000 cells), 13 classes,
synthetic predictions (candidate ~90% right, comparator ~85%), it times
runner.jobs.bootstrap.paired_bootstrap (1,000 resamples, macro-F1) N times and prints the
median and spread, and once the same interval by scipy.stats.bootstrap (paired, percentile,
vectorised over an axis-aware macro-F1) with the side-by-side ratio and the difference of the
interval ends. Target: well under a second per comparison at 10,000 cells on 2 CPUs (the
gate's host side must not cost more than its sandbox job).

    .venv/bin/python benchmarks/gate_bootstrap.py [N]
    .venv/bin/python benchmarks/gate_bootstrap.py --smoke    # 862 cells, one run: seconds

Exits 1 when an interval strays from scipy's by more than 0.02 at either end (the same
data and resamples: only the resampling draws differ).
"""

from __future__ import annotations

import argparse
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


TOLERANCE = 0.02  # CI ends, ours vs scipy's, beyond the resampling noise at 862 cells


def main(n: int = 7, sizes: tuple[int, ...] = (862, 10_000, 100_000)) -> int:
    print(f"paired bootstrap, macro-F1, {RESAMPLES} resamples, {K} classes; {n} runs each")
    ok = True
    for cells in sizes:
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
            apart = max(abs(ours.low - low), abs(ours.high - high))
            ok &= bool(apart <= TOLERANCE)
            line += (f" | scipy {scipy_s * 1000:8.1f} ms, ratio {scipy_s / med:5.1f}x; CI ends "
                     f"differ by {abs(ours.low - low):.4f} / {abs(ours.high - high):.4f}"
                     f"{'' if apart <= TOLERANCE else f' (MORE THAN {TOLERANCE})'}")
        print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="?", type=int, default=7, help="timed runs per size")
    ap.add_argument("--smoke", action="store_true", help="862 cells, one run: seconds")
    a = ap.parse_args()
    sys.exit(main(1, (862,)) if a.smoke else main(a.runs))
