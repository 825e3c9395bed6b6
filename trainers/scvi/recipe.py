"""The scvi-tools recipe, run inside the jail: data -> AnnData -> SCVI or scANVI -> fit on the
split's train cells (validated on its val cells) -> test -> checkpoint in scvi-tools' layout.

- `pretrain_scvi`: SCVI from scratch; test metrics are the negative ELBO and reconstruction
  loss per cell on the held-out cells (lower is better), as scvi-tools computes them.
- `finetune_celltype`: scANVI. From scratch, from an SCVI parent (`SCANVI.from_scvi_model`),
  or continuing a scANVI parent. A parent that reads other genes than the dataset's is
  mapped with scArches: `prepare_query_anndata` puts the dataset on the parent's genes (the
  parent's genes the dataset lacks are zeros, the dataset's genes the parent lacks are
  dropped), then `load_query_data`, then every weight trains.

The split is trainers.data.load.split_cells, the same as every family's, passed to scvi-tools
as its `external_indexing`; for scANVI the test cells' labels are also hidden (the unlabeled
category), so no test label is ever seen. The host rebuilds the split and scores the test
cells' predictions itself.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from trainers.family import CheckpointError, NonFiniteLoss
from trainers.scvi.family import FAMILY
from trainers.scvi.settings import MODEL_DEFAULTS

ARCH_KEYS = tuple(MODEL_DEFAULTS)

LABELS_KEY = "forge_label"  # obs column of a scANVI model this recipe builds
UNLABELED = "forge:unlabeled"  # its unlabeled category (CBMC has a class called "Unknown")
SIDECAR = "forge.json"
# scvi-tools' history names -> ours (the rest keep theirs)
HISTORY_NAMES = {"train_loss_epoch": "train_loss", "validation_loss": "val_loss"}


def quiet_imports(tmp: str | None = None) -> None:
    """scvi-tools imports numba and matplotlib, which want a writable cache under HOME (the
    jail's HOME may be read-only), and warns at length about settings we choose on purpose;
    and Lightning, whose torchmetrics is imported first here, without scipy.signal."""
    import warnings

    from trainers.torchmetrics_import import import_torchmetrics

    tmp = tmp or tempfile.gettempdir()
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tmp, "numba"))
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(tmp, "matplotlib"))
    for noise in (".*does not have many workers.*", ".*num_workers.*",
                  ".*Last batch will have a small size.*", ".*LeafSpec.*",
                  ".*already passed in to pretrained.*", ".*jax.*", ".*Observation names.*",
                  ".*is_categorical_dtype.*", ".*GPU available but not used.*",
                  ".*reduce_lr_on_plateau.*", ".*early stopping.*", ".*srun.*",
                  ".*hasn.t been trained yet.*",  # a query model, before its own training
                  ".*smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message=noise)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("scvi", "lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage())
    import_torchmetrics()


def train(m, state: dict) -> dict:
    quiet_imports()
    import scvi
    import torch

    from trainers import scoring
    from trainers.data.load import load, split_cells
    from trainers.manifest import ManifestError, resolve_model, sha256_file
    from trainers.runtime import choose_device, phase

    phase("imports_done", state)
    out, t, finetune = Path(m.output_dir), m.training, m.task == "finetune_celltype"
    device = choose_device(m, state)
    torch.set_num_threads(m.num_threads or max(1, len(os.sched_getaffinity(0))))
    scvi.settings.seed = m.seed
    scvi.settings.verbosity = logging.WARNING
    scvi.settings.dl_num_workers = 0
    scvi.settings.logging_dir = os.path.join(tempfile.gettempdir(), "scvi_log")  # not the cwd
    parent = m.parent.checkpoint_dir if m.parent is not None else None
    parent_doc = parent_info(parent) if parent else None

    d = m.dataset
    data = load(d.path, d.format, d.label_key, d.gene_key, d.use_raw, name=d.name)
    if data.value_kind != "counts":
        raise ManifestError("dataset", f"scvi-tools models raw counts; {d.path} holds "
                            f"{data.value_kind} values")
    if finetune and data.labels is None:
        raise ManifestError("dataset.label_key", f"dataset {d.path} has no labels to fine-tune on")
    split_seed = m.seed if t.split_seed is None else t.split_seed
    split = split_cells(data.n_cells, data.labels, t.val_fraction, t.test_fraction, split_seed)
    state["split"] = split.summary()
    state["metrics_path"] = m.metrics_path
    phase("data_ready", state)

    adata = counts_anndata(data.X, data.genes)
    genes = {"in_vocab": len(adata.var_names), "dropped": 0, "vocab_size": len(adata.var_names)}
    same_genes = True
    if parent:  # the dataset on the parent's genes, in its order
        ref_genes = list(scvi.model.SCVI.prepare_query_anndata(
            adata, parent, return_reference_var_names=True))
        known = set(ref_genes)
        matched = sum(g in known for g in adata.var_names)
        if matched == 0:
            raise ManifestError("dataset", "the dataset shares no gene with the parent "
                                f"checkpoint ({len(ref_genes)} genes)")
        genes = {"in_vocab": matched, "dropped": adata.n_vars - matched,
                 "vocab_size": len(ref_genes), "missing_zero": len(ref_genes) - matched}
        same_genes = list(adata.var_names) == ref_genes
        if not same_genes:
            adata = scvi.model.SCVI.prepare_query_anndata(adata, parent, inplace=False)
    state["genes"] = genes

    # a parent's architecture is its own (model.* given must agree); the built model's
    # init_params_ are what the checkpoint records
    arch = resolve_model(FAMILY, m.model, (parent_doc.get("architecture") or {})
                         if parent_doc else None)
    mapping = None
    if finetune:
        names = data.label_names
        labels_key, unlabeled = LABELS_KEY, UNLABELED
        if parent_doc and parent_doc["model_class"] == "SCANVI":
            labels_key, unlabeled = parent_doc["labels_key"], parent_doc["unlabeled_category"]
            unknown = sorted(set(names) - set(parent_doc["label_names"]))
            if unknown:
                raise ManifestError("dataset.label_key", f"the parent scANVI model has no class "
                                    f"{', '.join(unknown[:5])}: fine-tune from an SCVI parent")
        if unlabeled in names:
            raise ManifestError("dataset.label_key", f"a class is called {unlabeled!r}")
        shown = np.array(names, dtype=object)[data.labels]
        shown[split.test] = unlabeled  # the test labels are never seen
        adata.obs[labels_key] = shown.astype(str)
        model, mapping = scanvi_model(scvi, adata, parent, parent_doc, same_genes, arch,
                                      labels_key, unlabeled)
    else:
        scvi.model.SCVI.setup_anndata(adata)
        model = scvi.model.SCVI(adata, **{k: arch[k] for k in ARCH_KEYS})
    n_params = sum(p.numel() for p in model.module.parameters())
    print(f"{m.task}: {type(model).__name__}, {len(split.train)} train / {len(split.val)} val / "
          f"{len(split.test)} test cells, {genes['in_vocab']} genes ({genes['dropped']} "
          f"dropped), {n_params / 1e6:.3f}M parameters, device {device}"
          f"{f', parent {mapping}' if mapping else ''}", flush=True)

    stream = metrics_stream(m.metrics_path)
    kwargs = dict(
        max_epochs=t.max_epochs, batch_size=t.batch_size,
        accelerator="gpu" if device == "cuda" else "cpu", devices=1,
        datasplitter_kwargs={"external_indexing": [split.train, split.val, split.test]},
        plan_kwargs={"lr": t.lr, "weight_decay": t.weight_decay},
        early_stopping=bool(t.early_stopping_patience),
        early_stopping_patience=max(1, t.early_stopping_patience),
        # scANVI stops on its classifier (the ELBO of a pretrained encoder has settled)
        early_stopping_monitor="validation_classification_loss" if finetune
        else "elbo_validation", check_val_every_n_epoch=1,
        limit_train_batches=t.limit_train_batches or 1.0,
        log_every_n_steps=t.log_every_n_steps, enable_progress_bar=False,
        callbacks=[stream, first_step(state)])
    if finetune:
        kwargs["n_samples_per_label"] = t.n_samples_per_label
    t0 = time.perf_counter()
    try:
        model.train(**kwargs)
    except ValueError as e:  # a NaN reaches torch.distributions' argument checks first
        if "found invalid values" not in str(e):
            raise
        raise NonFiniteLoss("train", stream.step, float("nan"), " in the model's outputs") from e
    train_s = time.perf_counter() - t0
    history = epoch_history(model.history)

    t0 = time.perf_counter()
    metrics = {k: v for k, v in (history[-1] if history else {}).items() if k != "epoch"}
    metrics["epochs_trained"] = float(len(history))
    result = {"per_class_f1": {}, "artifacts": [], "test_cells": len(split.test)}
    if finetune:
        head, head_names = predict_with(model, adata, split.test)
        pred = scoring.as_dataset_codes(head, head_names, data.label_names)
        test_s = time.perf_counter() - t0
        claims = scoring.test_claims(out, data, split, pred, m.seed)
        result["per_class_f1"] = claims["per_class_f1"]
        metrics.update(claims["metrics"])
    else:
        metrics["test_elbo"] = float(model.get_elbo(indices=split.test,
                                                    batch_size=t.batch_size))
        recon = model.get_reconstruction_error(indices=split.test, batch_size=t.batch_size)
        metrics["test_reconstruction_loss"] = float(recon["reconstruction_loss"])
        test_s = time.perf_counter() - t0
        print(f"test ELBO {metrics['test_elbo']:.2f} (higher is better), reconstruction loss "
              f"{metrics['test_reconstruction_loss']:.2f} (per cell)",
              flush=True)
    bad = [k for k, v in metrics.items() if not np.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite metrics: {', '.join(bad)}")
    stream.write({k: v for k, v in metrics.items() if not k.startswith(("train_", "val_"))},
                 len(history))

    folder = out / "checkpoint"
    model.save(str(folder), overwrite=True, save_anndata=False)
    arch = model_arch(model)
    write_sidecar(folder, model, arch, scvi.__version__, m.task)
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    result.update(
        metrics=metrics, history=history,
        checkpoint={"dir": "checkpoint", "files": files},
        model={"n_params": int(n_params),
               "config": {**arch, "model_class": type(model).__name__}},
        parent={"model_class": parent_doc["model_class"], "mapping": mapping}
        if parent_doc else None,
        timings={"train_s": train_s, "test_s": test_s,
                 "cells_per_s": len(history) * len(split.train) / max(train_s, 1e-9)})
    return result


def counts_anndata(X, genes: list[str]):
    """An AnnData of raw counts (CSR float32), cells named by row index."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    X = sp.csr_matrix(X, dtype=np.float32)
    obs = pd.DataFrame(index=[str(i) for i in range(X.shape[0])])
    adata = anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[str(g) for g in genes]))
    adata.var_names_make_unique()
    return adata


def parent_info(folder: str) -> dict:
    """The parent's model class, architecture and labels: from its forge.json, else from
    scvi-tools' own registry in model.pt (a model saved elsewhere). CheckpointError names the
    parent's file."""
    import scvi

    path = Path(folder)
    try:
        if (path / SIDECAR).exists():
            doc = json.loads((path / SIDECAR).read_text())
        else:
            reg = scvi.model.base.BaseModelClass.load_registry(str(path))
            setup = reg.get("setup_args", {})
            doc = {"model_class": reg.get("model_name"), "architecture": {},
                   "labels_key": setup.get("labels_key"),
                   "unlabeled_category": setup.get("unlabeled_category")}
            if doc["model_class"] == "SCANVI":
                doc["label_names"] = scanvi_label_names(scvi.model.SCANVI.load_registry(
                    str(path)), doc["unlabeled_category"])
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"parent checkpoint: {e}", f"parent.{SIDECAR}") from None
    if doc.get("model_class") not in ("SCVI", "SCANVI"):
        raise CheckpointError(f"parent checkpoint is a {doc.get('model_class')!r} model, not "
                              "SCVI or SCANVI", f"parent.{SIDECAR}.model_class")
    return doc


def scanvi_label_names(registry: dict, unlabeled: str) -> list[str]:
    mapping = registry["field_registries"]["labels"]["state_registry"]["categorical_mapping"]
    return [str(c) for c in mapping if c != unlabeled]


def scanvi_model(scvi, adata, parent, parent_doc, same_genes, arch, labels_key, unlabeled):
    """The scANVI model to train, and how the parent came in (None: from scratch)."""
    SCVI, SCANVI = scvi.model.SCVI, scvi.model.SCANVI
    if parent is None:
        SCANVI.setup_anndata(adata, labels_key=labels_key, unlabeled_category=unlabeled)
        return SCANVI(adata, **{k: arch[k] for k in ARCH_KEYS}), None
    if parent_doc["model_class"] == "SCANVI":
        if same_genes:
            return SCANVI.load(parent, adata=adata), "scanvi_continued"
        model = SCANVI.load_query_data(adata, parent, unfrozen=True)
        model.module.train()  # scArches leaves it in eval mode (frozen dropout, batch norm)
        return model, "scanvi_query_mapped"
    if same_genes:
        base, how = SCVI.load(parent, adata=adata), "from_scvi_model"
    else:  # scArches surgery onto the dataset, then scANVI over it (every weight trains)
        base, how = SCVI.load_query_data(adata, parent), "scvi_query_mapped"
    return SCANVI.from_scvi_model(base, unlabeled_category=unlabeled, labels_key=labels_key,
                                  adata=adata), how


def predict_with(model, adata, cells: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The classifier's class for each of `cells` (deterministic: the posterior mean)."""
    names = scanvi_label_names(model.registry, model.registry["setup_args"]["unlabeled_category"])
    probs = model.predict(adata, indices=np.asarray(cells), soft=True)
    return np.asarray(probs[names].to_numpy().argmax(1), dtype=np.int64), names


def model_arch(model) -> dict:
    """The architecture a built or loaded model has, from scvi-tools' record of its
    constructor's arguments."""
    params = model.init_params_
    flat = {**params.get("non_kwargs", {}),
            **{k: v for group in params.get("kwargs", {}).values() for k, v in group.items()}}
    return {k: flat[k] for k in ARCH_KEYS if k in flat}


def write_sidecar(folder: Path, model, arch: dict, version: str, task: str) -> None:
    """forge.json: what the host's inspect() may read without opening model.pt."""
    setup = model.registry["setup_args"]
    scanvi = type(model).__name__ == "SCANVI"
    unlabeled = setup.get("unlabeled_category") if scanvi else None
    doc = {"model_class": type(model).__name__, "scvi_version": version, "task": task,
           "architecture": arch,
           "genes": [str(g) for g in model.adata.var_names],
           "label_names": scanvi_label_names(model.registry, unlabeled) if scanvi else None,
           "labels_key": setup.get("labels_key") if scanvi else None,
           "unlabeled_category": unlabeled}
    (folder / SIDECAR).write_text(json.dumps(doc, indent=1))


def epoch_history(history: dict) -> list[dict]:
    """scvi-tools' per-epoch history (a DataFrame per metric) as one dict per epoch."""
    epochs: dict[int, dict] = {}
    for key, frame in history.items():
        if key.endswith("_step") or frame is None or len(frame) == 0:
            continue
        name = HISTORY_NAMES.get(key, key)
        for epoch, value in zip(frame.index, frame.iloc[:, 0]):
            epochs.setdefault(int(epoch), {"epoch": int(epoch) + 1})[name] = float(value)
    return [epochs[e] for e in sorted(epochs)]


def first_step(state: dict):
    """A Lightning callback that states the job's first_step phase (trainers/runtime.py)."""
    from lightning.pytorch.callbacks import Callback

    from trainers.runtime import phase

    class FirstStep(Callback):
        def on_train_batch_start(self, *args) -> None:
            phase("first_step", state)

    return FirstStep()


def metrics_stream(path):
    """A Lightning callback that appends each epoch's metrics to the job's stream (the host
    relays them while the job runs) and fails the job on a non-finite training loss."""
    from lightning.pytorch.callbacks import Callback

    from trainers.metrics_stream import append_metrics

    class MetricsStream(Callback):
        step = 0  # the global step training is at, for a failure's message

        def on_train_batch_start(self, trainer, *args):
            self.step = trainer.global_step

        def write(self, metrics: dict, step: int) -> None:
            append_metrics(path, metrics, step)

        def on_train_epoch_end(self, trainer, pl_module):
            values = {HISTORY_NAMES.get(k, k): float(v)
                      for k, v in trainer.callback_metrics.items()
                      if not k.endswith("_step") and getattr(v, "numel", lambda: 1)() == 1}
            loss = values.get("train_loss")
            if loss is not None and not np.isfinite(loss):
                raise NonFiniteLoss("train", trainer.global_step, loss)
            self.write(values, trainer.current_epoch + 1)

    return MetricsStream()


def predict(folder, data, cells, options: dict | None = None) -> tuple[np.ndarray, list[str]]:
    """A scANVI checkpoint's class (an index into its label names) for each of `cells` (rows of
    `data`, a CellData); genes the model reads that the data lacks are zeros."""
    quiet_imports()
    import scvi

    scvi.settings.verbosity = logging.WARNING
    doc = parent_info(str(folder))
    if doc["model_class"] != "SCANVI":
        raise CheckpointError(f"{folder} is a {doc['model_class']} model, not a classifier",
                              SIDECAR)
    cells = np.asarray(cells, dtype=np.int64)
    adata = counts_anndata(data.X[cells], data.genes)
    adata = scvi.model.SCANVI.prepare_query_anndata(adata, str(folder), inplace=False)
    adata.obs[doc["labels_key"]] = doc["unlabeled_category"]
    model = scvi.model.SCANVI.load(str(folder), adata=adata, accelerator="cpu")
    return predict_with(model, adata, np.arange(len(cells)))
