"""Logistic regression on log1p CP10k counts as a family (trainers/family.py): the host's
baseline as a versioned model. Its checkpoint is one JSON file (trainers/linear/checkpoint.py),
so the host reads all of it; nothing here imports torch or scikit-learn."""

from __future__ import annotations

from pathlib import Path

from trainers.family import CheckpointError, Family, Inspection, read_json
from trainers.linear import checkpoint, settings


def inspect(folder: Path) -> Inspection:
    """What model.json says; CheckpointError when it is missing, a link, not a regular file
    or not JSON."""
    doc, sha = read_json(Path(folder) / checkpoint.FILE)
    arch, problems = checkpoint.describe(doc)
    doc = doc if isinstance(doc, dict) else {}
    genes, labels = doc.get("genes"), doc.get("label_names")
    valid = not any(p.field.endswith((".genes", ".label_names")) for p in problems)
    return Inspection(
        architecture=arch,
        genes=list(genes) if valid and isinstance(genes, list) else None,
        label_names=list(labels) if valid and isinstance(labels, list) else None,
        metadata={"model_json_sha256": sha, "sklearn_version": doc.get("sklearn_version"),
                  "n_genes": len(genes) if isinstance(genes, list) else None,
                  "n_classes": len(labels) if isinstance(labels, list) else None},
        problems=problems)


FAMILY = Family(
    name="linear",
    summary="logistic regression (scikit-learn) on log1p CP10k counts: the baseline as a model",
    tasks={"finetune_celltype": "test_macro_f1"},
    architecture=settings.ModelSpec,
    arch_fields=settings.ARCH_FIELDS,
    arch_defaults=settings.MODEL_DEFAULTS,
    arch_source="model.json",
    training=settings.TrainingSpec,
    task_defaults=settings.TASK_DEFAULTS,
    ranges=settings.TRAINING_RANGES,
    choices=settings.CHOICES,
    inspect=inspect,
    recipe="trainers.linear.recipe",
    mlflow_model="trainers/linear/mlflow_model.py",
    checkpoint_files=(checkpoint.FILE,),
    framework="scikit-learn",
)

__all__ = ["FAMILY", "CheckpointError", "inspect"]
