"""The linear family's settings: its architecture (`ModelSpec`, the parent's `model.*` keys)
and its training keys (`TrainingSpec`). The defaults are the host's baseline exactly
(trainers/scoring.py BASELINE_MODEL: StandardScaler + LogisticRegression(max_iter=1000) on
log1p CP10k features), so a from-scratch version on a split scores what the baseline does.
Plain data: the host reads these through trainers/family.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.family import SPLIT_RANGES, SplitSettings

FEATURES = ("log1p_cp10k",)  # counts scaled to 10k per cell, then log1p
CLASS_WEIGHTS = ("none", "balanced")
ARCH_FIELDS = ("features", "standardize")  # a parent's coefficients read these inputs


@dataclass
class ModelSpec:
    """Architecture; a None field takes the parent's value, else MODEL_DEFAULTS."""
    features: str | None = None  # "log1p_cp10k"
    standardize: bool | None = None  # true: z-score each gene on the train cells


MODEL_DEFAULTS = {"features": "log1p_cp10k", "standardize": True}


@dataclass
class TrainingSpec(SplitSettings):
    """L2-regularised multinomial logistic regression, fitted by lbfgs."""
    C: float = 1.0  # inverse regularisation strength
    max_iter: int = 1000  # lbfgs iterations
    tol: float = 1e-4  # lbfgs stopping tolerance
    class_weight: str = "none"  # none | balanced (weights inverse to class frequency)


TASK_DEFAULTS: dict[str, dict] = {"finetune_celltype": {}}

TRAINING_RANGES: dict[str, dict] = {
    **SPLIT_RANGES,
    "C": {"exclusiveMinimum": 0},
    "max_iter": {"minimum": 1},
    "tol": {"exclusiveMinimum": 0},
}
CHOICES = {"features": FEATURES, "class_weight": CLASS_WEIGHTS}
# No rules across fields: the manifest parser checks the task, types, ranges and choices.

