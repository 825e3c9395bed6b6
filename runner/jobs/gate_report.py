"""The eval gate's review surface in MLflow (`publish`) and the figures it attaches to the
candidate's run, so a reviewer sees why it passed or failed: the bootstrap distribution of
each delta and the F1 of every class.

matplotlib is imported inside the functions: a dry run never pays for it, and the Agg backend
draws without a display.
"""

from __future__ import annotations

import json
import sys
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


def publish(tracking_uri: str, model: dict, verdict, preds, gate: str, *, others: list[str],
            report: dict, work_dir: Path) -> list[str]:
    """The gate's decision on the MLflow side, for reviewers: the report (JSON, the bootstrap
    figure, per-class F1) on the candidate's run under gate/<name>/; the version's tags
    (forge.lifecycle_state, forge.promotion_state, forge.gate_decision) and description;
    the `champion` alias on promotion; the tags of the versions it superseded (`others`:
    their registry rows are read again). The registry holds the decision already, so each
    step that fails is a warning, returned and printed, never an error."""
    from runner.jobs import tracking
    from runner.jobs.bootstrap import per_class_f1
    from runner.registry import catalog

    warnings: list[str] = []

    def attempt(what: str, step) -> None:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - the registry is the record
            warnings.append(f"could not {what}: {type(exc).__name__}: {exc}"[:300])
            print(f"warning: {warnings[-1]}", file=sys.stderr)

    version_row = model["version"]
    run_id = version_row.get("mlflow_run_id")
    name, version = _registered(version_row.get("mlflow_model_uri"))
    client = tracking.client(tracking_uri)
    work_dir.mkdir(parents=True, exist_ok=True)
    k = preds.n_classes

    def report_files() -> None:
        files = [work_dir / "report.json"]
        files[0].write_text(json.dumps(report, indent=2, default=str))
        files.append(plot_bootstrap({c.role: c.result for c in verdict.comparisons},
                                    work_dir / "bootstrap.png",
                                    f"{model['id']}: {verdict.decision} by gate {gate}"))
        per_model = {"candidate": per_class_f1(preds.true, preds.pred["candidate"], k + 1)[:k]}
        per_model.update({c.role: per_class_f1(preds.true, preds.pred[c.role], k + 1)[:k]
                          for c in verdict.comparisons})
        files.append(plot_per_class_f1(preds.label_names, per_model,
                                       work_dir / "per_class_f1.png",
                                       "per-class F1 on the held-out cells"))
        for path in files:
            client.log_artifact(run_id, str(path), f"gate/{gate}")
        client.set_tag(run_id, "forge.gate_decision", verdict.decision)

    def version_state() -> None:
        for key, value in (("forge.lifecycle_state", model["lifecycle_state"]),
                           ("forge.promotion_state", version_row["promotion_state"]),
                           ("forge.gate", gate), ("forge.gate_decision", verdict.decision)):
            client.set_model_version_tag(name, version, key, value)
        if verdict.decision == "promoted":
            client.set_registered_model_alias(name, "champion", version)
        text = client.get_model_version(name, version).description or ""
        client.update_model_version(name, version, description=(
            f"{text}\n\nGate {gate}: {verdict.notes}").strip()[:5000])

    def others_state() -> None:
        for other in others:
            art = catalog.get_model_version(other)
            their_name, their_version = _registered(art["version"].get("mlflow_model_uri"))
            if their_name:
                client.set_model_version_tag(their_name, their_version,
                                             "forge.lifecycle_state", art["lifecycle_state"])

    if run_id:
        attempt("attach the gate report to the candidate's run", report_files)
    if name:
        attempt("update the candidate's model version", version_state)
    attempt("update the superseded model versions", others_state)
    return warnings


def _registered(model_uri: str | None) -> tuple[str | None, str | None]:
    """models:/<name>/<version> -> (name, version)."""
    if not model_uri or not model_uri.startswith("models:/"):
        return None, None
    name, _, version = model_uri.removeprefix("models:/").rpartition("/")
    return (name, version) if name and version.isdigit() else (None, None)
