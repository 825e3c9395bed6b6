"""Family-blind measures of per-cell predictions: accuracy, macro-F1 and per-class F1, and
the logistic-regression baseline refitted on a split's train cells.

Never torch: the host measures every recorded test metric and the gate's comparisons with
these, from a job's per-cell predictions and its own truth (runner/jobs/truth.py); the
trainer uses them for the claims it prints. The metrics are numpy only (sklearn's formulas,
to the last float): neither a job nor the host imports scikit-learn to score. Only the
baseline's fit does, and only the host fits it (a job's claims leave it out).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

BASELINE_MODEL = ("sklearn StandardScaler + LogisticRegression(max_iter=1000), log1p CP10k "
                  "features")
PREDICTIONS = "predictions.json"  # what a job hands back to be scored, in its output folder


def write_predictions(out: Path, cells: np.ndarray, pred: dict[str, np.ndarray],
                      label_names: list[str]) -> Path:
    """`{"cells": [row indices], "label_names": [...], "pred": {model: [label codes]}}`, the
    codes indexing label_names (-1: a class the dataset lacks). No labels: the host has them."""
    path = Path(out) / PREDICTIONS
    path.write_text(json.dumps({"cells": np.asarray(cells).tolist(),
                                "label_names": list(label_names),
                                "pred": {k: np.asarray(v).tolist() for k, v in pred.items()}}))
    return path


def as_dataset_codes(head_index: np.ndarray, head_names: list[str],
                     dataset_names: list[str]) -> np.ndarray:
    """A model's outputs (indices into its own label names) as the dataset's label codes; a
    class the dataset lacks becomes -1 (never equal to a true label)."""
    code = {name: i for i, name in enumerate(dataset_names)}
    table = np.array([code.get(name, -1) for name in head_names], dtype=np.int64)
    return table[np.asarray(head_index, dtype=np.int64)]


def classification_metrics(true: np.ndarray, pred: np.ndarray, label_names: list[str],
                           prefix: str) -> tuple[dict[str, float], dict[str, float]]:
    """Accuracy and macro-F1 under `prefix`, plus per-class F1 keyed by label name. `true`
    holds codes in [0, k); a `pred` code outside [0, k) is a class the dataset lacks (always
    wrong). The same floats as sklearn's accuracy_score and f1_score(labels=range(k),
    zero_division=0): F1 = 2 tp / (n_true + n_pred), 0 for a class neither true nor
    predicted."""
    true, pred = np.asarray(true, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    k = len(label_names)

    def counts(codes: np.ndarray) -> np.ndarray:
        return np.bincount(codes, minlength=k)[:k].astype(float)

    hit = true == pred
    true_plus_pred = counts(true) + counts(pred[(pred >= 0) & (pred < k)])
    per_class = np.zeros(k)
    np.divide(2 * counts(true[hit]), true_plus_pred, out=per_class, where=true_plus_pred > 0)
    metrics = {f"{prefix}accuracy": float(hit.mean()) if len(hit) else 0.0,
               f"{prefix}macro_f1": float(per_class.mean()) if k else 0.0}
    return metrics, {name: float(f) for name, f in zip(label_names, per_class)}


# Logistic regression fits on one BLAS thread: the same split gives the same model on every
# host, whatever its cores (and on CBMC one thread is faster: 0.22 s against 0.52 s with two).
FIT_THREADS = 1


def logistic_regression_predict(features: np.ndarray, labels: np.ndarray, train: np.ndarray,
                                test: np.ndarray, seed: int) -> np.ndarray:
    """scikit-learn LogisticRegression on standardised log1p CP10k features, fitted on `train`,
    predicting `test`. Standardising makes lbfgs converge in a few hundred steps; unscaled, it
    stops at max_iter somewhere that depends on the BLAS thread count (CBMC seed 1: 0.9385
    with one thread, 0.9362 with two), and the same split would not give the same baseline.
    Even converged, lbfgs's path follows BLAS's reductions, which depend on the thread count
    (CBMC seed 0 on an AMD EPYC: macro-F1 0.9095 with one thread, 0.9110 with two): the fit
    runs on one (`FIT_THREADS`), in the jail and on the host alike."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    with threadpool_limits(FIT_THREADS):
        clf.fit(features[train], labels[train])
        return clf.predict(features[test])


def test_claims(out: Path, data, split, pred: np.ndarray, seed: int,
                note: str = "") -> dict:
    """A fine-tune's hand-back for its held-out cells, the same for every family: writes
    predictions.json (what the host scores against its own truth), and returns this job's
    claims for its log: {"metrics": test accuracy and macro-F1, "per_class_f1", "baseline":
    None}. The host measures them itself, beside the logistic-regression baseline that it
    alone fits (runner/jobs/truth.py): a job spends none of its time on the baseline.
    `note` goes into the printed line. (`seed`: kept for the families' calls.)"""
    write_predictions(out, split.test, {"candidate": pred}, data.label_names)
    metrics, per_class = classification_metrics(data.labels[split.test], pred,
                                                data.label_names, "test_")
    print(f"test accuracy {metrics['test_accuracy']:.4f} macro-F1 "
          f"{metrics['test_macro_f1']:.4f}{note} (the host measures them, and the "
          "logistic-regression baseline, on its own held-out truth)", flush=True)
    return {"metrics": metrics, "per_class_f1": per_class, "baseline": None}


def metric_key(name: str) -> str:
    """A label name as an MLflow metric key fragment (letters, digits, _ - . / space)."""
    return re.sub(r"[^A-Za-z0-9_./ -]", "_", name)
