"""The trainer's figures and metric names; the measures themselves are trainers/scoring.py's."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def confusion_matrix(true: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """Counts of (true, predicted) codes in [0, n) (sklearn's confusion_matrix with
    labels=range(n): a pair with a code outside it is left out)."""
    true, pred = np.asarray(true, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    inside = (true >= 0) & (true < n) & (pred >= 0) & (pred < n)
    return np.bincount(true[inside] * n + pred[inside], minlength=n * n).reshape(n, n)


def plot_confusion_matrix(true: np.ndarray, pred: np.ndarray, label_names: list[str],
                          path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(label_names)
    cm = confusion_matrix(true, pred, n)
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), label_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), label_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning_curves(history: list[dict[str, float]], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    loss_keys = [k for k in ("train_loss", "val_loss", "train_mse", "val_mse", "train_mvc_mse",
                             "val_mvc_mse")
                 if any(k in h for h in history)]
    score_keys = [k for k in ("val_accuracy", "val_macro_f1") if any(k in h for h in history)]
    fig, axes = plt.subplots(1, 2 if score_keys else 1, figsize=(10 if score_keys else 5, 3.6),
                             squeeze=False)
    for k in loss_keys:
        axes[0, 0].plot(epochs, [h.get(k, np.nan) for h in history], marker="o", label=k)
    axes[0, 0].set_xlabel("epoch")
    axes[0, 0].set_ylabel("loss")
    axes[0, 0].legend()
    if score_keys:
        for k in score_keys:
            axes[0, 1].plot(epochs, [h.get(k, np.nan) for h in history], marker="o", label=k)
        axes[0, 1].set_xlabel("epoch")
        axes[0, 1].set_ylim(0, 1)
        axes[0, 1].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
