"""The held-out truth, measured on the host.

A job's per-cell predictions are claims. What they are scored against is rebuilt here, with
the host's own code, from the registered dataset the host fetched and checked: the split
(the seed and fractions recorded with the version; for a gate, checked against the split
digest the candidate was tested on), the labels of the held-out cells, and the
logistic-regression baseline refitted on the split's train cells. Nothing a job writes (its
labels, its split, its metrics, its baseline) changes what counts as correct.

`rebuild` gives the `HeldOut` truth; `read_predictions` reads a job's predictions.json
(trainers/scoring.py write_predictions) against it; `measure` scores one model's predictions
as the recorded test metrics. numpy and scipy, loaded on first use (a dry run never gets
here); scikit-learn only to fit the baseline.

The baseline is fitted once per (dataset content, its reading, split, seed, fitting code) and
its predictions kept in the host's cache (FORGE_CACHE_DIR/baselines, never bound into a jail):
a sweep's jobs on one split, and a gate after them, share one fit (jobs that end together
take the key's file lock: one fits, the others read its fit). A cached file that does not
read back as the held-out cells' codes is refitted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from runner import settings
from runner.errors import EvaluationFailed, GateRefused, TrainingFailed
from runner.jobs.handback import NotPlainFile, nesting_depth, read_job_file

if TYPE_CHECKING:
    import numpy as np

MAX_PREDICTIONS_BYTES = 256 * 1024**2
BASELINE = "baseline"  # the host's logistic-regression baseline, as a model name and a role
BASELINE_CACHE = "baselines"  # under the cache dir: <key>.npy, the baseline's test codes


@dataclass(frozen=True)
class HeldOut:
    cells: np.ndarray  # row indices of the held-out (test) cells, sorted
    true: np.ndarray  # their label codes, in [0, k)
    label_names: list[str]
    split: dict  # the split's summary: seed, counts, sha256 per part
    baseline: np.ndarray  # the baseline's predicted codes for the held-out cells
    seed: int


@dataclass(frozen=True)
class Predictions:
    true: np.ndarray  # the host's label codes of the held-out cells, in [0, k)
    pred: dict[str, np.ndarray]  # model name -> codes in [0, k]; k: outside the label set
    label_names: list[str]

    @property
    def n_classes(self) -> int:
        return len(self.label_names)


def rebuild(path: Path, dataset: dict, *, seed: int, split_seed: int | None,
            val_fraction: float, test_fraction: float, test_sha256: str | None = None,
            content_hash: str | None = None) -> HeldOut:
    """The held-out truth of `dataset` (its conf: format, label_key, gene_key, use_raw, source)
    read from `path` (what the job's loader reads, job.dataset_input). With `test_sha256`, the
    rebuilt test cells must hash to it (GateRefused `split_mismatch` otherwise).
    `content_hash`: the registered dataset's sha256, which `path` was checked against; with
    it the baseline's fit is cached."""
    import numpy as np

    from trainers.data.load import DatasetError, load, split_cells

    try:
        data = load(str(path), dataset["format"], dataset.get("label_key"),
                    dataset.get("gene_key"), dataset.get("use_raw"),
                    name=dataset.get("source") or "")
    except DatasetError as exc:
        raise GateRefused(f"the host cannot read the dataset to rebuild the held-out truth: "
                          f"{exc}", reason="dataset_unreadable", field="dataset",
                          fix="check the registered dataset's file and label column") from exc
    if data.labels is None:
        raise GateRefused("the dataset has no labels: there is no held-out truth to score "
                          "against", reason="not_gateable", field="dataset.label_key",
                          fix="fine-tune and gate on a dataset with a label column")
    split = split_cells(data.n_cells, data.labels, val_fraction, test_fraction,
                        seed if split_seed is None else split_seed)
    summary = split.summary()
    if test_sha256 is not None and summary["sha256"]["test"] != test_sha256:
        raise GateRefused(
            f"the candidate's held-out cells cannot be rebuilt: they hash to "
            f"{summary['sha256']['test'][:12]}... on the host, not the recorded "
            f"{test_sha256[:12]}...", reason="split_mismatch", field="candidate_artifact_id",
            fix="the dataset or the split code changed since it was trained; retrain it, "
                "then gate it")
    key = None if content_hash is None else _baseline_key(content_hash, dataset, summary, seed)
    n_cells, n_classes = len(split.test), len(data.label_names)
    baseline = _cached_baseline(key, n_cells, n_classes)
    if baseline is None:
        with _fitting(key):  # a parallel sweep's jobs end together: one fits, the rest read it
            baseline = _cached_baseline(key, n_cells, n_classes)
            if baseline is None:
                from trainers.data.load import baseline_features
                from trainers.scoring import logistic_regression_predict

                baseline = np.asarray(logistic_regression_predict(
                    baseline_features(data), data.labels, split.train, split.test, seed),
                    dtype=np.int64)
                _keep_baseline(key, baseline)
    return HeldOut(split.test, data.labels[split.test], list(data.label_names), summary,
                   baseline, seed)


def _baseline_key(content_hash: str, dataset: dict, split: dict, seed: int) -> str:
    """What the baseline's predictions depend on: the data, how it is read, the split's train
    and test cells, the fit's seed, and the code and libraries that read, featurise and fit."""
    import trainers.data.load
    import trainers.scoring

    code = hashlib.sha256()
    for module in (trainers.data.load, trainers.scoring):
        code.update(Path(module.__file__).read_bytes())
    versions = {name: metadata.version(name) for name in ("numpy", "scipy", "scikit-learn")}
    doc = {"content": content_hash, "seed": seed, "code": code.hexdigest(),
           "versions": versions, "train": split["sha256"]["train"],
           "test": split["sha256"]["test"],
           "reading": {k: dataset.get(k) for k in ("format", "label_key", "gene_key",
                                                   "use_raw")}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _cached_baseline(key: str | None, n_cells: int, n_classes: int):
    """The kept predictions under `key`, if they read back as `n_cells` codes in range."""
    import numpy as np

    if key is None:
        return None
    try:
        codes = np.load(settings.cache_dir() / BASELINE_CACHE / f"{key}.npy",
                        allow_pickle=False)
    except (OSError, ValueError, EOFError):  # missing, or not a plain .npy array
        return None
    if codes.dtype != np.int64 or codes.shape != (n_cells,) or (
            n_cells and (codes.min() < 0 or codes.max() >= n_classes)):
        return None
    return codes


@contextmanager
def _fitting(key: str | None):
    """Hold the cache key's lock (FORGE_CACHE_DIR/baselines/<key>.lock) while fitting: other
    host processes that missed the same key wait for the fit, then read it. Released when the
    holder closes the file or dies; a cache that cannot be locked is no cache (fit anyway)."""
    if key is None:
        yield
        return
    folder = settings.cache_dir() / BASELINE_CACHE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"{key}.lock", "a")  # noqa: SIM115 - held across the fit
    except OSError:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _keep_baseline(key: str | None, codes) -> None:
    """Write the predictions under `key`, atomically; a cache that cannot be written is no
    cache (the next job fits again)."""
    import numpy as np

    if key is None:
        return
    folder = settings.cache_dir() / BASELINE_CACHE
    part = folder / f"{key}.{os.getpid()}.part"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(part, "wb") as f:
            np.save(f, codes, allow_pickle=False)
        os.replace(part, folder / f"{key}.npy")
    except OSError:
        part.unlink(missing_ok=True)


def read_predictions(out: Path, held: HeldOut, error=EvaluationFailed) -> Predictions:
    """The job's predictions.json, checked against the host's truth: no link followed, size
    capped, the same cells in the same order and the same label names as the host's, every
    code in range. A model the job names `baseline` is dropped: the baseline is the host's.
    Anything else is `error` (field predictions.json; reason `partial_test` for fewer or more
    cells than held out, else `missing_predictions`)."""
    import numpy as np

    def bad(message: str, reason: str = "missing_predictions"):
        return error(f"predictions.json {message}", reason=reason, field="predictions.json",
                     fix="the job must write predictions.json as trainers/scoring.py "
                         "write_predictions documents; read its job log")

    try:
        data, size = read_job_file(Path(out) / "predictions.json",
                                   limit=MAX_PREDICTIONS_BYTES + 1)
    except FileNotFoundError:
        raise bad("is missing") from None
    except NotPlainFile as exc:
        raise bad(str(exc)) from None
    if size > MAX_PREDICTIONS_BYTES:
        raise bad(f"is {size} bytes, over the {MAX_PREDICTIONS_BYTES} allowed")
    if nesting_depth(data) > 4:
        raise bad("nests deeper than its format")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise bad(f"is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("pred"), dict):
        raise bad("is not an object with pred")
    if doc.get("label_names") != held.label_names:
        raise bad("names other labels, or in another order, than the dataset's on the host")
    k = len(held.label_names)
    cells = _codes(doc.get("cells"), 0, np.iinfo(np.int64).max, "cells", bad)
    if len(cells) != len(held.cells):  # every held-out cell, or no test metric at all
        raise bad(f"covers {len(cells)} cells, not the {len(held.cells)} held-out cells",
                  reason="partial_test")
    if not np.array_equal(cells, held.cells):
        raise bad(f"is about {len(cells)} cells that are not the held-out cells the host "
                  "rebuilt")
    pred = {}
    for name, codes in doc["pred"].items():
        if name == BASELINE:
            continue
        array = _codes(codes, -1, k - 1, f"pred.{str(name)[:40]}", bad)
        if len(array) != len(cells):
            raise bad(f"pred.{str(name)[:40]} has {len(array)} cells, not {len(cells)}")
        pred[str(name)] = np.where(array < 0, k, array)  # outside the label set: class k
    pred[BASELINE] = held.baseline
    return Predictions(held.true, pred, list(held.label_names))


def _codes(values, low: int, high: int, where: str, bad) -> np.ndarray:
    import numpy as np

    if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise bad(f"{where} is not a list of integers")
    array = np.asarray(values, dtype=np.int64)
    if len(array) and (array.min() < low or array.max() > high):
        raise bad(f"{where} holds codes outside [{low}, {high}]")
    return array


def measure(out: Path, held: HeldOut) -> dict:
    """A training job's test metrics, measured: its candidate's predictions of every
    held-out cell scored against the host's labels, beside the host's baseline. Returns
    {"metrics": {test_accuracy, test_macro_f1, baseline_test_accuracy, baseline_test_macro_f1},
    "per_class_f1", "baseline": {model, metrics, per_class_f1}, "test_cells", "split"}."""
    from trainers.scoring import BASELINE_MODEL, classification_metrics

    preds = read_predictions(out, held, error=TrainingFailed)
    if "candidate" not in preds.pred:
        raise TrainingFailed("predictions.json has no predictions of the candidate",
                             reason="missing_predictions", field="predictions.json",
                             fix="the trainer must predict every held-out cell; read its "
                                 "job log")
    # code k (outside the label set) matches no true label: it counts as wrong
    own, per_class = classification_metrics(held.true, preds.pred["candidate"],
                                            held.label_names, "test_")
    base, base_per_class = classification_metrics(held.true, held.baseline, held.label_names,
                                                  "baseline_test_")
    return {"metrics": {**own, **base}, "per_class_f1": per_class,
            "baseline": {"model": BASELINE_MODEL, "metrics": base,
                         "per_class_f1": base_per_class},
            "test_cells": len(held.cells), "split": held.split}
