"""scGPT 0.2.4's own `TransformerModel` and `binning`, loaded from its wheel, as references.

Used by the compatibility tests and the throughput benchmark only; training never needs
it. The scgpt package's `__init__` imports scanpy, torchtext, wandb and more, so we load
just `scgpt/model/model.py` and its two sibling modules (`dsbn.py`, `grad_reverse.py`)
into a stand-in package: model.py itself needs only torch, numpy and tqdm (flash_attn
is tried in a try/except and skipped with a warning).
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path

from runner.jobs.datasets import REFERENCE_FILES, cache_root, fetch_wheel_files

PACKAGE = "_scgpt_reference"


def scgpt_source_files(cache: Path | None = None) -> dict[str, Path]:
    """scGPT 0.2.4's model.py, dsbn.py, grad_reverse.py, preprocess.py (sha256-checked)."""
    cache = cache or cache_root()
    return fetch_wheel_files(REFERENCE_FILES["scgpt_source"], cache / "datasets" / "scgpt_source",
                             cache)


def scgpt_binning():
    """scGPT's own `binning(row, n_bins)` from scgpt/preprocess.py, without its imports.

    preprocess.py imports scanpy at the top, so we compile just the two functions
    (`binning`, `_digitize`) from its source.
    """
    import ast
    import logging
    import typing

    import numpy as np
    import torch

    path = scgpt_source_files()["scgpt/preprocess.py"]
    tree = ast.parse(path.read_text())
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef)
            and n.name in ("binning", "_digitize")]
    namespace = {"np": np, "torch": torch, "Union": typing.Union,
                 "logger": logging.getLogger("scGPT")}
    code = compile(ast.Module(body=body, type_ignores=[]), str(path), "exec")
    exec(code, namespace)  # noqa: S102 -- scGPT's own source, sha256-pinned
    return namespace["binning"]


def scgpt_model_module(cache: Path | None = None) -> types.ModuleType:
    """Import scGPT 0.2.4's scgpt/model/model.py (fetched and sha256-checked)."""
    if f"{PACKAGE}.model" in sys.modules:
        return sys.modules[f"{PACKAGE}.model"]
    cache = cache or cache_root()
    files = scgpt_source_files(cache)
    folder = Path(files["scgpt/model/model.py"]).parent
    pkg = types.ModuleType(PACKAGE)
    pkg.__path__ = [str(folder)]
    sys.modules[PACKAGE] = pkg
    for name in ("dsbn", "grad_reverse", "model"):  # model.py does `from .dsbn import ...`
        spec = importlib.util.spec_from_file_location(f"{PACKAGE}.{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flash_attn is not installed"
            spec.loader.exec_module(module)
    return sys.modules[f"{PACKAGE}.model"]


def scgpt_transformer_model(vocab: dict[str, int], d_model: int, n_heads: int, d_hid: int,
                            n_layers: int, n_cls: int, dropout: float = 0.2,
                            n_bins: int = 51, input_emb_style: str = "continuous",
                            pad_value: float = -2, do_mvc: bool = False):
    """scGPT's TransformerModel configured as its annotation tutorial does (no DAB)."""
    m = scgpt_model_module()
    return m.TransformerModel(
        ntoken=len(vocab), d_model=d_model, nhead=n_heads, d_hid=d_hid, nlayers=n_layers,
        nlayers_cls=3, n_cls=n_cls, vocab=vocab, dropout=dropout, pad_token="<pad>",
        pad_value=int(pad_value), do_mvc=do_mvc, do_dab=False, use_batch_labels=False,
        input_emb_style=input_emb_style, n_input_bins=n_bins + 2, cell_emb_style="cls",
        explicit_zero_prob=False, use_fast_transformer=False, pre_norm=False)
