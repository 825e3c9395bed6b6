"""The scvi-tools family's settings: its architecture (`ModelSpec`, the parent's `model.*` keys)
and its training keys (`TrainingSpec`), with the CBMC pilot's values as defaults, their ranges
and the rules across them. Plain data: the host reads these through trainers/family.py.

Defaults: SCVI pretraining up to 60 epochs (early stopping on the validation ELBO), then scANVI
fine-tuning up to 30 (on the validation classification loss; CBMC stops after ~15), on CBMC
(8,617 cells x 500 genes): 0.5-2.5 minutes each on 2 shared CPU cores. With a parent
checkpoint its forge.json decides the architecture: model fields given in the manifest must
equal the parent's (scvi-tools rebuilds the parent's network as it was, dropout included).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.family import SPLIT_RANGES, SplitSettings

GENE_LIKELIHOODS = ("nb", "zinb", "poisson")
ARCH_FIELDS = ("n_latent", "n_hidden", "n_layers", "dropout_rate", "gene_likelihood")


@dataclass
class ModelSpec:
    """Architecture (scvi.model.SCVI's arguments); a None field takes the parent's value, else
    MODEL_DEFAULTS."""
    n_latent: int | None = None  # 30
    n_hidden: int | None = None  # 128
    n_layers: int | None = None  # 1
    dropout_rate: float | None = None  # 0.1
    gene_likelihood: str | None = None  # "nb" (or "zinb", "poisson")


# scvi-tools' own defaults, except n_latent 30 (scANVI's classifier reads the latent: on
# CBMC test macro-F1 0.909 against 0.869 with 10, Mk cells 0.80 against 0.17) and "nb" (UMI
# counts need no zero inflation).
MODEL_DEFAULTS = {"n_latent": 30, "n_hidden": 128, "n_layers": 1, "dropout_rate": 0.1,
                  "gene_likelihood": "nb"}


@dataclass
class TrainingSpec(SplitSettings):
    """Defaults are the CBMC fine-tuning pilot's (scANVI); its pretraining is TASK_DEFAULTS'."""
    max_epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 1e-6
    early_stopping_patience: int = 5  # epochs without improvement (pretrain: val ELBO,
    #                                   finetune: val classification loss); 0 disables
    limit_train_batches: int | None = None  # batches per epoch (tests, smoke runs)
    n_samples_per_label: int | None = None  # scANVI: labelled cells drawn per class per epoch
    log_every_n_steps: int = 10  # Lightning's logging interval


# Per task, over TrainingSpec's defaults (conf/training/*.yaml may set them again).
TASK_DEFAULTS = {
    "pretrain_scvi": {"max_epochs": 60},
    "finetune_celltype": {},
}

# The range of each numeric training setting, as JSON Schema words.
TRAINING_RANGES: dict[str, dict] = {
    **SPLIT_RANGES,
    "max_epochs": {"minimum": 1},
    "lr": {"exclusiveMinimum": 0},
    "batch_size": {"minimum": 2},  # BatchNorm needs two cells
    "weight_decay": {"minimum": 0},
    "early_stopping_patience": {"minimum": 0},
    "limit_train_batches": {"minimum": 1},
    "n_samples_per_label": {"minimum": 1},
    "log_every_n_steps": {"minimum": 1},
}
CHOICES = {"gene_likelihood": GENE_LIKELIHOODS}


def check(m) -> None:
    """The rules across fields, and the architecture's, for a parsed manifest."""
    from trainers.manifest import need

    md = m.model
    for name in ("n_latent", "n_hidden", "n_layers"):
        v = md.get(name)
        need(v is None or v >= 1, f"model.{name}", f"must be >= 1, got {v}")
    need(md.get("dropout_rate") is None or 0 <= md["dropout_rate"] < 1, "model.dropout_rate",
         "must be in [0, 1)")
    need(md.get("gene_likelihood") in (None, *GENE_LIKELIHOODS), "model.gene_likelihood",
         f"must be one of {', '.join(GENE_LIKELIHOODS)}")
    need(m.devices == 1, "devices", "must be 1: the scvi family trains on one device")
    if m.task == "pretrain_scvi":
        need(m.parent is None, "parent",
             "must be null for pretrain_scvi (an SCVI model is trained from scratch)")
        need(m.training.n_samples_per_label is None, "training.n_samples_per_label",
             "is a scANVI setting (finetune_celltype only)")
