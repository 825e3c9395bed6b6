"""scvi-tools as a family (trainers/family.py): SCVI pretraining (`pretrain_scvi`) and scANVI
cell-type fine-tuning, checkpoints in scvi-tools' own layout (`model.pt`, what `model.save`
writes and `SCVI.load`/`SCANVI.load` read) plus `forge.json`, a sidecar the recipe writes with
what the host may know: the architecture, the genes in order, the classes, the model class.
Plain data and JSON only: the host loads this module for its dry run and registration, and
never opens model.pt (a torch pickle)."""

from __future__ import annotations

from pathlib import Path

from trainers.family import Family, Inspection, Problem, read_json
from trainers.scvi import settings

SIDECAR = "forge.json"
MODEL_CLASSES = ("SCVI", "SCANVI")


def inspect(folder: Path) -> Inspection:
    """What forge.json says. A folder without it (saved by scvi-tools elsewhere) says nothing
    here: the job reads its model.pt inside the jail."""
    folder = Path(folder)
    if not (folder / SIDECAR).exists():
        return Inspection(metadata={"note": f"no {SIDECAR}: the genes and classes are read "
                                            "from model.pt inside the job"})
    doc, sha = read_json(folder / SIDECAR)
    doc = doc if isinstance(doc, dict) else {}
    problems = []
    arch = doc.get("architecture")
    if not isinstance(arch, dict):
        arch = {}
        problems.append(Problem("invalid_checkpoint", f"{SIDECAR}.architecture",
                                "missing or not an object"))
    arch = {k: v for k, v in arch.items() if k in settings.MODEL_DEFAULTS}
    model_class = doc.get("model_class")
    if model_class not in MODEL_CLASSES:
        problems.append(Problem("unsupported_checkpoint", f"{SIDECAR}.model_class",
                                f"{model_class!r} is not one of {', '.join(MODEL_CLASSES)}"))
    genes = doc.get("genes")
    if not (isinstance(genes, list) and genes and all(isinstance(g, str) for g in genes)):
        problems.append(Problem("invalid_checkpoint", f"{SIDECAR}.genes",
                                "missing or not a list of gene names"))
        genes = None
    labels = doc.get("label_names")
    labels = [str(n) for n in labels] if isinstance(labels, list) else None
    if model_class == "SCANVI" and not labels:
        problems.append(Problem("invalid_checkpoint", f"{SIDECAR}.label_names",
                                "a SCANVI checkpoint must list its classes"))
    return Inspection(
        architecture=arch, genes=genes, label_names=labels if model_class == "SCANVI" else None,
        metadata={"model_class": model_class, "scvi_version": doc.get("scvi_version"),
                  "labels_key": doc.get("labels_key"),
                  "unlabeled_category": doc.get("unlabeled_category"),
                  "n_genes": len(genes) if genes else None, "sidecar_sha256": sha},
        problems=problems)


FAMILY = Family(
    name="scvi",
    summary="scvi-tools: SCVI (a count VAE) pretraining, then scANVI cell-type fine-tuning",
    tasks={"pretrain_scvi": "test_elbo", "finetune_celltype": "test_macro_f1"},
    architecture=settings.ModelSpec,
    arch_fields=settings.ARCH_FIELDS,
    arch_defaults=settings.MODEL_DEFAULTS,
    training=settings.TrainingSpec,
    task_defaults=settings.TASK_DEFAULTS,
    ranges=settings.TRAINING_RANGES,
    choices=settings.CHOICES,
    check=settings.check,
    inspect=inspect,
    recipe="trainers.scvi.recipe",
    mlflow_model="trainers/scvi/mlflow_model.py",
    checkpoint_files=("model.pt",),  # forge.json when trained here; scvi-tools' own folder too
    framework="scvi-tools",
    arch_source="forge.json",
    requirements=("scvi-tools", "torch", "anndata"),
)

__all__ = ["FAMILY", "inspect"]
