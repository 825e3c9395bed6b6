"""A linear checkpoint: one JSON file, `model.json`, read by the host without executing
anything (no pickle, no joblib), and the numpy predictor that reads it.

    {"format": "forge-linear", "format_version": 1,
     "architecture": {"features": "log1p_cp10k", "standardize": true},
     "genes": [...],                      # the model's inputs, in column order
     "label_names": [...],                # its classes, in row order
     "dtype": "float32",                  # the arithmetic scikit-learn fitted and predicts in
     "scaler": {"mean": [...], "scale": [...]},   # null when standardize is false
     "coef": [[...], ...],                # classes x genes (one row for two classes)
     "intercept": [...],
     "training": {...}, "seed": 0, "sklearn_version": "1.9.1", "n_train_cells": 6895}

The numbers are float64 JSON numbers: a float32 value round-trips exactly, so the predictor
repeats scikit-learn's own arithmetic (StandardScaler.transform then decision_function, in
`dtype`) and gives its labels.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from trainers.family import CheckpointError, Problem, read_json
from trainers.linear.settings import FEATURES

FILE = "model.json"
FORMAT, FORMAT_VERSION = "forge-linear", 1
DTYPES = ("float32", "float64")


def describe(doc: object) -> tuple[dict, list[Problem]]:
    """model.json's architecture and what is wrong with it (plain Python: the host's dry run
    and registration read this)."""
    problems: list[Problem] = []

    def bad(key: str, message: str, reason: str = "invalid_checkpoint") -> None:
        problems.append(Problem(reason, f"{FILE}.{key}", message))

    if not isinstance(doc, dict):
        return {}, [Problem("invalid_checkpoint", FILE, "must be a JSON object")]
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        bad("format", f"is {doc.get('format')!r} version {doc.get('format_version')!r}, not "
            f"{FORMAT!r} version {FORMAT_VERSION}", "unsupported_checkpoint")
        return {}, problems
    arch = doc.get("architecture")
    arch = arch if isinstance(arch, dict) else {}
    if arch.get("features") not in FEATURES:
        bad("architecture.features", f"is {arch.get('features')!r}, not one of {FEATURES}",
            "unsupported_checkpoint")
    if not isinstance(arch.get("standardize"), bool):
        bad("architecture.standardize", "must be true or false")
    if doc.get("dtype") not in DTYPES:
        bad("dtype", f"must be one of {DTYPES}")
    genes, labels = doc.get("genes"), doc.get("label_names")
    for key, names, least in (("genes", genes, 1), ("label_names", labels, 2)):
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)
                and len(set(names)) == len(names) >= least):
            bad(key, f"must be a list of at least {least} distinct strings")
    if problems:
        return arch, problems
    rows = 1 if len(labels) == 2 else len(labels)
    coef = doc.get("coef")
    if not (isinstance(coef, list) and len(coef) == rows
            and all(_numbers(row, len(genes)) for row in coef)):
        bad("coef", f"must be {rows} rows of {len(genes)} finite numbers")
    if not _numbers(doc.get("intercept"), rows):
        bad("intercept", f"must be {rows} finite numbers")
    scaler = doc.get("scaler")
    if arch["standardize"]:
        if not (isinstance(scaler, dict) and _numbers(scaler.get("mean"), len(genes))
                and _numbers(scaler.get("scale"), len(genes))
                and all(s > 0 for s in scaler["scale"])):
            bad("scaler", f"must hold mean and scale (> 0), {len(genes)} numbers each")
    elif scaler is not None:
        bad("scaler", "must be null when architecture.standardize is false")
    return {"features": arch["features"], "standardize": arch["standardize"]}, problems


def _numbers(values: object, n: int) -> bool:
    return (isinstance(values, list) and len(values) == n
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in values))


@dataclass
class LinearModel:
    """A checkpoint's arrays, ready to predict."""
    genes: list[str]
    label_names: list[str]
    architecture: dict
    dtype: str
    mean: object  # np.ndarray (dtype) or None
    scale: object
    coef: object  # np.ndarray, dtype, classes (or 1) x genes
    intercept: object
    doc: dict  # the rest of model.json (training settings, versions)

    def decide(self, features):
        """Label indices (into label_names) for rows of features in `genes` order: the
        scaler's transform and the classifier's decision as scikit-learn computes them."""
        import numpy as np

        z = np.array(features, dtype=self.dtype)  # a copy: transformed in place, as sklearn does
        if self.mean is not None:
            z -= self.mean
            z /= self.scale
        scores = z @ self.coef.T + self.intercept
        if scores.shape[1] == 1:  # two classes: the row scores the second one
            return (scores[:, 0] > 0).astype(np.int64)
        return scores.argmax(axis=1).astype(np.int64)

    def features(self, data, cells):
        """The cells' log1p CP10k features in the model's gene order; genes the dataset
        lacks count 0 (the per-cell scaling uses every gene the dataset has)."""
        import numpy as np

        from trainers.data.load import CellData, baseline_features

        rows = CellData(data.X[np.asarray(cells)], data.genes, None, [], data.value_kind)
        full = baseline_features(rows)
        where: dict[str, int] = {}
        for i, gene in enumerate(data.genes):
            where.setdefault(gene, i)
        cols = np.array([where.get(g, -1) for g in self.genes], dtype=np.int64)
        out = np.zeros((full.shape[0], len(self.genes)), dtype=np.float32)
        out[:, cols >= 0] = full[:, cols[cols >= 0]]
        return out

    def predict(self, data, cells):
        return self.decide(self.features(data, cells))


def load(folder: str | Path) -> LinearModel:
    """model.json as arrays; CheckpointError (field: the key at fault) when it is not usable."""
    import numpy as np

    doc, _ = read_json(Path(folder) / FILE)
    arch, problems = describe(doc)
    if problems:
        raise CheckpointError(problems[0].message, problems[0].field)
    dtype = doc["dtype"]
    scaler = doc["scaler"]
    return LinearModel(
        genes=doc["genes"], label_names=doc["label_names"], architecture=arch, dtype=dtype,
        # StandardScaler.transform casts its float64 statistics to the data's dtype first
        mean=None if scaler is None else np.asarray(scaler["mean"], dtype=dtype),
        scale=None if scaler is None else np.asarray(scaler["scale"], dtype=dtype),
        coef=np.asarray(doc["coef"], dtype=dtype),
        intercept=np.asarray(doc["intercept"], dtype=dtype),
        doc={k: v for k, v in doc.items() if k not in ("coef", "intercept", "scaler", "genes")})


def write(folder: str | Path, doc: dict) -> Path:
    """model.json into `folder` (created); `doc` as described above, arrays as lists."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE
    path.write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **doc}))
    return path
