"""How long the trainer's tokenizer takes per batch of real CBMC cells.

Tokenizes the same 64-cell batch (sample expressed genes, bin, pad, mask 40 %) N times per
max_seq_len after one warm-up call, and prints the median and the spread per batch and in
cells per second. Target: <= 50 ms per 64-cell batch at max_seq_len 257 on 2 CPUs (the
data loader must not hold up a training step).

    .venv/bin/python benchmarks/tokenizer.py [N]
    .venv/bin/python benchmarks/tokenizer.py --smoke    # one run at 129: seconds

Exits 1 when a batch comes out of the wrong shape (the target is reported, not enforced:
this box is shared).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from runner.jobs.datasets import fetch
from trainers.data.load import load
from trainers.scgpt.tokenize import Tokenizer

BATCH = 64
TARGET_S = 0.050  # per batch, at max_seq_len 257


def main(n: int = 20, lengths: tuple[int, ...] = (129, 257, 513)) -> int:
    data = load(fetch("cbmc"), "cbmc_mat", name="cbmc")
    X = data.X[:BATCH]
    print(f"runs: {n} per length, after 1 warm-up; batch: {BATCH} CBMC cells x "
          f"{X.shape[1]} genes, mask_ratio 0.4")
    ok = True
    for max_seq_len in lengths:
        tok = Tokenizer(gene_ids=np.arange(X.shape[1]) + 3, cls_id=1, pad_id=0,
                        max_seq_len=max_seq_len)
        rng = np.random.default_rng(0)
        first = tok(X, rng, 0.4)
        shapes = {k: tuple(v.shape) for k, v in first.items()}
        B, T = shapes["genes"]  # T: <cls> + the most genes a cell expresses, capped
        if B != BATCH or not 1 < T <= max_seq_len or len(set(shapes.values())) != 1:
            print(f"max_seq_len {max_seq_len}: wrong batch shapes {shapes}")
            ok = False
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            tok(X, rng, 0.4)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        verdict = ""
        if max_seq_len == 257:
            verdict = f"  (target <= {TARGET_S * 1000:.0f} ms: " \
                      f"{'OK' if med <= TARGET_S else 'OVER TARGET'})"
        print(f"max_seq_len {max_seq_len:4d}  median {med * 1000:6.1f} ms/batch  "
              f"min {min(times) * 1000:6.1f}  max {max(times) * 1000:6.1f}  "
              f"{BATCH / med:8.0f} cells/s{verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="?", type=int, default=20, help="timed runs per length")
    ap.add_argument("--smoke", action="store_true", help="one run at max_seq_len 129: seconds")
    a = ap.parse_args()
    sys.exit(main(1, (129,)) if a.smoke else main(a.runs))
