"""The scGPT family's recipe, run inside the jail (trainers/family.py `recipe`): `train()`
(data -> model -> fit -> test -> predictions -> figures -> checkpoint in scGPT layout) and
`predict()` (the gate's per-cell labels). Heavy imports (torch, lightning) happen inside the
functions, after the manifest has been validated.

Several devices (`devices` > 1): Lightning DDP over loopback (trainers/runtime.py strategy),
gloo on cpu and NCCL on cuda. Lightning starts ranks 1.. by re-running the entry point on the
same manifest; each trains on its share of the training cells. Validation and test are not
sharded: every rank evaluates the whole split, so the test metrics are the full test set's
(DistributedSampler would pad and duplicate cells; `use_distributed_sampler` is off, and
CellBatches is not a DataLoader it could wrap anyway). After the test every rank meets at a
barrier, then rank 0 alone goes on: the predictions, figures, checkpoint, final metrics and
result.json; the other ranks write nothing to output_dir (Lightning's own checkpoints of
the best epoch are rank 0's too). CPU threads are split between the ranks.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from trainers.manifest import Manifest, ManifestError, sha256_file
from trainers.runtime import choose_device, choose_precision, phase, process_rank, strategy


def train(m: Manifest, state: dict) -> dict:
    """The recipe: data -> model -> fit -> test -> predictions -> figures -> checkpoint."""
    import warnings
    # (the sync_dist advice: val/test values are equal on every rank, see lightning.py)
    for noise in (".*LeafSpec.*", ".*does not have many workers.*",
                  ".*when logging on epoch level in distributed setting.*",
                  # The job starts its own ranks (runtime.strategy), never under srun, and the
                  # jail's environment holds no SLURM variables; Lightning probes for SLURM
                  # on every fit (its checkpoint connector too, whatever cluster environment
                  # the Trainer is given) and, with `srun` on PATH, advised using it.
                  ".*`srun` command is available on your system but is not used.*"):
        warnings.filterwarnings("ignore", message=noise)
    import logging

    import numpy as np

    from trainers.torchmetrics_import import import_torchmetrics
    import_torchmetrics()  # before Lightning does: without scipy.signal
    import pytorch_lightning as pl
    import torch
    # Lightning advertises its cloud logger at INFO on every fit; keep the job log to facts.
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage())
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar

    from trainers import scoring
    from trainers.data.load import load, split_cells
    from trainers.metrics_log import JsonLinesLogger
    from trainers.scgpt import evaluate
    from trainers.scgpt.batches import CellBatches
    from trainers.scgpt.lightning import (
        FINETUNE,
        History,
        LineProgress,
        ScGPTModule,
        class_weights,
    )
    from trainers.scgpt.model import save_checkpoint
    from trainers.scgpt.prepare import checkpoint_args, prepare

    phase("imports_done", state)
    if m.parent is not None:  # a parent we cannot use fails here, typed, before any data is read
        check_parent(m.parent.checkpoint_dir)
    out, t, finetune = Path(m.output_dir), m.training, m.task == FINETUNE
    rank, world = process_rank(), m.devices
    device = choose_device(m, state)
    threads = m.num_threads or max(1, len(os.sched_getaffinity(0)) // world)
    torch.set_num_threads(threads)
    if world > 1:  # Lightning's launcher sets the ranks' threads unless it finds this
        os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_flush_denormal(True)  # denormal Adam states slow CPU kernels several-fold
    pl.seed_everything(m.seed, workers=True, verbose=False)

    # data and split (the same seed gives the same split for pretraining and fine-tuning)
    d = m.dataset
    data = load(d.path, d.format, d.label_key, d.gene_key, d.use_raw, name=d.name)
    if finetune and data.labels is None:
        raise ManifestError("dataset.label_key", f"dataset {d.path} has no labels to fine-tune on")
    split_seed = m.seed if t.split_seed is None else t.split_seed
    split = split_cells(data.n_cells, data.labels, t.val_fraction, t.test_fraction, split_seed)
    state["split"] = split.summary()
    phase("data_ready", state)

    # model, vocabulary, tokenizer
    prep = prepare(m, data, len(data.label_names) if finetune else None)
    state["genes"] = prep.genes
    weights = (class_weights(data.labels[split.train], len(data.label_names),
                             t.class_weighting) if finetune else None)
    mask_ratio = 0.0 if finetune else t.mask_ratio

    def batches(cells, shuffle, limit, rank=0, world=1):
        size = t.batch_size if shuffle else (t.eval_batch_size or 2 * t.batch_size)
        return CellBatches(data, prep.columns, cells, prep.tokenizer, size, m.seed, shuffle,
                           mask_ratio, limit, rank, world)
    train_dl = batches(split.train, True, t.limit_train_batches, rank, world)  # rank's share
    val_dl = batches(split.val, False, t.limit_eval_batches)
    test_dl = batches(split.test, False, None)  # every held-out cell: the host scores them all
    module = ScGPTModule(prep.model, m.task, t.lr, t.weight_decay, t.warmup_steps,
                         total_steps=t.max_epochs * len(train_dl), class_weights=weights,
                         n_cls=len(data.label_names))

    # tracking, callbacks, trainer
    logger = JsonLinesLogger(m.metrics_path, name=m.experiment_name, version=m.run_name or "0")
    state["metrics_path"] = m.metrics_path
    monitor, mode = ("val_macro_f1", "max") if finetune else ("val_loss", "min")
    history = History()
    ckpt_dir = out / ".lightning_checkpoints"
    best = ModelCheckpoint(dirpath=ckpt_dir, monitor=monitor, mode=mode, save_top_k=1,
                           save_weights_only=True, filename="best")
    class FirstStep(pl.Callback):  # the job log's first_step phase
        def on_train_batch_start(self, *args) -> None:
            phase("first_step", state)

    callbacks = [history, best, FirstStep()]
    if t.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor, patience=t.early_stopping_patience, mode=mode))
    tty = sys.stdout.isatty()
    callbacks.append(TQDMProgressBar() if tty else LineProgress(every=t.log_every_n_steps))
    precision = choose_precision(t.precision, device)
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=world,
        strategy=strategy(world, device), use_distributed_sampler=False, precision=precision,
        max_epochs=t.max_epochs, logger=logger, callbacks=callbacks,
        enable_progress_bar=tty, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps, gradient_clip_val=t.grad_clip,
        deterministic=device == "cpu", default_root_dir=str(out))
    if rank == 0:
        print(f"{m.task}: {len(split.train)} train / {len(split.val)} val / {len(split.test)} "
              f"test cells, {prep.genes['in_vocab']} genes in vocab ({prep.genes['dropped']} "
              f"dropped), {prep.model.num_params() / 1e6:.2f}M parameters, device {device}"
              f"{f' x {world} (ddp)' if world > 1 else ''}, precision {precision}", flush=True)

    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=train_dl, val_dataloaders=val_dl)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.test(module, dataloaders=test_dl, ckpt_path=best.best_model_path or None,
                 verbose=False)
    test_s = time.perf_counter() - t0
    if world > 1:  # every rank has read the best checkpoint before rank 0 removes it
        trainer.strategy.barrier("forge_tested")
        if rank != 0:
            return {}

    # metrics: last epoch's train/val, the best epoch, test on the best weights
    last = history.epochs[-1] if history.epochs else {}
    metrics = {k: v for k, v in last.items() if k != "epoch"}
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()
                    if k.startswith("test_")})
    metrics["epochs_trained"] = float(len(history.epochs))
    if best.best_model_score is not None:
        metrics[f"best_{monitor}"] = float(best.best_model_score)
        scores = [h.get(monitor, np.nan) for h in history.epochs]
        metrics["best_epoch"] = float(1 + (np.nanargmax(scores) if mode == "max"
                                           else np.nanargmin(scores)))
    result = {"per_class_f1": {}, "artifacts": []}
    if finetune:
        pred, true = module.test_outputs["pred"], module.test_outputs["true"]
        result["test_cells"] = len(true)  # every rank tests the whole split, in its order
        # The host scores these against its own truth (runner/jobs/truth.py); the metrics
        # below are this job's claims, for its log.
        claims = scoring.test_claims(out, data, split, pred, m.seed)
        result["per_class_f1"] = claims["per_class_f1"]  # test_* metrics: the test loop's own
        evaluate.plot_confusion_matrix(true, pred, data.label_names, out / "confusion_matrix.png",
                                       f"{d.name or 'dataset'} test set, fine-tuned model")
        result["artifacts"].append("confusion_matrix.png")
    else:
        result["test_cells"] = len(split.test)  # the test loader is never cut: every cell
        print(f"test masked MSE {metrics.get('test_mse', float('nan')):.4f}", flush=True)
    evaluate.plot_learning_curves(history.epochs, out / "learning_curves.png",
                                  f"{m.task} on {d.name or 'dataset'}")
    result["artifacts"].append("learning_curves.png")
    bad = [k for k, v in metrics.items() if not np.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite metrics: {', '.join(bad)}")

    # the final metrics to the stream (the host uploads the figures); the checkpoint in
    # scGPT layout
    logger.log_metrics({k: v for k, v in metrics.items() if not k.startswith(("train_", "val_"))})
    logger.log_metrics({f"test_f1/{scoring.metric_key(k)}": v
                        for k, v in result["per_class_f1"].items()})
    paths = save_checkpoint(prep.model, prep.vocab.stoi, out / "checkpoint",
                            checkpoint_args(m, data.label_names))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    result.update(
        metrics=metrics, history=history.epochs,
        checkpoint={"dir": "checkpoint",
                    "files": {name: sha256_file(p) for name, p in paths.items()}},
        model={"n_params": prep.model.num_params(),
               "config": {k: v for k, v in vars(prep.model.config).items()}},
        parent=prep.parent, precision=precision,
        timings={"train_s": train_s, "test_s": test_s})
    return result


def check_parent(folder: str) -> None:
    """The parent checkpoint as load_checkpoint will read it; a CheckpointError names the
    file as a manifest path (`parent.vocab.json`, `parent.args.json.pre_norm`)."""
    from trainers.scgpt.model import CheckpointError, check_checkpoint

    try:
        check_checkpoint(folder)
    except CheckpointError as e:
        raise CheckpointError(f"parent checkpoint: {e}", f"parent.{e.field}") from None


def predict(folder: str, data, cells, options: dict):
    """(head outputs for `cells`, the head's label names) of a fine-tuned checkpoint, drawing
    tokens as the candidate's own test pass did (`options`: seed, max_seq_len,
    eval_batch_size, include_zero_gene, precision, device)."""
    import torch

    from trainers.scgpt.predict import load_classifier
    from trainers.scgpt.predict import predict as run

    torch.set_num_threads(options.get("num_threads") or len(os.sched_getaffinity(0)))
    torch.set_flush_denormal(True)
    clf = load_classifier(folder)
    head = run(clf, data, cells, seed=options["seed"], max_seq_len=options["max_seq_len"],
               batch_size=options["eval_batch_size"],
               include_zero_gene=options["include_zero_gene"],
               precision=options["precision"], device=options["device"])
    return head, clf.label_names
