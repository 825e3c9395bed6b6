"""The run manifest for a resolved config: what the host hands the trainer
(`trainers/manifest.py` is the contract; `trainers.entrypoint` reads it inside the jail)."""

from __future__ import annotations

from trainers import family as families
from trainers.manifest import CONFIG_TRAINING_FIELDS, MANIFEST_VERSION

ENTRYPOINT = "trainers.entrypoint"  # the module the sandbox runs on the manifest


def build_manifest(cfg: dict, run_name: str, device: str, *, from_parent: bool,
                   family_code: dict | None = None) -> dict:
    """The run manifest (trainers/manifest.py) for a resolved config, in sandbox paths:
    the parent at /job/in/parent, the dataset at /job/in/dataset, outputs in /job/out, and
    an external family's `family_code` (runner/jobs/external_code.py) when there is one."""
    data, training, parent = cfg["dataset"], cfg["training"], cfg["parent"]
    family = parent["family"] or "scgpt"
    return {
        "manifest_version": MANIFEST_VERSION, "device": "cpu" if device == "cpu" else "cuda",
        "devices": cfg["devices"], "vram_cap_gb": cfg["vram_cap_gb"], "output_dir": "/job/out",
        **{k: training[k] for k in CONFIG_TRAINING_FIELDS},  # task, seed, num_threads
        "metrics_path": "/job/out/metrics.jsonl",
        "experiment_name": cfg["tracking"]["experiment_name"], "run_name": run_name,
        "parent": {"checkpoint_dir": "/job/in/parent"} if from_parent else None,
        "dataset": {"name": data["source"], "path": "/job/in/dataset", "format": data["format"],
                    "label_key": data["label_key"]},
        "family": family,
        # the family's keys that are set: None is the family's default, and another family's
        # key left at None is not this family's concern (one set is refused by the parser)
        "model": {k: v for k, v in parent.items()  # the operator's or the registry's
                  if k in families.get(family).architecture_keys() and v is not None},
        "training": {k: v for k, v in training.items()
                     if k not in CONFIG_TRAINING_FIELDS and v is not None},
        **({"family_code": family_code} if family_code is not None else {}),
    }
