"""Every model family on CBMC, side by side: fit time, train cells per second and test
macro-F1 of a from-scratch cell-type fine-tune, next to the logistic-regression baseline on
the same split (seed 0, fractions 0.1/0.1).

Each family's recipe (trainers/family.py) is called in-process, as the jail's entrypoint
would, on a temporary output folder. A family that fails to import or to train is a row
saying so. `cells/s` is the cells trained on per second: the split's train cells times the
epochs trained, over the fit's seconds (the linear model's lbfgs fit counts as one pass).

    python benchmarks/families.py                  # the families' defaults (minutes)
    python benchmarks/families.py --smoke          # 1 epoch of 2 batches, 65 tokens: seconds
    python benchmarks/families.py --families linear scvi
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from runner.jobs import datasets, truth
from trainers import family
from trainers.manifest import parse_manifest

# A seconds-long run; keys a family lacks are left out (linear fits in about a second as it is).
# Short sequences: the test split is evaluated whole, and at scGPT's 257 tokens a cell that
# alone took half a minute on the loaded 2-core box.
SMOKE = {"max_epochs": 1, "limit_train_batches": 2, "limit_eval_batches": 2, "max_seq_len": 65,
         "batch_size": 32}


def run(name: str, dataset: str, out: Path, smoke: bool) -> dict:
    """One family's fine-tune: its row of the table."""
    try:
        fam = family.get(name)
        recipe = fam.load_recipe()
    except Exception as e:  # noqa: BLE001 -- a family that cannot load is a row, not a crash
        return {"family": name, "status": f"import failed: {type(e).__name__}: {e}"}
    training = {k: v for k, v in SMOKE.items() if k in fam.training_keys()} if smoke else {}
    t0 = time.perf_counter()
    try:
        m = parse_manifest({"family": name, "task": "finetune_celltype", "seed": 0,
                            "output_dir": str(out), "training": training,
                            "dataset": {"name": "cbmc", "path": dataset, "format": "cbmc_mat"}})
        state: dict = {}
        result = recipe.train(m, state)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return {"family": name, "status": f"failed: {type(e).__name__}: {e}"}
    fit_s = result["timings"]["train_s"]
    metrics = result["metrics"]
    # the test F1 and the baseline's as the host records them: its own split, labels and
    # baseline against the job's per-cell predictions (runner/jobs/truth.py)
    t = m.training
    held = truth.rebuild(Path(dataset), {"format": "cbmc_mat"}, seed=m.seed,
                         split_seed=getattr(t, "split_seed", None),
                         val_fraction=t.val_fraction, test_fraction=t.test_fraction)
    measured = truth.measure(out, held)["metrics"]
    status = "ok"
    if name == "linear" and measured["test_macro_f1"] != measured["baseline_test_macro_f1"]:
        status = "differs from the baseline: the linear family is the baseline's own model"
    return {"family": name, "status": status, "fit_s": fit_s,
            "cells_per_s": state["split"]["counts"]["train"]
            * (metrics.get("epochs_trained") or 1) / fit_s,
            "epochs": metrics.get("epochs_trained"),
            "total_s": time.perf_counter() - t0,
            "test_macro_f1": measured["test_macro_f1"],
            "baseline_macro_f1": measured["baseline_test_macro_f1"]}


def table(rows: list[dict]) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)
    lines = [f"{'family':<8} {'fit s':>8} {'cells/s':>9} {'epochs':>6} {'total s':>8} "
             f"{'test F1':>8} {'baseline':>8}  status"]
    for r in rows:
        lines.append(f"{r['family']:<8} {num(r.get('fit_s'), '.1f'):>8} "
                     f"{num(r.get('cells_per_s'), '.0f'):>9} {num(r.get('epochs'), '.0f'):>6} "
                     f"{num(r.get('total_s'), '.1f'):>8} {num(r.get('test_macro_f1'), '.4f'):>8} "
                     f"{num(r.get('baseline_macro_f1'), '.4f'):>8}  {r['status'][:100]}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="1 epoch of 2 batches per family (scGPT: 65 tokens a cell)")
    parser.add_argument("--families", nargs="+", default=list(family.FAMILIES))
    args = parser.parse_args()
    dataset = str(datasets.loader_input("cbmc", datasets.fetch("cbmc")))
    rows = []
    with tempfile.TemporaryDirectory(prefix="forge-families-") as tmp:
        for name in args.families:
            print(f"--- {name}", flush=True)
            rows.append(run(name, dataset, Path(tmp) / name, args.smoke))
    print(f"\nCBMC finetune_celltype from scratch{' (smoke)' if args.smoke else ''}, "
          "seed 0, 862 test cells")
    print(table(rows))
    return 0 if all(r["status"] == "ok" for r in rows) else 1  # a failed family fails the run


if __name__ == "__main__":
    sys.exit(main())
