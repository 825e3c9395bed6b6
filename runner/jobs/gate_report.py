"""The figures the eval gate attaches to the candidate's MLflow run, so a reviewer sees why it
passed or failed: the bootstrap distribution of each delta and the F1 of every class.

matplotlib is imported inside the functions: a dry run never pays for it, and the Agg backend
draws without a display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runner.jobs.bootstrap import Bootstrap


def plot_bootstrap(results: dict[str, Bootstrap], path: Path, title: str) -> Path:
    """One panel per comparator: the resampled deltas, with 0, the point delta and the interval
    marked, so 'the interval excludes 0' can be seen, not only read."""
    if not results:
        raise ValueError("plot_bootstrap needs at least one comparator's bootstrap")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    try:
        for ax, (comparator, result) in zip(axes[0], results.items()):
            ax.hist(result.deltas, bins=50, color="tab:blue", alpha=0.6)
            ax.axvline(0, color="black", linewidth=1, label="0")
            ax.axvline(result.delta, color="tab:red", linewidth=2, label="point delta")
            ci_label = f"{result.confidence:.0%} CI"
            for bound, label in ((result.low, ci_label), (result.high, None)):
                ax.axvline(bound, color="tab:red", linestyle="--", linewidth=1, label=label)
            ax.set_title(f"vs {comparator}: {result.delta:+.4f}\n"
                         f"{result.confidence:.0%} CI [{result.low:+.4f}, {result.high:+.4f}]",
                         fontsize=10)
            ax.set_xlabel(f"{result.metric} (candidate - {comparator})")
            ax.set_ylabel(f"resamples (of {result.n_resamples})")
            ax.legend(fontsize=8)
        fig.suptitle(title)
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_per_class_f1(label_names: list[str], per_model: dict[str, np.ndarray], path: Path,
                      title: str) -> Path:
    """Grouped horizontal bars, one group per class and one bar per model, so a class the
    candidate lost to its parent stands out even when the macro average went up."""
    if not per_model:
        raise ValueError("plot_per_class_f1 needs at least one model's per-class F1")
    for model, scores in per_model.items():
        if np.shape(scores) != (len(label_names),):
            raise ValueError(f"{model}: {np.shape(scores)} F1 scores for "
                             f"{len(label_names)} class names")
    plt = _pyplot()
    bar_height = 0.8 / len(per_model)
    rows = np.arange(len(label_names))
    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.3 * len(label_names) * len(per_model)))
    try:
        for i, (model, scores) in enumerate(per_model.items()):
            ax.barh(rows + i * bar_height, scores, height=bar_height, label=model)
        ax.set_yticks(rows + bar_height * (len(per_model) - 1) / 2, label_names)
        ax.invert_yaxis()  # first class on top, as in the label list
        ax.set_xlim(0, 1)
        ax.set_xlabel("F1")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: bars reach 1.0
        ax.set_title(title)
        return _save(fig, path)
    finally:
        plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
