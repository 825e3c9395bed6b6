"""Nearest centroid as a family (trainers/family.py): each class is the mean of its train
cells' log1p CP10k features; a cell is the class of the nearest mean. Its checkpoint is one
JSON file, `centroids.json`, which the host reads whole. Plain data: no numpy here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainers.family import SPLIT_RANGES, Family, Inspection, Problem, SplitSettings, read_json

FILE = "centroids.json"
FORMAT = "forge-centroid"
DISTANCES = ("euclidean", "cosine")


@dataclass
class ModelSpec:
    features: str | None = None  # "log1p_cp10k"


@dataclass
class TrainingSpec(SplitSettings):
    distance: str = "euclidean"  # euclidean | cosine: how near a cell is to a class mean


def inspect(folder: Path) -> Inspection:
    doc, sha = read_json(Path(folder) / FILE)
    doc = doc if isinstance(doc, dict) else {}
    genes, labels, means = doc.get("genes"), doc.get("label_names"), doc.get("centroids")
    problems = []
    if doc.get("format") != FORMAT:
        problems.append(Problem("unsupported_checkpoint", f"{FILE}.format",
                                f"is {doc.get('format')!r}, not {FORMAT!r}"))
    if not (isinstance(genes, list) and isinstance(labels, list) and isinstance(means, list)
            and len(means) == len(labels) and all(len(row) == len(genes) for row in means)):
        problems.append(Problem("invalid_checkpoint", f"{FILE}.centroids",
                                "must be one row per label, one number per gene"))
    return Inspection(architecture={"features": doc.get("features", "log1p_cp10k")},
                      genes=genes if isinstance(genes, list) else None,
                      label_names=labels if isinstance(labels, list) else None,
                      metadata={"centroids_sha256": sha, "distance": doc.get("distance")},
                      problems=problems)


FAMILY = Family(
    name="centroid",
    summary="nearest class mean on log1p CP10k counts (numpy): a test family",
    tasks={"finetune_celltype": "test_macro_f1"},
    architecture=ModelSpec,
    arch_fields=("features",),
    arch_defaults={"features": "log1p_cp10k"},
    arch_source=FILE,
    training=TrainingSpec,
    ranges=SPLIT_RANGES,
    choices={"features": ("log1p_cp10k",), "distance": DISTANCES},
    inspect=inspect,
    recipe="trainers.centroid.recipe",
    mlflow_model="trainers/centroid/mlflow_model.py",
    checkpoint_files=(FILE,),
    framework="numpy",
)
