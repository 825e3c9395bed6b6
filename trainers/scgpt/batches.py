"""Tokenized batches over a subset of cells, without Lightning: training, the eval gate's
job and the MLflow model all draw the same way."""

from __future__ import annotations

import math

import numpy as np
import torch

from trainers.data.load import CellData
from trainers.scgpt.tokenize import Tokenizer

__all__ = ["CellBatches"]


class CellBatches:
    """Tokenized batches over a subset of cells; a plain iterable Lightning accepts.

    Shuffled loaders draw a new order, gene sample and mask each epoch from
    (seed, epoch); evaluation loaders replay the same draws every time, so validation
    metrics compare across epochs and runs.
    """

    def __init__(self, data: CellData, columns: np.ndarray, cells: np.ndarray,
                 tokenizer: Tokenizer, batch_size: int, seed: int, shuffle: bool,
                 mask_ratio: float = 0.0, limit: int | None = None):
        self.data, self.columns, self.cells = data, columns, cells
        self.tokenizer, self.batch_size, self.seed = tokenizer, batch_size, seed
        self.shuffle, self.mask_ratio, self.limit = shuffle, mask_ratio, limit
        self.epoch = 0

    def __len__(self) -> int:
        n = math.ceil(len(self.cells) / self.batch_size)
        return min(n, self.limit) if self.limit else n

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch if self.shuffle else 0])
        self.epoch += 1
        order = rng.permutation(self.cells) if self.shuffle else self.cells
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            X = self.data.rows(idx)[:, self.columns]
            batch = {k: torch.from_numpy(v)
                     for k, v in self.tokenizer(X, rng, self.mask_ratio).items()}
            if self.data.labels is not None:
                batch["labels"] = torch.from_numpy(self.data.labels[idx])
            yield batch
