"""trainers/scoring.py's metrics: the same floats as scikit-learn's, without importing it (the
host and every job score with them), and a job's claims that leave the baseline to the host."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from trainers import scoring
from trainers.scoring import PREDICTIONS, classification_metrics

NAMES = ["B", "CD4 T", "CD8 T", "NK", "Mono", "DC"]


@pytest.mark.parametrize("seed", range(5))
def test_metrics_are_sklearns_to_the_last_float(seed):
    """Random predictions with absent classes and codes outside the label set (-1 from
    as_dataset_codes, k from the host's truth): exactly sklearn's accuracy and F1."""
    rng = np.random.default_rng(seed)
    k = len(NAMES)
    true = rng.integers(0, k - 1, 500)  # the last class never true
    pred = np.where(rng.random(500) < 0.7, true, rng.integers(-1, k + 1, 500))
    metrics, per_class = classification_metrics(true, pred, NAMES, "test_")
    labels = np.arange(k)
    assert metrics["test_accuracy"] == accuracy_score(true, pred)
    assert metrics["test_macro_f1"] == f1_score(true, pred, labels=labels, average="macro",
                                                zero_division=0)
    assert list(per_class.values()) == list(f1_score(true, pred, labels=labels, average=None,
                                                     zero_division=0))
    assert list(per_class) == NAMES


@pytest.mark.parametrize("seed", range(3))
def test_the_figures_confusion_matrix_is_sklearns(seed):
    """The scGPT job's figure counts without scikit-learn (trainers/scgpt/evaluate.py): the
    same matrix, a predicted code outside the labels left out as sklearn leaves it."""
    from trainers.scgpt.evaluate import confusion_matrix as counted

    rng = np.random.default_rng(seed)
    k = len(NAMES)
    true = rng.integers(0, k - 1, 400)
    pred = np.where(rng.random(400) < 0.6, true, rng.integers(-1, k + 1, 400))
    expected = confusion_matrix(true, pred, labels=np.arange(k))
    assert counted(true, pred, k).tolist() == expected.tolist()


def test_a_class_neither_true_nor_predicted_scores_zero():
    metrics, per_class = classification_metrics(np.array([0, 0, 1]), np.array([0, 1, 1]),
                                                ["a", "b", "c"], "")
    assert per_class == {"a": pytest.approx(2 / 3), "b": pytest.approx(2 / 3), "c": 0.0}
    assert metrics == {"accuracy": pytest.approx(2 / 3), "macro_f1": pytest.approx(4 / 9)}


def test_scoring_and_claims_import_no_sklearn(tmp_path):
    """A job's claims and the host's measures cost no scikit-learn import (about 2 s each
    time, in every job and every host process); the claims hold no baseline."""
    code = (
        "import json, sys\n"
        "from types import SimpleNamespace\n"
        "import numpy as np\n"
        "from trainers.scoring import test_claims\n"
        "data = SimpleNamespace(labels=np.array([0, 1, 1, 0]), label_names=['a', 'b'])\n"
        "split = SimpleNamespace(test=np.array([1, 2, 3]))\n"
        f"claims = test_claims({str(tmp_path)!r}, data, split, np.array([1, 0, 0]), 0)\n"
        "print(json.dumps([claims, sorted(m for m in sys.modules if m.startswith('sklearn'))]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    claims, imported = json.loads(done.stdout.splitlines()[-1])
    assert imported == []
    assert claims["baseline"] is None
    assert claims["metrics"] == {"test_accuracy": pytest.approx(2 / 3),
                                 "test_macro_f1": pytest.approx(2 / 3)}


def test_claims_write_the_predictions_the_host_scores(tmp_path, capsys):
    data = SimpleNamespace(labels=np.array([0, 1, 1, 0, 2]), label_names=["a", "b", "c"])
    split = SimpleNamespace(test=np.array([0, 3, 4]))
    scoring.test_claims(tmp_path, data, split, np.array([0, 0, -1]), seed=0, note=" (note)")
    doc = json.loads((tmp_path / PREDICTIONS).read_text())
    assert doc == {"cells": [0, 3, 4], "label_names": ["a", "b", "c"],
                   "pred": {"candidate": [0, 0, -1]}}
    assert "macro-F1" in capsys.readouterr().out
