"""Sandbox entrypoint of the eval gate: `python -m trainers.gate_eval MANIFEST.json`.

Reads an `EvalManifest` (trainers/manifest.py), rebuilds the candidate's split of the
dataset and refuses to go on unless its test cells hash to the recorded digest, then predicts
those cells with every checkpoint named in the manifest, each by its own family's recipe
(`families`; scGPT draws tokens as the candidate's own test pass did). Family-blind: one
label per cell per model comes out. Writes into output_dir:

- `predictions.json` (trainers/scoring.py write_predictions): {"cells": [row indices],
  "label_names": [...], "pred": {model name: [label codes, -1 for a class the dataset lacks]}},
  and no labels: the host scores them against the truth it rebuilds itself;
- `result.json`: status and reason as trainers.entrypoint writes them, the split summary,
  and per model its label names, or why it could not predict (`not_a_classifier`).

With `baseline: true` the logistic-regression baseline the trainer reports is refitted on
the split's train cells and predicts the same cells, as model "baseline".

The host rebuilds the split and its labels, refits the baseline and computes every metric
and the bootstrap (runner/jobs/truth.py, decide.py); nothing here decides, and nothing
written here counts as the truth. Exit codes are trainers.entrypoint's (2: invalid manifest,
e.g. `split.test_sha256`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from trainers import family
from trainers.entrypoint import _raw_output_dir, _write_result, failure
from trainers.family import CheckpointError
from trainers.manifest import (
    EXIT_INVALID,
    EXIT_OK,
    EvalManifest,
    ManifestError,
    load_eval_manifest,
)
from trainers.runtime import choose_device, choose_precision
from trainers.scoring import as_dataset_codes, write_predictions


def evaluate(m: EvalManifest, state: dict) -> dict:
    from trainers.data.load import load, split_cells

    out = Path(m.output_dir)
    device = choose_device(m, state)
    precision = choose_precision(m.precision, device)
    options = {"seed": m.seed, "max_seq_len": m.max_seq_len, "precision": precision,
               "eval_batch_size": m.eval_batch_size, "include_zero_gene": m.include_zero_gene,
               "device": device, "num_threads": m.num_threads or len(os.sched_getaffinity(0))}

    d = m.dataset
    data = load(d.path, d.format, d.label_key, d.gene_key, d.use_raw, name=d.name)
    if data.labels is None:
        raise ManifestError("dataset.label_key", f"dataset {d.path} has no labels")
    s = m.split
    split = split_cells(data.n_cells, data.labels, s.val_fraction, s.test_fraction, s.seed)
    state["split"] = split.summary()
    if state["split"]["sha256"]["test"] != s.test_sha256:
        raise ManifestError("split.test_sha256", "the rebuilt test cells hash to "
                            f"{state['split']['sha256']['test'][:12]}..., not the candidate's "
                            f"{s.test_sha256[:12]}...: not the cells it was tested on")
    cells = split.test
    print(f"evaluating {len(m.models)} model(s) on {len(cells)} held-out cells, device "
          f"{device}, precision {precision}", flush=True)

    preds, models = {}, {}
    for name, folder in m.models.items():
        t0 = time.perf_counter()
        fam = family.get(m.families.get(name, "scgpt"))
        try:
            head, names = fam.load_recipe().predict(folder, data, cells, options)
        except CheckpointError as e:
            models[name] = {"ok": False, "why": "not_a_classifier", "message": str(e),
                            "family": fam.name}
            print(f"{name}: skipped: {e}", flush=True)
            continue
        codes = as_dataset_codes(head, names, data.label_names)
        preds[name] = codes.tolist()
        acc = float((codes == data.labels[cells]).mean())
        models[name] = {"ok": True, "label_names": list(names), "family": fam.name,
                        "seconds": time.perf_counter() - t0}
        print(f"{name}: accuracy {acc:.4f} ({time.perf_counter() - t0:.1f}s)", flush=True)

    if m.baseline:  # the trainer's own baseline, refitted on the same train cells
        t0 = time.perf_counter()
        from trainers.data.load import baseline_features
        from trainers.scoring import logistic_regression_predict
        preds["baseline"] = logistic_regression_predict(
            baseline_features(data), data.labels, split.train, cells, m.seed).tolist()
        models["baseline"] = {"ok": True, "label_names": data.label_names,
                              "seconds": time.perf_counter() - t0}
        print(f"baseline: logistic regression ({time.perf_counter() - t0:.1f}s)", flush=True)

    write_predictions(out, cells, preds, data.label_names)
    return {"models": models, "n_cells": len(cells), "precision": precision}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m trainers.gate_eval MANIFEST.json", file=sys.stderr)
        return EXIT_INVALID
    t_start = time.perf_counter()
    out_dir = _raw_output_dir(argv[0])
    state: dict = {}
    base = {"status": "failed", "task": "evaluate_celltype", "split": {}, "models": {}}
    try:
        m = load_eval_manifest(argv[0])
        out_dir = Path(m.output_dir)
        result = evaluate(m, state)
        code, status = EXIT_OK, {"status": "ok", "reason": "ok", "message": "ok"}
    except Exception as e:  # noqa: BLE001 -- every failure still leaves a result.json
        code, result, status = failure(e)
    final = {**base, **{k: state[k] for k in ("device", "split") if k in state}, **result,
             **status, "timings": {"total_s": time.perf_counter() - t_start}}
    _write_result(out_dir, final)
    print(f"result: {final['status']} ({final['reason']})", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
