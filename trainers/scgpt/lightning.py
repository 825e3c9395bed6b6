"""Lightning pieces for the two tasks: the LightningModule, callbacks (batches: batches.py).

- `pretrain_mgm`: masked gene-expression modelling. A fraction of each cell's expressed
  genes get their value replaced by the mask value; the expression decoder predicts the
  binned value there (`mse`, scGPT's masked_mse_loss) and, when the model has the MVC
  head, so does the `<cls>` cell embedding (`mvc_mse`, scGPT's GEPC objective); the loss
  is their sum, as in scGPT's pretraining.
- `finetune_celltype`: the classifier head reads the `<cls>` embedding; cross-entropy.

A non-finite loss raises `NonFiniteLoss` at once (the entrypoint exits 3, reason nan_loss).

Several devices (DDP): each rank trains on its share of the cells and the epoch's train_*
metrics are averaged over the ranks (sync_dist); a non-finite training loss on any rank stops
every rank at the same step, so rank 0 reports it. Validation and test run whole on every
rank (their batches are not sharded), so each rank's val_*/test_* values are the full
split's and equal on all ranks: they are logged without a sync.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from trainers import family, scoring
from trainers.scgpt.model import ScGPT

PRETRAIN, FINETUNE = "pretrain_mgm", "finetune_celltype"


NonFiniteLoss = family.NonFiniteLoss


def class_weights(train_labels: np.ndarray, n_cls: int, scheme: str) -> torch.Tensor | None:
    """Cross-entropy weights: "balanced" 1/n_c, "sqrt" 1/sqrt(n_c), "none" -> None.

    Scaled so that the weighted count of training cells equals the count, which keeps
    the loss (and so the learning rate) on the unweighted scale.
    """
    if scheme == "none":
        return None
    counts = np.bincount(train_labels, minlength=n_cls)
    w = 1.0 / np.maximum(counts, 1) ** (1.0 if scheme == "balanced" else 0.5)
    return torch.tensor(w / (w * counts).sum() * counts.sum(), dtype=torch.float32)


class ScGPTModule(pl.LightningModule):
    def __init__(self, model: ScGPT, task: str, lr: float, weight_decay: float = 0.0,
                 warmup_steps: int = 0, total_steps: int = 1,
                 class_weights: torch.Tensor | None = None, n_cls: int = 1):
        super().__init__()
        self.model, self.task = model, task
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup_steps, self.total_steps = warmup_steps, max(total_steps, 1)
        self.n_cls = n_cls
        self.register_buffer("class_weights", class_weights, persistent=False)
        self._eval: dict[str, list] = {}
        self.test_outputs: dict[str, np.ndarray] = {}

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """One batch -> (loss, extras); the training step minus logging."""
        if self.task != PRETRAIN:  # the classifier reads the <cls> embedding alone
            cell = self.model.encode(batch["genes"], batch["values"], batch["pad_mask"],
                                     cls_only=True)
            logits = self.model.cls_decoder(cell).float()
            loss = F.cross_entropy(logits, batch["labels"], weight=self.class_weights)
            return loss, {"pred": logits.argmax(-1), "labels": batch["labels"]}
        h = self.model.encode(batch["genes"], batch["values"], batch["pad_mask"])
        mask = batch["mlm_mask"]
        target = batch["target"][mask]
        pred = self.model.decoder(h[mask]).float()  # decode the masked positions only
        parts = {"mse": F.mse_loss(pred, target)}
        if self.model.mvc_decoder is not None:
            rows = mask.nonzero()[:, 0]  # the cell each masked position belongs to
            cell = h[:, 0, :][rows]
            mvc = self.model.mvc_decoder(cell, self.model.encoder(batch["genes"][mask]))
            parts["mvc_mse"] = F.mse_loss(mvc.float(), target)
        return sum(parts.values()), {"n": int(mask.sum()), "parts": parts}

    def _check(self, loss: torch.Tensor, stage: str) -> None:
        finite = bool(torch.isfinite(loss))
        if stage == "train" and self._trainer is not None and self.trainer.world_size > 1:
            # the ranks' losses differ: all stop together, or the others would wait forever
            # for this one's gradients
            if self.trainer.strategy.reduce_boolean_decision(not finite, all=False):
                raise NonFiniteLoss(stage, self.global_step, float(loss),
                                    "" if not finite else " here; non-finite on another rank")
        if not finite:
            raise NonFiniteLoss(stage, self.global_step, float(loss))

    def training_step(self, batch, batch_idx):
        loss, out = self.compute_loss(batch)
        self._check(loss, "train")
        n = len(batch["genes"])
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        for name, part in out.get("parts", {}).items():
            self.log(f"train_{name}", part, on_step=False, on_epoch=True, batch_size=n,
                     sync_dist=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False,
                 batch_size=1)
        return loss

    def _eval_step(self, batch, stage: str):
        loss, out = self.compute_loss(batch)
        self._check(loss, stage)
        acc = self._eval.setdefault(stage, [])
        weight = out["n"] if self.task == PRETRAIN else len(batch["genes"])
        parts = {k: float(v) * weight for k, v in out.get("parts", {}).items()}
        acc.append((float(loss) * weight, weight, out.get("pred"), out.get("labels"), parts))

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str) -> None:
        """The stage's metrics over all its batches. Logged without sync_dist: with several
        devices every rank evaluated the whole split, so its values already are the split's."""
        rows = self._eval.pop(stage, [])
        if not rows:
            return
        total = sum(r[1] for r in rows)
        loss = sum(r[0] for r in rows) / max(total, 1)
        if self.task == PRETRAIN:
            self.log(f"{stage}_loss", loss)
            for name in rows[0][4]:
                self.log(f"{stage}_{name}", sum(r[4][name] for r in rows) / max(total, 1))
            return
        pred = torch.cat([r[2] for r in rows]).cpu().numpy()
        true = torch.cat([r[3] for r in rows]).cpu().numpy()
        scores, _ = scoring.classification_metrics(true, pred, list(range(self.n_cls)),
                                                   f"{stage}_")
        self.log_dict({f"{stage}_loss": loss, **scores})
        if stage == "test":
            self.test_outputs = {"pred": pred, "true": true}

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr)

        def schedule(step: int) -> float:  # linear warmup, then cosine down to 10%
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            t = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LineProgress(pl.Callback):
    """Progress as whole lines (the host streams stdout line by line through a pipe).

    One line every `every` training steps, with the time left for the whole fit at the pace
    so far (validation included; early stopping may end sooner), and one per epoch with the
    epoch's metrics. With several devices every rank prints its own lines, each starting
    "rank N ", with that rank's own loss.
    """

    def __init__(self, every: int = 20, stream=None):
        self.every, self.stream = every, stream or sys.stdout
        self._t0 = self._n = 0
        self._fit_t0, self._steps = 0.0, 0

    def _print(self, msg: str, trainer=None) -> None:
        if trainer is not None and trainer.world_size > 1:
            msg = f"rank {trainer.global_rank} {msg}"
        self.stream.write(msg + "\n")  # one write: the ranks share the pipe
        self.stream.flush()

    def on_fit_start(self, trainer, pl_module):
        self._fit_t0, self._steps = time.perf_counter(), 0

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0, self._n = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._n += len(batch["genes"])
        self._steps += 1
        total = trainer.num_training_batches
        if (batch_idx + 1) % self.every == 0 or batch_idx + 1 == total:
            now = time.perf_counter()
            rate = self._n / max(now - self._t0, 1e-9)
            left = trainer.max_epochs * total - self._steps
            eta = (now - self._fit_t0) / self._steps * left
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            self._print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
                        f"step {batch_idx + 1}/{total} loss {loss:.4f} "
                        f"{rate:.0f} cells/s eta {format_seconds(eta)}", trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k != "lr"}
        shown = " ".join(f"{k} {v:.4f}" for k, v in sorted(m.items()))
        self._print(f"epoch {trainer.current_epoch + 1} done in "
                    f"{time.perf_counter() - self._t0:.1f}s: {shown}", trainer)


def format_seconds(seconds: float) -> str:
    """12s, 4m05s, 1h02m."""
    s = max(round(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class History(pl.Callback):
    """Per-epoch metrics for the learning-curves figure and result.json."""

    def __init__(self):
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        row = {k: float(v) for k, v in trainer.callback_metrics.items()
               if k != "lr" and not k.startswith("test_")}
        row["epoch"] = trainer.current_epoch + 1
        self.epochs.append(row)
