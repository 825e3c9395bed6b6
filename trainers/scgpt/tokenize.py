"""scGPT tokenization, vectorised over a batch of cells (numpy only, no torch).

A cell becomes a sequence: `<cls>` first, then up to max_seq_len - 1 of its expressed
genes (a random sample when it has more), padded with `<pad>`. Each gene token carries
its expression value, binned per cell as scGPT does:

- `binning()`: the non-zero values of one cell are cut at the n_bins - 1 quantiles
  (np.quantile, linear) of that cell's non-zero values; a value gets the index of its
  bin, 1..n_bins-1, and zero stays 0. Values that sit exactly on one or more tied edges
  get a uniformly random bin among those edges (scGPT's `_digitize(side="both")`).
  This is `scgpt.preprocess.binning` row by row, bit for bit: the same edges, and the
  same random draws when given a `np.random.RandomState` seeded like the global one.
- `GeneVocab`: token -> id, scGPT's `vocab.json`, with the specials `<pad>`, `<cls>`,
  `<eoc>`.
- `Tokenizer`: binning + sampling + padding + (optional) masking for a batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainers.scgpt.checkpoint_args import CLS, EOC, PAD, SPECIALS  # noqa: F401 - re-exported

# ---------------------------------------------------------------- value binning

def bin_edges(X: np.ndarray, n_bins: int) -> np.ndarray:
    """Per-row quantile edges of the non-zero values: (B, n_bins - 1), float64.

    Equals np.quantile(row[row != 0], np.linspace(0, 1, n_bins - 1)) for every row
    (same virtual index, same two-sided lerp); rows without non-zero values get NaN.
    """
    X = np.asarray(X)
    B = X.shape[0]
    nnz = (X != 0).sum(axis=1)
    # sort each row with the zeros pushed to the end; the first nnz entries are the data
    key = np.where(X != 0, X, np.inf if X.dtype.kind == "f" else np.iinfo(X.dtype).max)
    srt = np.sort(key, axis=1)
    q = np.linspace(0, 1, n_bins - 1)
    n = np.maximum(nnz, 1)[:, None]
    virtual = (n - 1) * q[None, :]  # numpy 'linear': (n - 1) * q
    prev = np.floor(virtual)
    gamma = virtual - prev
    prev = prev.astype(np.intp)
    nxt = np.minimum(prev + 1, n - 1)
    prev = np.minimum(prev, n - 1)
    rows = np.arange(B)[:, None]
    a, b = srt[rows, prev], srt[rows, nxt]
    diff = b - a  # in the input dtype, as numpy's _lerp does
    edges = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
    edges = edges.astype(np.float64)
    edges[nnz == 0] = np.nan
    return edges


def binning(X: np.ndarray, n_bins: int = 51,
            rng: np.random.RandomState | np.random.Generator | None = None) -> np.ndarray:
    """scGPT's per-cell binning of a (B, G) matrix of non-negative values -> int64 bins.

    The random tie-breaking draws one uniform per non-zero value in row-major order,
    which is exactly the sequence scGPT's row-by-row loop draws from np.random.
    """
    X = np.asarray(X)
    if X.ndim == 1:
        return binning(X[None, :], n_bins, rng)[0]
    edges = bin_edges(X, n_bins)
    r, c = np.nonzero(X)
    x = X[r, c].astype(np.float64)
    e = edges[r]  # (nnz, n_bins - 1)
    left = (e <= x[:, None]).sum(axis=1)  # np.digitize(x, bins)
    right = (e < x[:, None]).sum(axis=1)  # np.digitize(x, bins, right=True)
    if rng is None:
        rng = np.random.default_rng()
    u = rng.rand(len(x)) if isinstance(rng, np.random.RandomState) else rng.random(len(x))
    out = np.zeros(X.shape, dtype=np.int64)
    out[r, c] = np.ceil(u * (right - left) + left).astype(np.int64)
    return out


# ---------------------------------------------------------------- vocabulary

class GeneVocab:
    """Gene token -> id, as scGPT's vocab.json; specials are appended when missing."""

    def __init__(self, stoi: dict[str, int]):
        ids = sorted(stoi.values())
        if ids != list(range(len(ids))):
            raise ValueError("vocab ids must be 0..n-1 without gaps")
        self.stoi = dict(stoi)
        for s in SPECIALS:  # scGPT's cell_emb.py appends missing specials the same way
            if s not in self.stoi:
                self.stoi[s] = len(self.stoi)

    @classmethod
    def from_genes(cls, genes: list[str]) -> GeneVocab:
        """Specials first (<pad> = 0), then genes in the given order."""
        tokens = list(SPECIALS) + [g for g in dict.fromkeys(genes) if g not in SPECIALS]
        return cls({t: i for i, t in enumerate(tokens)})

    @classmethod
    def from_file(cls, path: str | Path) -> GeneVocab:
        return cls(json.loads(Path(path).read_text()))

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.stoi, indent=2))

    def __len__(self) -> int:
        return len(self.stoi)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def __getitem__(self, token: str) -> int:
        return self.stoi[token]

    def lookup(self, genes: list[str]) -> np.ndarray:
        """Ids for genes; -1 where a gene is not in the vocabulary."""
        return np.array([self.stoi.get(g, -1) for g in genes], dtype=np.int64)

    @property
    def pad_id(self) -> int:
        return self.stoi[PAD]

    @property
    def cls_id(self) -> int:
        return self.stoi[CLS]


# ---------------------------------------------------------------- batches

@dataclass
class Tokenizer:
    """Turns rows of a cells x genes matrix into padded scGPT token batches.

    gene_ids: vocab id of each column of the matrix (columns not in the vocab must be
    dropped beforehand). Values fed to the model are the bin indices; with the
    "category" input style pad/mask are the extra bins n_bins / n_bins + 1, with
    "continuous" they are -2 / -1 (scGPT's tutorial conventions).
    """
    gene_ids: np.ndarray
    cls_id: int
    pad_id: int
    max_seq_len: int = 257
    n_bins: int = 51
    pad_value: float = -2.0
    mask_value: float = -1.0
    include_zero_gene: bool = False

    def __call__(self, X: np.ndarray, rng: np.random.Generator, mask_ratio: float = 0.0
                 ) -> dict[str, np.ndarray]:
        """X: (B, G) raw values -> genes, values, target, pad_mask, mlm_mask; all (B, T).

        T = 1 + min(max_seq_len - 1, most genes any cell in the batch contributes).
        `values` is the model input (masked positions set to mask_value), `target` the
        unmasked binned values; `mlm_mask` marks the masked positions.
        """
        B, G = X.shape
        binned = binning(X, self.n_bins, rng)
        # Sample genes: a random key per gene, unexpressed genes keyed past all expressed
        # ones; the smallest keys are a uniform sample without replacement.
        keys = rng.random((B, G))
        usable = np.ones_like(binned, dtype=bool) if self.include_zero_gene else binned > 0
        keys[~usable] = 2.0
        n_use = usable.sum(axis=1)
        L = int(min(self.max_seq_len - 1, max(int(n_use.max()), 1)))
        if L < G:
            pick = np.argpartition(keys, L - 1, axis=1)[:, :L]
        else:
            pick = np.broadcast_to(np.arange(G), (B, G)).copy()
        pick = np.take_along_axis(pick, np.argsort(np.take_along_axis(keys, pick, 1), 1), 1)
        valid = np.take_along_axis(usable, pick, 1)  # (B, L), True then False per row

        genes = np.full((B, L + 1), self.pad_id, dtype=np.int64)
        values = np.full((B, L + 1), self.pad_value, dtype=np.float32)
        genes[:, 0], values[:, 0] = self.cls_id, 0.0
        genes[:, 1:] = np.where(valid, self.gene_ids[pick], self.pad_id)
        values[:, 1:] = np.where(valid, np.take_along_axis(binned, pick, 1), self.pad_value)
        pad_mask = np.zeros((B, L + 1), dtype=bool)
        pad_mask[:, 1:] = ~valid

        mlm_mask = np.zeros((B, L + 1), dtype=bool)
        if mask_ratio > 0:
            # exactly int(n * ratio) masked genes per cell, as scGPT's random_mask_value
            n_mask = (valid.sum(axis=1) * mask_ratio).astype(np.int64)
            mkeys = np.where(valid, rng.random((B, L)), 2.0)
            rank = np.argsort(np.argsort(mkeys, axis=1), axis=1)
            mlm_mask[:, 1:] = rank < n_mask[:, None]
        target = values.copy()
        values[mlm_mask] = self.mask_value
        return {"genes": genes, "values": values, "target": target,
                "pad_mask": pad_mask, "mlm_mask": mlm_mask}
