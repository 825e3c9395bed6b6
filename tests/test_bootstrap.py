"""The eval gate's paired bootstrap against the ecosystem's own tools: metrics against sklearn,
intervals against scipy.stats.bootstrap; then its edge cases and the figures it draws."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score

from runner.jobs.bootstrap import METRICS, metric_value, pair_seed, paired_bootstrap, per_class_f1
from runner.jobs.gate_report import plot_bootstrap, plot_per_class_f1

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def noisy_predictions(rng, true, n_classes, correct):
    """Right on about `correct` of the cells, a uniformly random class elsewhere."""
    return np.where(rng.random(len(true)) < correct, true, rng.integers(0, n_classes, len(true)))


def gate_sample(n_cells=2000, n_classes=8, seed=0):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, n_classes, n_cells)
    return (true, noisy_predictions(rng, true, n_classes, 0.85),
            noisy_predictions(rng, true, n_classes, 0.80))


def reference_score(metric, n_classes, true, pred, axis):
    """The metric written per class along `axis`, independently of the module under test, for
    scipy's vectorised bootstrap."""
    if metric == "accuracy":
        return (true == pred).mean(axis=axis)
    f1 = []
    for label in range(n_classes):
        is_true, is_pred = true == label, pred == label
        true_positives = (is_true & is_pred).sum(axis=axis)
        true_plus_pred = is_true.sum(axis=axis) + is_pred.sum(axis=axis)
        f1.append(np.where(true_plus_pred > 0, 2 * true_positives / np.maximum(true_plus_pred, 1),
                           0.0))
    return np.mean(f1, axis=0)


@pytest.mark.parametrize("n_classes", [2, 8, 20])
def test_metrics_equal_sklearn_on_random_predictions(n_classes):
    rng = np.random.default_rng(n_classes)
    for n_cells in (7, 300, 5000):
        true = rng.integers(0, n_classes, n_cells)
        pred = noisy_predictions(rng, true, n_classes, 0.6)
        labels = np.arange(n_classes)
        assert metric_value("macro_f1", true, pred, n_classes) == f1_score(
            true, pred, labels=labels, average="macro", zero_division=0)
        assert metric_value("accuracy", true, pred, n_classes) == accuracy_score(true, pred)
        np.testing.assert_array_equal(per_class_f1(true, pred, n_classes), f1_score(
            true, pred, labels=labels, average=None, zero_division=0))


def test_absent_classes_count_as_sklearn_counts_them():
    """Class 4 is neither true nor predicted, 5 never predicted, 3 never true: all F1 0, and
    all in the macro average's denominator."""
    n_classes = 6
    true = np.array([0, 1, 2, 5, 5, 0, 1, 2, 2, 0])
    pred = np.array([0, 1, 2, 0, 1, 3, 1, 2, 0, 3])
    labels = np.arange(n_classes)
    expected = f1_score(true, pred, labels=labels, average="macro", zero_division=0)
    assert metric_value("macro_f1", true, pred, n_classes) == expected
    f1 = per_class_f1(true, pred, n_classes)
    np.testing.assert_array_equal(f1, f1_score(true, pred, labels=labels, average=None,
                                               zero_division=0))
    assert f1[3] == f1[4] == f1[5] == 0


@pytest.mark.parametrize("metric", METRICS)
def test_paired_interval_matches_scipy(metric):
    n_classes, n_resamples = 8, 5000
    true, pred_a, pred_b = gate_sample(n_classes=n_classes)

    def delta(true, pred_a, pred_b, axis=-1):
        return (reference_score(metric, n_classes, true, pred_a, axis)
                - reference_score(metric, n_classes, true, pred_b, axis))

    ours = paired_bootstrap(true, pred_a, pred_b, metric=metric, n_classes=n_classes,
                            n_resamples=n_resamples, seed=1)
    theirs = stats.bootstrap((true, pred_a, pred_b), delta, paired=True, vectorized=True,
                             batch=500, method="percentile", n_resamples=n_resamples,
                             confidence_level=0.95, rng=np.random.default_rng(2))
    assert ours.delta == pytest.approx(delta(true, pred_a, pred_b), abs=1e-12)
    assert ours.low == pytest.approx(theirs.confidence_interval.low, abs=0.005)
    assert ours.high == pytest.approx(theirs.confidence_interval.high, abs=0.005)
    assert ours.low < ours.delta < ours.high
    assert ours.deltas.shape == (n_resamples,)


@pytest.mark.parametrize("metric", METRICS)
def test_identical_predictions_give_zero_delta_and_interval(metric):
    true, pred, _ = gate_sample()
    result = paired_bootstrap(true, pred, pred.copy(), metric=metric, n_classes=8, seed=3)
    assert result.delta == result.low == result.high == 0.0
    assert result.value_a == result.value_b


def test_same_seed_same_interval_and_a_plain_dict():
    true, pred_a, pred_b = gate_sample()
    first, again, other = (paired_bootstrap(true, pred_a, pred_b, metric="macro_f1",
                                            n_classes=8, n_resamples=200, seed=seed)
                           for seed in (7, 7, 8))
    assert (first.low, first.high) == (again.low, again.high)
    np.testing.assert_array_equal(first.deltas, again.deltas)
    assert not np.array_equal(first.deltas, other.deltas)
    as_dict = first.to_dict()
    assert "deltas" not in as_dict
    assert all(type(v) in (str, float, int) for v in as_dict.values())
    assert as_dict["n_resamples"] == 200 and as_dict["n_cells"] == 2000


def test_pair_seed_is_stable_and_ordered():
    seed = pair_seed(0, "candidate-1", "parent-0")
    assert seed == 1_928_123_857  # the same in every process: sha256, not salted hash()
    assert 0 <= seed < 2**32
    assert seed != pair_seed(0, "parent-0", "candidate-1")
    assert seed != pair_seed(1, "candidate-1", "parent-0")
    assert pair_seed(0, "a:b", "c") != pair_seed(0, "a", "b:c")


GOOD = np.array([0, 1, 2, 1])


@pytest.mark.parametrize("change, message", [
    ({"pred_b": GOOD[:3]}, "differ in length"),
    ({"true": GOOD.reshape(2, 2)}, "1-D integer"),
    ({"pred_a": GOOD.astype(float)}, "1-D integer"),
    ({"true": GOOD[:1], "pred_a": GOOD[:1], "pred_b": GOOD[:1]}, "at least 2 cells"),
    ({"pred_a": np.array([0, 1, 3, 1])}, r"outside \[0, 3\)"),
    ({"true": np.array([0, -1, 2, 1])}, r"outside \[0, 3\)"),
    ({"metric": "auroc"}, "unknown metric"),
    ({"n_classes": 0}, "n_classes"),
    ({"confidence": 1.0}, "confidence"),
    ({"confidence": 0}, "confidence"),
    ({"n_resamples": 0}, "n_resamples"),
])
def test_invalid_inputs_raise_value_error(change, message):
    arguments = {"true": GOOD, "pred_a": GOOD, "pred_b": GOOD, "metric": "accuracy",
                 "n_classes": 3, "seed": 0} | change
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(arguments.pop("true"), arguments.pop("pred_a"),
                         arguments.pop("pred_b"), **arguments)


def test_figures_are_png_files(tmp_path):
    true, pred_a, pred_b = gate_sample()
    results = {name: paired_bootstrap(true, pred_a, pred, metric="macro_f1", n_classes=8,
                                      n_resamples=200, seed=pair_seed(0, "cand", name))
               for name, pred in (("parent", pred_b), ("base", true))}
    per_model = {name: per_class_f1(true, pred, 8)
                 for name, pred in (("candidate", pred_a), ("parent", pred_b))}
    figures = [
        plot_bootstrap(results, tmp_path / "bootstrap.png", "candidate vs comparators"),
        plot_per_class_f1([f"type {i}" for i in range(8)], per_model,
                          tmp_path / "figures" / "per_class_f1.png", "per-class F1"),
    ]
    for figure in figures:
        content = figure.read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 1000


def test_predictions_outside_the_label_set_are_wrong_but_not_averaged():
    """n_scored: a class only a model predicts (code k) is never right and adds no class to
    the macro average, as sklearn's f1_score(labels=range(k))."""
    rng = np.random.default_rng(3)
    k, n = 5, 400
    true = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < 0.2, k, true)  # 20% "outside" predictions
    other = rng.integers(0, k, n)
    b = paired_bootstrap(true, pred, other, metric="macro_f1", n_classes=k + 1, n_scored=k,
                         n_resamples=10, seed=0)
    assert b.value_a == pytest.approx(f1_score(true, pred, labels=np.arange(k), average="macro",
                                               zero_division=0), abs=1e-12)
