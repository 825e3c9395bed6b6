"""The centroid family's recipe, run in the jail: data -> split -> class means -> val/test
predictions -> centroids.json. With a parent, the means are fitted anew on the new train
cells (a mean has nothing to warm-start)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trainers import scoring
from trainers.data.load import CellData, baseline_features, load, split_cells
from trainers.manifest import ManifestError, sha256_file
from trainers.metrics_stream import append_metrics

from .family import FILE, FORMAT  # this folder is trainers/centroid/ once copied


def nearest(features: np.ndarray, means: np.ndarray, distance: str) -> np.ndarray:
    """Index of the nearest mean for each row."""
    if distance == "cosine":
        unit = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
        return (features @ unit.T).argmax(axis=1)
    d2 = (features ** 2).sum(1, keepdims=True) - 2 * features @ means.T + (means ** 2).sum(1)
    return d2.argmin(axis=1)


def train(m, state: dict) -> dict:
    d, t, out = m.dataset, m.training, Path(m.output_dir)
    data = load(d.path, d.format, d.label_key, d.gene_key, d.use_raw, name=d.name)
    if data.labels is None:
        raise ManifestError("dataset.label_key", f"dataset {d.path} has no labels")
    seed = m.seed if t.split_seed is None else t.split_seed
    split = split_cells(data.n_cells, data.labels, t.val_fraction, t.test_fraction, seed)
    state.update(device="cpu", split=split.summary(), metrics_path=m.metrics_path)
    features = baseline_features(data).astype(np.float64)
    classes = np.unique(data.labels[split.train])
    means = np.stack([features[split.train][data.labels[split.train] == c].mean(0)
                      for c in classes])

    metrics = {}
    for part, cells in (("val_", split.val), ("test_", split.test)):
        pred = classes[nearest(features[cells], means, t.distance)]
        metrics.update(scoring.classification_metrics(data.labels[cells], pred,
                                                      data.label_names, part)[0])
    scoring.write_predictions(out, split.test, {"candidate": pred}, data.label_names)
    append_metrics(m.metrics_path, metrics, step=0)

    folder = out / "checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE
    path.write_text(json.dumps({
        "format": FORMAT, "features": "log1p_cp10k", "distance": t.distance,
        "genes": list(data.genes), "label_names": [data.label_names[c] for c in classes],
        "centroids": means.tolist()}))
    return {"metrics": metrics, "history": [], "artifacts": [],
            "checkpoint": {"dir": "checkpoint", "files": {FILE: sha256_file(path)}},
            "model": {"n_params": int(means.size), "config": {"distance": t.distance}},
            "test_cells": len(split.test)}


def predict(folder, data: CellData, cells, options=None) -> tuple[np.ndarray, list[str]]:
    """Indices into the checkpoint's label names for `cells` of `data`; a gene the dataset
    lacks counts 0."""
    doc = json.loads((Path(folder) / FILE).read_text())
    rows = CellData(data.X[np.asarray(cells)], data.genes, None, [], data.value_kind)
    full = baseline_features(rows).astype(np.float64)
    where = {g: i for i, g in enumerate(data.genes)}
    X = np.zeros((len(cells), len(doc["genes"])))
    for j, gene in enumerate(doc["genes"]):
        if gene in where:
            X[:, j] = full[:, where[gene]]
    return nearest(X, np.asarray(doc["centroids"]), doc["distance"]), list(doc["label_names"])
