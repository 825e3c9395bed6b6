"""The scGPT family's settings: its architecture (`ModelSpec`, the parent's `model.*` keys) and
its training keys (`TrainingSpec`), with the CBMC pilot's values as defaults, their ranges
and the rules across them. Plain data: the host reads these through trainers/family.py.

Defaults: pretrain 2 epochs at max_seq_len 129, then fine-tune up to 15 epochs at 257, on 2
CPU cores. With a parent checkpoint its args.json decides the architecture: model fields given
in the manifest must equal the parent's (dropout may differ: it is a training setting).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.family import SPLIT_RANGES, SplitSettings
from trainers.manifest import PRECISIONS, need

INPUT_EMB_STYLES = ("continuous", "category")
CLASS_WEIGHTINGS = ("none", "balanced", "sqrt")
ARCH_FIELDS = ("n_layers", "d_model", "n_heads", "d_hid", "n_bins", "input_emb_style")


@dataclass
class ModelSpec:
    """Architecture; a None field takes the parent's value, else MODEL_DEFAULTS."""
    n_layers: int | None = None  # 4
    d_model: int | None = None  # 64
    n_heads: int | None = None  # 2
    d_hid: int | None = None  # 128
    dropout: float | None = None  # 0.0
    n_bins: int | None = None  # 51
    input_emb_style: str | None = None  # "category" (or "continuous")


# The CBMC pilot's architecture: small enough for 2 CPU cores.
MODEL_DEFAULTS = {"n_layers": 4, "d_model": 64, "n_heads": 2, "d_hid": 128, "dropout": 0.0,
                  "n_bins": 51, "input_emb_style": "category"}


@dataclass
class TrainingSpec(SplitSettings):
    """Defaults are the CBMC fine-tuning pilot's; its pretraining is TASK_DEFAULTS'."""
    lr: float = 2e-3
    max_epochs: int = 15
    batch_size: int = 64
    precision: str = "auto"  # bf16-mixed on cuda and on CPUs with AMX or AVX512-BF16, else 32
    max_seq_len: int = 257  # tokens per cell including <cls>
    mask_ratio: float = 0.4  # pretrain_mgm: fraction of expressed genes masked
    early_stopping_patience: int = 4  # epochs without val improvement; 0 disables
    limit_train_batches: int | None = None  # batches per epoch (tests, smoke runs)
    limit_eval_batches: int | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 50  # linear warmup, then cosine decay to 10% at the last step
    eval_batch_size: int | None = None  # default: 2 x batch_size
    class_weighting: str = "sqrt"  # cross-entropy class weights: none|balanced|sqrt
    grad_clip: float | None = 1.0  # gradient norm clip; null disables
    log_every_n_steps: int = 20  # progress line (and step metrics) every N steps
    include_zero_gene: bool = False  # also sample unexpressed genes as tokens


# Per task, over TrainingSpec's defaults (conf/training/*.yaml may set them again).
TASK_DEFAULTS = {
    "finetune_celltype": {"mask_ratio": 0.0},
    "pretrain_mgm": {"max_epochs": 2, "max_seq_len": 129, "early_stopping_patience": 3,
                     "class_weighting": "none"},
}

# The range of each numeric training setting, as JSON Schema words: the manifest parser checks
# them, and the host shows them in the skills' input schemas and describe_options.
TRAINING_RANGES: dict[str, dict] = {
    **SPLIT_RANGES,
    "lr": {"exclusiveMinimum": 0},
    "max_epochs": {"minimum": 1},
    "batch_size": {"minimum": 1},
    "eval_batch_size": {"minimum": 1},
    "max_seq_len": {"minimum": 2},  # <cls> + one gene
    "mask_ratio": {"minimum": 0, "exclusiveMaximum": 1},
    "early_stopping_patience": {"minimum": 0},
    "limit_train_batches": {"minimum": 1},
    "limit_eval_batches": {"minimum": 1},
    "weight_decay": {"minimum": 0},
    "warmup_steps": {"minimum": 0},
    "grad_clip": {"exclusiveMinimum": 0},
    "log_every_n_steps": {"minimum": 1},
}
CHOICES = {"precision": PRECISIONS, "class_weighting": CLASS_WEIGHTINGS,
           "input_emb_style": INPUT_EMB_STYLES}


def check(m) -> None:
    """The rules across fields, and the architecture's, for a parsed manifest."""
    md = m.model
    for name in ("n_layers", "d_model", "n_heads", "d_hid"):
        v = md.get(name)
        need(v is None or v >= 1, f"model.{name}", f"must be >= 1, got {v}")
    need(md.get("n_bins") is None or md["n_bins"] >= 3, "model.n_bins", "must be >= 3")
    need(md.get("dropout") is None or 0 <= md["dropout"] < 1, "model.dropout",
         "must be in [0, 1)")
    if md.get("d_model") and md.get("n_heads"):
        need(md["d_model"] % md["n_heads"] == 0, "model.n_heads",
             f"must divide model.d_model ({md['d_model']})")
    if m.parent is not None:
        need(m.vocab_path is None, "vocab_path",
             "must be null with a parent checkpoint (the parent's vocab.json is used)")
    if m.task == "pretrain_mgm":
        need(m.training.mask_ratio > 0, "training.mask_ratio", "must be > 0 for pretrain_mgm")
