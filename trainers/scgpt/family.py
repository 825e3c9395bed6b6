"""The scGPT-style transformer as a family (trainers/family.py): masked gene modelling
(`pretrain_mgm`) and cell-type fine-tuning, checkpoints in scGPT's layout (args.json,
vocab.json, best_model.pt), compatible with scGPT 0.2.4. Plain data and JSON only: the host
loads this module for its dry run and registration."""

from __future__ import annotations

from pathlib import Path

from trainers.family import CheckpointError, Family, Inspection, Problem, read_json
from trainers.scgpt import checkpoint_args, settings


def inspect(folder: Path) -> Inspection:
    """What args.json and vocab.json say (never best_model.pt: that is a pickle)."""
    folder = Path(folder)
    args, args_sha = read_json(folder / "args.json")
    vocab, vocab_sha = read_json(folder / "vocab.json")
    arch, arch_problems = checkpoint_args.read_args(args)
    vocab_info, vocab_problems = checkpoint_args.read_vocab(vocab)
    known = set(checkpoint_args.ARCH_FROM_ARGS) | set(checkpoint_args.UNSUPPORTED)
    args = args if isinstance(args, dict) else {}
    labels = args.get("label_names")
    return Inspection(
        architecture=arch,
        genes=[g for g in vocab if g not in checkpoint_args.SPECIALS]
        if isinstance(vocab, dict) else [],
        label_names=[str(n) for n in labels] if isinstance(labels, list) else None,
        metadata={"vocab": {**vocab_info, "sha256": vocab_sha}, "args_sha256": args_sha,
                  "n_cls": args.get("n_cls"),
                  # the training script's own settings: no network depends on them
                  "ignored_args": sorted(k for k in args if k not in known)},
        problems=[Problem(p.reason, p.field, p.message) for p in arch_problems + vocab_problems])


FAMILY = Family(
    name="scgpt",
    summary="scGPT-style transformer (masked gene modelling, then a cell-type head)",
    tasks={"pretrain_mgm": "test_mse", "finetune_celltype": "test_macro_f1"},
    architecture=settings.ModelSpec,
    arch_fields=settings.ARCH_FIELDS,
    arch_defaults=settings.MODEL_DEFAULTS,
    arch_source="checkpoint's args.json",
    training=settings.TrainingSpec,
    task_defaults=settings.TASK_DEFAULTS,
    ranges=settings.TRAINING_RANGES,
    choices=settings.CHOICES,
    check=settings.check,
    inspect=inspect,
    recipe="trainers.scgpt.recipe",
    mlflow_model="trainers/scgpt/mlflow_model.py",
    checkpoint_files=("args.json", "vocab.json", "best_model.pt"),
    framework="scgpt",
    requirements=("torch",),
)

__all__ = ["FAMILY", "CheckpointError", "inspect"]
