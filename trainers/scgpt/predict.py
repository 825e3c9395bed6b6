"""Cell-type predictions of a fine-tuned checkpoint, outside Lightning: the eval gate's job
(trainers/gate_eval.py) and the MLflow model (trainers/scgpt/mlflow_model.py) predict here,
with the draws of the trainer's own test pass (same seed, batch size and cell order), so a
checkpoint reproduces the test metrics it was registered with."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainers.data.load import CellData
from trainers.scgpt.batches import CellBatches
from trainers.scgpt.model import CheckpointError, ScGPT, load_checkpoint
from trainers.scgpt.prepare import tokenizer_for
from trainers.scgpt.tokenize import GeneVocab
from trainers.scoring import as_dataset_codes  # noqa: F401 -- where the callers look for it


@dataclass
class Classifier:
    model: ScGPT
    vocab: GeneVocab
    label_names: list[str]  # what each output of the head means
    args: dict  # the checkpoint's args.json


def load_classifier(folder: str | Path) -> Classifier:
    """A checkpoint with a cell-type head; CheckpointError for anything else (a pretrained
    base has no head for any label set)."""
    model, stoi, args, _ = load_checkpoint(folder)
    names = args.get("label_names")
    if args.get("task") != "finetune_celltype" or not isinstance(names, list) or \
            len(names) != model.config.n_cls:
        raise CheckpointError(f"{folder} is not a cell-type classifier (task "
                              f"{args.get('task')!r}, {model.config.n_cls} outputs)")
    return Classifier(model.eval(), GeneVocab(stoi), [str(n) for n in names], args)


def autocast(precision: str, device: str):
    """What Lightning's precision setting does to the forward pass."""
    if precision == "bf16-mixed":
        return torch.autocast(device, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device, dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict(clf: Classifier, data: CellData, cells: np.ndarray, *, seed: int, max_seq_len: int,
            batch_size: int, include_zero_gene: bool, precision: str = "32",
            device: str = "cpu") -> np.ndarray:
    """The head's class index for each of `cells` (rows of `data`), in order."""
    columns, tokenizer = tokenizer_for(clf.vocab, clf.model.config, data.genes, max_seq_len,
                                       include_zero_gene, "models")
    model = clf.model.to(device).eval()
    out = []
    for batch in CellBatches(data, columns, cells, tokenizer, batch_size, seed, shuffle=False):
        with autocast(precision, device):
            h = model.encode(batch["genes"].to(device), batch["values"].to(device),
                             batch["pad_mask"].to(device))
            logits = model.cls_decoder(h[:, 0, :]).float()
        out.append(logits.argmax(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
