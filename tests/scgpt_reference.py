"""scGPT 0.2.4's own `TransformerModel` and `binning`, loaded from its wheel, as references.

Used by the compatibility tests and the throughput benchmark only; training never needs
it. Also reference checkpoint folders: `write_scgpt_checkpoint` writes one the way scGPT's
pretraining does (its own TransformerModel's state dict, a vocab.json with shuffled ids, the
published whole-human args.json's keys), and `load_into_scgpt_strictly` loads a folder back
into scGPT's model as scGPT would, refusing any missing or unexpected key.

The scgpt package's `__init__` imports scanpy, torchtext, wandb and more, so we load just
`scgpt/model/model.py` and its two sibling modules (`dsbn.py`, `grad_reverse.py`) into a
stand-in package: model.py itself needs only torch, numpy and tqdm (flash_attn is tried in a
try/except and skipped with a warning).
"""

from __future__ import annotations

import importlib.util
import json
import random
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
                            pad_value: float = -2, do_mvc: bool = False,
                            n_layers_cls: int = 3):
    """scGPT's TransformerModel configured as its annotation tutorial does (no DAB)."""
    m = scgpt_model_module()
    return m.TransformerModel(
        ntoken=len(vocab), d_model=d_model, nhead=n_heads, d_hid=d_hid, nlayers=n_layers,
        nlayers_cls=n_layers_cls, n_cls=n_cls, vocab=vocab, dropout=dropout, pad_token="<pad>",
        pad_value=int(pad_value), do_mvc=do_mvc, do_dab=False, use_batch_labels=False,
        input_emb_style=input_emb_style, n_input_bins=n_bins + 2, cell_emb_style="cls",
        explicit_zero_prob=False, use_fast_transformer=False, pre_norm=False)


# The arguments of scGPT's pretraining script as its published whole-human model records
# them in args.json (scGPT_human; key set and values as published, paths shortened). Note
# `no_cls: true` with `USE_CLS: false`: the whole-human model was pretrained without the
# classification objective, and with flash-attention (`fast_transformer`), MVC (GEPC) and
# generative training.
PUBLISHED_ARGS = {
    "data_source": "/scratch/ssd004/datasets/cellxgene/scb_strict/human",
    "save_dir": "/scratch/ssd004/datasets/cellxgene/save/cellxgene_census_human-May23-08-36-2023",
    "load_model": None,
    "n_hvg": None,
    "valid_size_or_ratio": 0.003,
    "dist_backend": "nccl",
    "grad_accu_steps": 1,
    "pad_token": "<pad>",
    "input_style": "binned",
    "input_emb_style": "continuous",
    "n_bins": 51,
    "max_seq_len": 1200,
    "training_tasks": "both",
    "dist_url": "tcp://gpu188.cluster.local:53833",
    "mask_ratio": [0.25, 0.5, 0.75],
    "trunc_by_sample": True,
    "vocab_path": "/scratch/ssd004/datasets/cellxgene/scFormer/scformer/tokenizer/"
                  "default_census_vocab.json",
    "rank": 0,
    "batch_size": 32,
    "eval_batch_size": 64,
    "epochs": 6,
    "lr": 0.0001,
    "scheduler_interval": 100,
    "scheduler_factor": 0.99,
    "warmup_ratio_or_step": 10000.0,
    "no_cls": True,
    "no_cce": True,
    "fp16": True,
    "fast_transformer": True,
    "nlayers": 12,
    "nheads": 8,
    "embsize": 512,
    "d_hid": 512,
    "dropout": 0.2,
    "n_layers_cls": 3,
    "log_interval": 9000,
    "save_interval": 27000,
    "mask_value": -1,
    "pad_value": -2,
    "USE_CLS": False,
    "USE_CCE": False,
    "MVC": True,
    "USE_GENERATIVE_TRAINING": True,
    "world_size": 16,
    "distributed": True,
    "local_rank": 0,
    "gpu": 0,
}

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")


def randomise_parameters(model, seed: int = 0) -> None:
    """Every parameter random (LayerNorm gains included) so that a wrong mapping shows."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))


def write_scgpt_checkpoint(folder: Path, genes: list[str], *, d_model: int = 32,
                           n_heads: int = 4, d_hid: int = 64, n_layers: int = 2, seed: int = 0,
                           shuffle: bool = True, extra_args: dict | None = None) -> Path:
    """An scGPT checkpoint folder as scGPT's pretraining writes one, made by scGPT 0.2.4's own
    TransformerModel (continuous value input, MVC decoder, a one-class head) with seeded
    random parameters.

    best_model.pt: its state dict (scGPT's key names, PyTorch attention spelling);
    vocab.json: the specials <pad>, <cls>, <eoc> and `genes`, with ids a seeded shuffle of
    0..n-1 (in order when shuffle=False), so that a loader that assumes specials first or
    ids in file order goes wrong; args.json: PUBLISHED_ARGS with the architecture set from
    the arguments, then `extra_args`.
    """
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = list(SPECIAL_TOKENS) + [g for g in dict.fromkeys(genes) if g not in SPECIAL_TOKENS]
    ids = list(range(len(tokens)))
    if shuffle:
        random.Random(seed).shuffle(ids)
    vocab = dict(zip(tokens, ids))
    args = {**PUBLISHED_ARGS, "embsize": d_model, "nheads": n_heads, "d_hid": d_hid,
            "nlayers": n_layers, **(extra_args or {})}
    model = scgpt_transformer_model(
        vocab, d_model, n_heads, d_hid, n_layers, n_cls=1, dropout=args["dropout"],
        n_bins=args["n_bins"], input_emb_style=args["input_emb_style"],
        pad_value=args["pad_value"], do_mvc=bool(args["MVC"]))
    randomise_parameters(model, seed)
    torch.save(model.state_dict(), folder / "best_model.pt")
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=2))
    (folder / "args.json").write_text(json.dumps(args, indent=2))
    return folder


def load_into_scgpt_strictly(folder: Path):
    """scGPT 0.2.4's TransformerModel built from the folder's args.json and vocab.json, with
    best_model.pt loaded by `load_state_dict(strict=True)`: any missing or unexpected key
    raises. n_cls is the checkpoint's head size (`cls_decoder.out_layer.weight`) when it has
    one. Flash-attention names (`self_attn.Wqkv.*`) are renamed to PyTorch's
    (`self_attn.in_proj_*`) first, as scGPT's own `load_pretrained` does without flash_attn.
    """
    import torch

    folder = Path(folder)
    args = json.loads((folder / "args.json").read_text())
    vocab = json.loads((folder / "vocab.json").read_text())
    state = torch.load(folder / "best_model.pt", map_location="cpu", weights_only=True)
    state = {k.replace("self_attn.Wqkv.", "self_attn.in_proj_"): v for k, v in state.items()}
    head = state.get("cls_decoder.out_layer.weight")
    n_cls = int(head.shape[0]) if head is not None else int(args.get("n_cls", 1))
    style = args.get("input_emb_style", "continuous")
    model = scgpt_transformer_model(
        vocab, args["embsize"], args["nheads"], args["d_hid"], args["nlayers"], n_cls,
        dropout=args.get("dropout", 0.2), n_bins=args.get("n_bins", 51), input_emb_style=style,
        pad_value=args.get("pad_value", -2 if style == "continuous" else args.get("n_bins", 51)),
        do_mvc=bool(args.get("MVC", False)), n_layers_cls=args.get("n_layers_cls", 3))
    model.load_state_dict(state, strict=True)
    return model
