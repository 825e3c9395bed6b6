"""The linear family's recipe, run in the jail: data -> split -> fit -> val -> test ->
predictions -> checkpoint (trainers/linear/checkpoint.py). scikit-learn and numpy only.

From scratch the defaults fit exactly the host's baseline (trainers/scoring.py), so the
version's test predictions are the baseline's. With a parent linear checkpoint, lbfgs starts
from the parent's coefficients for the genes and classes both have (zero elsewhere): the
problem is convex, so the start shortens the fit but does not change where it ends (up to
`tol`); the scaler is refitted on the new train cells.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from trainers import scoring
from trainers.data.load import baseline_features, load, split_cells
from trainers.family import CheckpointError, gene_overlap
from trainers.linear import checkpoint
from trainers.linear.family import FAMILY
from trainers.manifest import ManifestError, resolve_model, sha256_file
from trainers.metrics_stream import append_metrics
from trainers.runtime import phase


def train(m, state: dict) -> dict:
    parent = _load_parent(m.parent.checkpoint_dir) if m.parent is not None else None
    arch = resolve_model(FAMILY, m.model, parent.architecture if parent else None)
    out, t = Path(m.output_dir), m.training
    state["device"] = "cpu"

    d = m.dataset
    data = load(d.path, d.format, d.label_key, d.gene_key, d.use_raw, name=d.name)
    if data.labels is None:
        raise ManifestError("dataset.label_key", f"dataset {d.path} has no labels to fit")
    split_seed = m.seed if t.split_seed is None else t.split_seed
    split = split_cells(data.n_cells, data.labels, t.val_fraction, t.test_fraction, split_seed)
    state["split"] = split.summary()
    state["genes"] = {"in_vocab": len(data.genes), "dropped": 0, "vocab_size": len(data.genes)}
    state["metrics_path"] = m.metrics_path
    y = data.labels
    classes = np.unique(y[split.train])  # dataset codes, in the order of the model's rows
    names = [data.label_names[c] for c in classes]
    phase("data_ready", state)
    print(f"finetune_celltype: {len(split.train)} train / {len(split.val)} val / "
          f"{len(split.test)} test cells, {len(data.genes)} genes, {len(classes)} classes, "
          f"logistic regression (C={t.C}), {scoring.FIT_THREADS} BLAS thread", flush=True)

    # scikit-learn after the data: its import (scipy.stats, pandas) is the job's slowest part
    # before the fit, and a dataset that cannot be used is refused without paying for it
    import sklearn
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    phase("imports_done", state)
    features = baseline_features(data)  # the baseline's own features, every cell
    scaler = StandardScaler() if arch["standardize"] else None
    clf = LogisticRegression(C=t.C, max_iter=t.max_iter, tol=t.tol, random_state=m.seed,
                             class_weight=None if t.class_weight == "none" else t.class_weight,
                             warm_start=parent is not None)
    warm = _warm_start(clf, parent, data.genes, names) if parent is not None else None
    if warm and warm["warm_started"]:
        print(f"warm start from the parent: {warm['classes_matched']} of {warm['classes']} "
              "classes", flush=True)

    t0 = time.perf_counter()
    phase("first_step", state)  # lbfgs's fit is the one step
    with threadpool_limits(scoring.FIT_THREADS):  # the fit is the same on every host
        z_train = features[split.train]
        if scaler is not None:
            z_train = scaler.fit_transform(z_train)
        clf.fit(z_train, y[split.train])
    train_s = time.perf_counter() - t0
    model = checkpoint.LinearModel(
        genes=list(data.genes), label_names=names, architecture=arch,
        dtype=str(clf.coef_.dtype),
        mean=None if scaler is None else scaler.mean_.astype(clf.coef_.dtype),
        scale=None if scaler is None else scaler.scale_.astype(clf.coef_.dtype),
        coef=clf.coef_, intercept=clf.intercept_, doc={})

    # val and test through the checkpoint's own predictor: what a reload predicts
    def codes(cells):
        return classes[model.decide(features[cells])]

    metrics = {"n_iter": float(clf.n_iter_[0]),
               "converged": float(clf.n_iter_[0] < t.max_iter),
               "train_loss": float(log_loss(y[split.train], clf.predict_proba(z_train),
                                            labels=classes))}
    val_metrics, _ = scoring.classification_metrics(y[split.val], codes(split.val),
                                                    data.label_names, "val_")
    z_val = features[split.val] if scaler is None else scaler.transform(features[split.val])
    metrics.update(val_metrics, val_loss=float(log_loss(y[split.val], clf.predict_proba(z_val),
                                                        labels=classes)))
    append_metrics(m.metrics_path, metrics, step=0)

    t0 = time.perf_counter()
    pred = codes(split.test)
    test_s = time.perf_counter() - t0
    claims = scoring.test_claims(out, data, split, pred, m.seed,
                                 note=f" ({int(metrics['n_iter'])} lbfgs iterations)")
    per_class = claims["per_class_f1"]
    metrics.update(claims["metrics"])
    bad = [k for k, v in metrics.items() if not np.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite metrics: {', '.join(bad)}")
    append_metrics(m.metrics_path, {k: v for k, v in metrics.items()
                                    if not k.startswith(("train_", "val_"))})
    append_metrics(m.metrics_path, {f"test_f1/{scoring.metric_key(k)}": v
                                    for k, v in per_class.items()})

    training = dataclasses.asdict(t)
    path = checkpoint.write(out / "checkpoint", {
        "architecture": arch, "genes": model.genes, "label_names": names,
        "dtype": model.dtype,
        "scaler": None if scaler is None else {"mean": scaler.mean_.tolist(),
                                               "scale": scaler.scale_.tolist()},
        "coef": clf.coef_.astype(np.float64).tolist(),
        "intercept": clf.intercept_.astype(np.float64).tolist(),
        "training": training, "seed": m.seed, "sklearn_version": sklearn.__version__,
        "n_train_cells": len(split.train), "dataset": d.name or data.name})
    return {
        "metrics": metrics,
        "history": [{"epoch": 0, **{k: v for k, v in metrics.items()
                                    if k.startswith(("train_", "val_"))}}],
        "checkpoint": {"dir": "checkpoint", "files": {path.name: sha256_file(path)}},
        "model": {"n_params": int(clf.coef_.size + clf.intercept_.size),
                  "config": {**arch, **training, "classes": len(names)}},
        "per_class_f1": per_class, "artifacts": [],
        "test_cells": len(split.test),
        "parent": None if parent is None else {"checkpoint_dir": m.parent.checkpoint_dir,
                                               "warm_start": warm},
        "timings": {"train_s": train_s, "test_s": test_s},
    }


def predict(folder, data, cells, options=None) -> tuple[np.ndarray, list[str]]:
    """Indices into the checkpoint's label names for `cells` of `data`, and those names.
    Genes the dataset lacks count 0. `options` (the gate's draws) do not apply: it is exact."""
    model = checkpoint.load(folder)
    return model.predict(data, cells), list(model.label_names)


def _load_parent(folder: str) -> checkpoint.LinearModel:
    """The parent's model.json, checked before any data is read; the error names its file as
    a manifest path (`parent.model.json.coef`)."""
    try:
        return checkpoint.load(folder)
    except CheckpointError as e:
        raise CheckpointError(f"parent checkpoint: {e}", f"parent.{e.field}") from None


def _warm_start(clf, parent: checkpoint.LinearModel, genes: list[str],
                names: list[str]) -> dict:
    """Set clf.coef_/intercept_ from the parent's rows and columns that the new fit shares
    (the rest 0); lbfgs starts there. Returns what was carried over."""
    overlap = gene_overlap(parent.genes, genes)
    binary = len(names) == 2
    if binary != (len(parent.label_names) == 2) or (binary and names != parent.label_names):
        shared = []  # one-row and per-class coefficients do not mix
    else:
        shared = [n for n in names if n in parent.label_names]
    report = {"genes": overlap, "classes_matched": len(shared), "classes": len(names),
              "warm_started": bool(shared and overlap["matched"])}
    if not report["warm_started"]:
        return report
    rows = 1 if binary else len(names)
    coef = np.zeros((rows, len(genes)), dtype=np.float64)
    intercept = np.zeros(rows, dtype=np.float64)
    column = {g: i for i, g in enumerate(parent.genes)}
    new_cols = [i for i, g in enumerate(genes) if g in column]
    old_cols = [column[genes[i]] for i in new_cols]
    for name in (names[:1] if binary else shared):
        new, old = names.index(name), parent.label_names.index(name)
        coef[new, new_cols] = parent.coef[old, old_cols]
        intercept[new] = parent.intercept[old]
    clf.coef_, clf.intercept_ = coef, intercept
    return report
