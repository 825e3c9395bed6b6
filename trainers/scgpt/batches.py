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

    `rank` of `world` (a multi-device job's training loader) takes DistributedSampler's
    share of each epoch's order: padded by wrapping to a multiple of `world`, then every
    world-th cell from `rank`, so every rank has the same number of batches; its gene samples
    and masks come from its own stream of (seed, epoch).
    """

    def __init__(self, data: CellData, columns: np.ndarray, cells: np.ndarray,
                 tokenizer: Tokenizer, batch_size: int, seed: int, shuffle: bool,
                 mask_ratio: float = 0.0, limit: int | None = None, rank: int = 0,
                 world: int = 1):
        self.data, self.columns, self.cells = data, columns, cells
        self.tokenizer, self.batch_size, self.seed = tokenizer, batch_size, seed
        self.shuffle, self.mask_ratio, self.limit = shuffle, mask_ratio, limit
        self.rank, self.world = rank, world
        self.epoch = 0

    def __len__(self) -> int:
        n = math.ceil(math.ceil(len(self.cells) / self.world) / self.batch_size)
        return min(n, self.limit) if self.limit else n

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch if self.shuffle else 0])
        self.epoch += 1
        order = rng.permutation(self.cells) if self.shuffle else self.cells
        if self.world > 1:
            padded = np.resize(order, math.ceil(len(order) / self.world) * self.world)
            order, rng = padded[self.rank::self.world], rng.spawn(self.world)[self.rank]
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            X = self.data.rows(idx)[:, self.columns]
            batch = {k: torch.from_numpy(v)
                     for k, v in self.tokenizer(X, rng, self.mask_ratio).items()}
            if self.data.labels is not None:
                batch["labels"] = torch.from_numpy(self.data.labels[idx])
            yield batch
