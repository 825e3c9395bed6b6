"""From manifest + dataset to a ready model: vocabulary, gene mapping, architecture.

With a parent checkpoint its args.json fixes the architecture and its vocab.json the
vocabulary (dataset genes outside it are dropped and counted); from scratch the
vocabulary is the manifest's vocab_path or the dataset's own genes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainers.data.load import CellData
from trainers.manifest import Manifest, ManifestError, resolve_model
from trainers.scgpt.checkpoint_args import read_args
from trainers.scgpt.family import FAMILY
from trainers.scgpt.model import (
    ARGS_TO_CONFIG,
    Dropout,
    LoadReport,
    ScGPT,
    ScGPTConfig,
    load_checkpoint,
)
from trainers.scgpt.tokenize import GeneVocab, Tokenizer


@dataclass
class Prepared:
    model: ScGPT
    vocab: GeneVocab
    columns: np.ndarray  # dataset columns kept (genes in the vocabulary)
    tokenizer: Tokenizer
    genes: dict  # {"in_vocab", "dropped", "vocab_size"}
    parent: dict | None  # {"checkpoint_dir", "load_report"}


def prepare(m: Manifest, data: CellData, n_cls: int | None) -> Prepared:
    """n_cls: classes of the fine-tuning head; None keeps the parent's head (pretraining)."""
    report: LoadReport | None = None
    if m.parent is not None:
        # entrypoint.check_parent has vetted the folder: a CheckpointError is its, typed
        model, stoi, args, report = load_checkpoint(m.parent.checkpoint_dir, n_cls=n_cls)
        arch = resolve_model(FAMILY, m.model, read_args(args)[0])  # args.json's architecture
        if m.task == "finetune_celltype" and args.get("label_names") and \
                args["label_names"] != data.label_names:
            # same class count by chance is not the same classes: start the head afresh
            _reset_head(model)
            report.missing = sorted(set(report.missing) | {
                k for k in model.state_dict() if k.startswith("cls_decoder.")})
        vocab = GeneVocab(stoi)
        _set_dropout(model, arch["dropout"])
    else:
        arch = resolve_model(FAMILY, m.model, None)
        if m.vocab_path:
            try:
                vocab = GeneVocab.from_file(m.vocab_path)
            except (OSError, ValueError) as e:
                raise ManifestError("vocab_path", f"cannot read {m.vocab_path}: {e}") from None
        else:
            vocab = GeneVocab.from_genes(data.genes)
        n_bins = arch["n_bins"]
        category = arch["input_emb_style"] == "category"
        config = ScGPTConfig(
            vocab_size=len(vocab), d_model=arch["d_model"], n_heads=arch["n_heads"],
            d_hid=arch["d_hid"], n_layers=arch["n_layers"], n_cls=n_cls or 1,
            dropout=arch["dropout"], pad_token_id=vocab.pad_id, n_bins=n_bins,
            input_emb_style=arch["input_emb_style"],
            pad_value=n_bins if category else -2.0, mask_value=n_bins + 1 if category else -1.0)
        model = ScGPT(config)
        # Expressed genes' bins are uniform on 1..n_bins-1 in every cell, so their mean is
        # n_bins / 2: starting the regression there spares Adam hundreds of steps of
        # drifting the output up from 0.
        with torch.no_grad():
            model.decoder.fc[-1].bias.fill_(n_bins / 2)

    where = "parent.checkpoint_dir" if m.parent else "vocab_path"
    columns, tokenizer = tokenizer_for(vocab, model.config, data.genes, m.training.max_seq_len,
                                       m.training.include_zero_gene, where)
    genes = {"in_vocab": len(columns), "dropped": len(data.genes) - len(columns),
             "vocab_size": len(vocab)}
    parent = None if m.parent is None else {
        "checkpoint_dir": m.parent.checkpoint_dir,
        "load_report": {"missing": report.missing, "unexpected": report.unexpected,
                        "shape_mismatch": report.shape_mismatch}}
    return Prepared(model, vocab, columns, tokenizer, genes, parent)


def tokenizer_for(vocab: GeneVocab, config: ScGPTConfig, genes: list[str], max_seq_len: int,
                  include_zero_gene: bool, where: str) -> tuple[np.ndarray, Tokenizer]:
    """The dataset columns in the vocabulary and the tokenizer over them; `where` is the
    manifest field to blame when no gene matches."""
    ids = vocab.lookup(genes)
    columns = np.flatnonzero(ids >= 0)
    if len(columns) == 0:
        raise ManifestError(where, f"none of the dataset's {len(genes)} genes "
                            f"(e.g. {', '.join(genes[:3])}) is in the vocabulary of "
                            f"{len(vocab)} tokens")
    tokenizer = Tokenizer(gene_ids=ids[columns], cls_id=vocab.cls_id, pad_id=vocab.pad_id,
                          max_seq_len=max_seq_len, n_bins=config.n_bins,
                          pad_value=config.pad_value, mask_value=config.mask_value,
                          include_zero_gene=include_zero_gene)
    return columns, tokenizer


def _reset_head(model: ScGPT) -> None:
    for module in model.cls_decoder.modules():
        if hasattr(module, "reset_parameters") and module is not model.cls_decoder:
            module.reset_parameters()


def _set_dropout(model: ScGPT, p: float) -> None:
    model.config.dropout = p
    for module in model.modules():
        if isinstance(module, Dropout):
            module.p = p


def checkpoint_args(m: Manifest, label_names: list[str]) -> dict:
    """Extra args.json entries: what scGPT's scripts record plus what we need to resume."""
    extra = {"max_seq_len": m.training.max_seq_len, "task": m.task, "seed": m.seed,
             "lr": m.training.lr, "batch_size": m.training.batch_size,
             "eval_batch_size": m.training.eval_batch_size or 2 * m.training.batch_size,
             "epochs": m.training.max_epochs, "mask_ratio": m.training.mask_ratio,
             "include_zero_gene": m.training.include_zero_gene,
             "dataset": m.dataset.name, "trainer": "forge-runner trainers.scgpt"}
    if m.task == "finetune_celltype":
        extra["label_names"] = label_names
    return extra


__all__ = ["ARGS_TO_CONFIG", "Prepared", "checkpoint_args", "prepare", "tokenizer_for"]
