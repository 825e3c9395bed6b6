"""The run manifest: the one input crossing from the host (runner/) into the sandbox.

Plain data, no torch. The host derives its training config schema from the specs here, reads
the exit codes and primary metrics, and checks every manifest it builds with
`parse_manifest()` in the dry run; the trainer reads it with `load_manifest()`. Both return
a `Manifest` or raise `ManifestError`, whose `field` is the dotted path of the offending
entry (e.g. `training.lr`). Unknown fields are errors too, so a typo never goes unnoticed.

Example (every field shown; only task, output_dir and dataset are required;
the model and training values shown are the defaults, which are the CBMC pilot's:
pretrain 2 epochs at max_seq_len 129, then fine-tune up to 15 epochs at 257, on 2 CPU cores):

    {
      "manifest_version": 1,
      "task": "finetune_celltype",            # or "pretrain_mgm"
      "seed": 0,
      "device": "auto",                       # "cpu" | "cuda" | "auto" (default; cuda
                                              # falls back to cpu when no GPU is visible)
      "devices": 1,                           # data-parallel processes (Lightning DDP over
                                              # loopback: gloo on cpu, NCCL on cuda), one
                                              # per GPU on cuda; rank 0 writes the outputs
      "vram_cap_gb": 24,                      # cuda: per-process memory cap (default null)
      "num_threads": null,                    # torch CPU threads per process; null = the
                                              # CPUs available / devices
      "output_dir": "/job/out",
      "metrics_path": "/job/out/metrics.jsonl",  # metric points as JSON lines, for the
                                              # host to relay (null: output_dir/metrics.jsonl)
      "experiment_name": "scgpt-cbmc",
      "run_name": null,
      "parent": {"checkpoint_dir": "/job/in/parent"},  # scGPT folder, or null: from scratch
      "vocab_path": null,                     # from scratch only: a vocab.json to use (e.g.
                                              # scGPT's default human vocab); null = build
                                              # one from the dataset's genes
      "dataset": {"name": "cbmc", "path": "/job/in/dataset", "format": "cbmc_mat",
                  "label_key": null, "gene_key": null, "use_raw": null},
      "model": {"n_layers": 4, "d_model": 64, "n_heads": 2, "d_hid": 128,
                "dropout": 0.0, "n_bins": 51, "input_emb_style": "category"},
      "training": {"lr": 2e-3, "max_epochs": 15, "batch_size": 64, "precision": "auto",
                   "max_seq_len": 257, "mask_ratio": 0.4, "early_stopping_patience": 4,
                   "val_fraction": 0.1, "test_fraction": 0.1, "split_seed": null,
                   "limit_train_batches": null,
                   "limit_eval_batches": null, "weight_decay": 0.0, "warmup_steps": 50,
                   "eval_batch_size": null, "class_weighting": "sqrt",
                   "grad_clip": 1.0, "log_every_n_steps": 20, "include_zero_gene": false}
    }

With a parent checkpoint its args.json decides the architecture: model fields given in
the manifest must equal the parent's (dropout may differ: it is a training setting).
The parent's vocab.json is the vocabulary; dataset genes outside it are dropped.

This module is the one declaration of the trainer's contract: the settings (`TrainingSpec`,
plus `CONFIG_TRAINING_FIELDS` of `Manifest`) with their types and rules (`_check`), the exit
codes and the primary metric per task. The host derives its config schema
(runner/config/schema.py TrainingConf) from it and runs `parse_manifest` on the manifest it would
send in every dry run, so whatever the trainer would refuse is refused before any debit.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

MANIFEST_VERSION = 1
TASKS = ("pretrain_mgm", "finetune_celltype")
FINETUNE = "finetune_celltype"  # scored per cell: the host measures its test metrics
EVAL_TASK = "evaluate_celltype"  # the eval gate's job (EvalManifest), not a training task
DEVICES = ("cpu", "cuda", "auto")
PRECISIONS = ("32", "bf16-mixed", "16-mixed", "auto")  # auto: bf16 where it is fast
DATASET_FORMATS = ("cbmc_mat", "h5ad", "mat", "csv")
INPUT_EMB_STYLES = ("continuous", "category")
CLASS_WEIGHTINGS = ("none", "balanced", "sqrt")
ARCH_FIELDS = ("n_layers", "d_model", "n_heads", "d_hid", "n_bins", "input_emb_style")
SEED_MAX = 2**32 - 1  # numpy's seeds
MAX_DEVICES = 64  # processes of one job on one host (the host's policy.max_devices is lower)
# Manifest fields the host's config keeps with the training settings (config `training.*`).
CONFIG_TRAINING_FIELDS = ("task", "seed", "num_threads")
# The metric a run is judged by, per task: registration needs it, sweeps optimise it.
PRIMARY_METRIC = {"pretrain_mgm": "test_mse", "finetune_celltype": "test_macro_f1"}
# How trainers.entrypoint exits, and the reason the host records for each failure.
EXIT_OK, EXIT_ERROR, EXIT_INVALID, EXIT_NAN, EXIT_OOM, EXIT_CHECKPOINT = 0, 1, 2, 3, 4, 5
EXIT_REASONS = {EXIT_INVALID: "invalid_manifest", EXIT_NAN: "nan_loss", EXIT_OOM: "oom",
                EXIT_CHECKPOINT: "invalid_checkpoint"}


class ManifestError(ValueError):
    """The manifest is invalid; `field` names the offending entry."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"invalid manifest: {field}: {message}")


@dataclass
class ParentSpec:
    checkpoint_dir: str


@dataclass
class DatasetSpec:
    path: str
    format: str
    name: str = ""
    label_key: str | None = None  # h5ad obs column / csv column / mat key with labels
    gene_key: str | None = None  # h5ad: var column with gene names (default: var_names)
    use_raw: bool | None = None  # h5ad: use .raw (default: when X has negative values)


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


# The CBMC pilot's architecture (see the module docstring): small enough for 2 CPU cores.
MODEL_DEFAULTS = {"n_layers": 4, "d_model": 64, "n_heads": 2, "d_hid": 128, "dropout": 0.0,
                  "n_bins": 51, "input_emb_style": "category"}


# The range of each numeric training setting, as JSON Schema words: validate_manifest checks
# them here, and the host shows them in the skills' input schemas and describe_options.
# None is always allowed for an Optional field. (Rules across fields stay in validate_manifest.)
TRAINING_RANGES: dict[str, dict] = {
    "lr": {"exclusiveMinimum": 0},
    "max_epochs": {"minimum": 1},
    "batch_size": {"minimum": 1},
    "eval_batch_size": {"minimum": 1},
    "max_seq_len": {"minimum": 2},  # <cls> + one gene
    "mask_ratio": {"minimum": 0, "exclusiveMaximum": 1},
    "early_stopping_patience": {"minimum": 0},
    "val_fraction": {"exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "test_fraction": {"exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "split_seed": {"minimum": 0, "maximum": SEED_MAX},
    "limit_train_batches": {"minimum": 1},
    "limit_eval_batches": {"minimum": 1},
    "weight_decay": {"minimum": 0},
    "warmup_steps": {"minimum": 0},
    "grad_clip": {"exclusiveMinimum": 0},
    "log_every_n_steps": {"minimum": 1},
}
_COMPARE = {"minimum": (">=", lambda v, b: v >= b), "exclusiveMinimum": (">", lambda v, b: v > b),
            "maximum": ("<=", lambda v, b: v <= b), "exclusiveMaximum": ("<", lambda v, b: v < b)}


def in_range(value, bounds: dict) -> bool:
    return value is None or all(_COMPARE[k][1](value, b) for k, b in bounds.items())


def range_text(bounds: dict) -> str:
    """{"minimum": 0, "exclusiveMaximum": 1} -> ">= 0 and < 1"."""
    return " and ".join(f"{_COMPARE[k][0]} {b}" for k, b in bounds.items())


@dataclass
class TrainingSpec:
    """Defaults are the CBMC fine-tuning pilot's; its pretraining used max_seq_len 129."""
    lr: float = 2e-3
    max_epochs: int = 15
    batch_size: int = 64
    precision: str = "auto"  # bf16-mixed on cuda and on CPUs with AMX or AVX512-BF16, else 32
    max_seq_len: int = 257  # tokens per cell including <cls>
    mask_ratio: float = 0.4  # pretrain_mgm: fraction of expressed genes masked
    early_stopping_patience: int = 4  # epochs without val improvement; 0 disables
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int | None = None  # the train/val/test split; null: the manifest's seed
    limit_train_batches: int | None = None  # batches per epoch (tests, smoke runs)
    limit_eval_batches: int | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 50  # linear warmup, then cosine decay to 10% at the last step
    eval_batch_size: int | None = None  # default: 2 x batch_size
    class_weighting: str = "sqrt"  # cross-entropy class weights: none|balanced|sqrt
    grad_clip: float | None = 1.0  # gradient norm clip; null disables
    log_every_n_steps: int = 20  # progress line (and step metrics) every N steps
    include_zero_gene: bool = False  # also sample unexpressed genes as tokens


@dataclass
class Manifest:
    task: str
    output_dir: str
    dataset: DatasetSpec
    metrics_path: str | None = None  # None: <output_dir>/metrics.jsonl
    manifest_version: int = MANIFEST_VERSION
    seed: int = 0
    device: str = "auto"
    devices: int = 1
    vram_cap_gb: float | None = None
    num_threads: int | None = None
    experiment_name: str = "forge"
    run_name: str | None = None
    parent: ParentSpec | None = None
    vocab_path: str | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SplitSpec:
    """The held-out cells to evaluate on: the candidate's split, rebuilt from its seed and
    fractions, and refused unless its test cells hash to `test_sha256`."""
    seed: int
    val_fraction: float
    test_fraction: float
    test_sha256: str


@dataclass
class EvalManifest:
    """The eval gate's job: predict the test cells of `split` with each checkpoint folder in
    `models` (name -> folder: candidate, parent, champion). Tokenisation repeats the
    candidate's test pass (seed, max_seq_len, eval_batch_size, include_zero_gene), so every
    model sees the same cells drawn the same way. Writes predictions.json and result.json."""
    output_dir: str
    dataset: DatasetSpec
    split: SplitSpec
    models: dict[str, str]
    manifest_version: int = MANIFEST_VERSION
    task: str = EVAL_TASK
    seed: int = 0
    device: str = "auto"
    vram_cap_gb: float | None = None
    num_threads: int | None = None
    max_seq_len: int = 257
    eval_batch_size: int = 128
    include_zero_gene: bool = False
    precision: str = "auto"
    baseline: bool = False  # also predict with the logistic-regression baseline (as "baseline")

    def to_dict(self) -> dict:
        return asdict(self)


MODEL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_EVAL_MODELS = 4


def sha256_file(path: str | Path) -> str:
    """The digest both sides use for datasets and checkpoints."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(path: str | Path) -> Manifest:
    return parse_manifest(_read_json(path))


def load_eval_manifest(path: str | Path) -> EvalManifest:
    return parse_eval_manifest(_read_json(path))


def _read_json(path: str | Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ManifestError("<file>", f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ManifestError("<file>", f"{path} is not valid JSON: {e}") from None


def parse_eval_manifest(raw: dict) -> EvalManifest:
    m = _build(EvalManifest, raw, "")
    need = _need
    need(m.manifest_version == MANIFEST_VERSION, "manifest_version",
         f"unsupported version {m.manifest_version} (this trainer reads {MANIFEST_VERSION})")
    need(m.task == EVAL_TASK, "task", f"must be {EVAL_TASK}")
    need(m.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}")
    need(0 <= m.seed <= SEED_MAX, "seed", f"must be in [0, {SEED_MAX}]")
    need(bool(m.output_dir), "output_dir", "must not be empty")
    need(m.num_threads is None or m.num_threads >= 1, "num_threads", "must be >= 1")
    need(m.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
    need(m.max_seq_len >= 2, "max_seq_len", "must be >= 2 (<cls> + one gene)")
    need(m.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
    need(m.dataset.format in DATASET_FORMATS, "dataset.format",
         f"must be one of {', '.join(DATASET_FORMATS)}")
    need(1 <= len(m.models) <= MAX_EVAL_MODELS, "models",
         f"must name 1 to {MAX_EVAL_MODELS} checkpoints")
    for name, folder in m.models.items():
        need(bool(MODEL_NAME.match(name)) and name != "baseline", "models",
             f"{name!r} is not a model name")
        need(bool(folder), f"models.{name}", "must not be empty")
    s = m.split
    need(0 <= s.seed <= SEED_MAX, "split.seed", f"must be in [0, {SEED_MAX}]")
    need(0 < s.val_fraction < 1 and 0 < s.test_fraction < 1
         and s.val_fraction + s.test_fraction < 1, "split.test_fraction",
         "fractions must lie in (0, 1) and sum to < 1")
    need(bool(re.fullmatch(r"[0-9a-f]{64}", s.test_sha256)), "split.test_sha256",
         "must be a sha256 hex digest")
    return m


def _need(ok: bool, where: str, msg: str) -> None:
    if not ok:
        raise ManifestError(where, msg)


def parse_manifest(raw: dict) -> Manifest:
    m = _build(Manifest, raw, "")
    _check(m)
    if m.metrics_path is None:
        m.metrics_path = str(Path(m.output_dir) / "metrics.jsonl")
    return m


# ---------------------------------------------------------------- parsing

@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)  # slow, and the host checks a manifest per dry run


def _build(cls, raw, path: str):
    if not isinstance(raw, dict):
        raise ManifestError(path or "<root>", f"must be an object, got {_tn(raw)}")
    hints = _hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ManifestError(_join(path, key), f"unknown field (known: {', '.join(known)})")
    kwargs = {}
    for name, f in known.items():
        where = _join(path, name)
        if name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ManifestError(where, "required field is missing")
            continue
        kwargs[name] = _coerce(hints[name], raw[name], where)
    return cls(**kwargs)


def _coerce(tp, value, where: str):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ManifestError(where, "must not be null")
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if value is None:
        raise ManifestError(where, "must not be null")
    if typing.get_origin(tp) is dict:
        if not isinstance(value, dict):
            raise ManifestError(where, f"must be an object, got {_tn(value)}")
        key_type, value_type = args
        return {_coerce(key_type, k, where): _coerce(value_type, v, _join(where, str(k)))
                for k, v in value.items()}
    if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ManifestError(where, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestError(where, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ManifestError(where, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ManifestError(where, f"must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ManifestError(where, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported manifest type {tp} at {where}")


def _check(m: Manifest) -> None:
    def need(ok: bool, where: str, msg: str):
        if not ok:
            raise ManifestError(where, msg)

    def choice(value, options, where):
        need(value in options, where, f"must be one of {', '.join(options)}, got {value!r}")

    need(m.manifest_version == MANIFEST_VERSION, "manifest_version",
         f"unsupported version {m.manifest_version} (this trainer reads {MANIFEST_VERSION})")
    choice(m.task, TASKS, "task")
    choice(m.device, DEVICES, "device")
    need(1 <= m.devices <= MAX_DEVICES, "devices", f"must be in [1, {MAX_DEVICES}]")
    need(0 <= m.seed <= SEED_MAX, "seed", f"must be in [0, {SEED_MAX}]")
    need(m.vram_cap_gb is None or m.vram_cap_gb > 0, "vram_cap_gb", "must be > 0")
    need(m.num_threads is None or m.num_threads >= 1, "num_threads", "must be >= 1")
    need(bool(m.output_dir), "output_dir", "must not be empty")
    need(m.metrics_path is None or bool(m.metrics_path), "metrics_path", "must not be empty")
    need(bool(m.experiment_name), "experiment_name", "must not be empty")
    if m.parent is not None:
        need(bool(m.parent.checkpoint_dir), "parent.checkpoint_dir", "must not be empty")
        need(m.vocab_path is None, "vocab_path",
             "must be null with a parent checkpoint (the parent's vocab.json is used)")

    choice(m.dataset.format, DATASET_FORMATS, "dataset.format")
    need(bool(m.dataset.path), "dataset.path", "must not be empty")
    if m.task == "finetune_celltype" and m.dataset.format in ("h5ad", "csv"):
        need(bool(m.dataset.label_key), "dataset.label_key",
             f"is required to fine-tune on a {m.dataset.format} dataset")

    md = m.model
    for name in ("n_layers", "d_model", "n_heads", "d_hid"):
        v = getattr(md, name)
        need(v is None or v >= 1, f"model.{name}", f"must be >= 1, got {v}")
    need(md.n_bins is None or md.n_bins >= 3, "model.n_bins", "must be >= 3")
    need(md.dropout is None or 0 <= md.dropout < 1, "model.dropout", "must be in [0, 1)")
    if md.input_emb_style is not None:
        choice(md.input_emb_style, INPUT_EMB_STYLES, "model.input_emb_style")
    if md.d_model and md.n_heads:
        need(md.d_model % md.n_heads == 0, "model.n_heads",
             f"must divide model.d_model ({md.d_model})")

    t = m.training
    for name, bounds in TRAINING_RANGES.items():
        value = getattr(t, name)
        need(in_range(value, bounds), f"training.{name}",
             f"must be {range_text(bounds)}, got {value!r}")
    choice(t.precision, PRECISIONS, "training.precision")
    if m.task == "pretrain_mgm":
        need(t.mask_ratio > 0, "training.mask_ratio", "must be > 0 for pretrain_mgm")
    need(t.val_fraction + t.test_fraction < 1, "training.test_fraction",
         "val_fraction + test_fraction must be < 1")
    choice(t.class_weighting, CLASS_WEIGHTINGS, "training.class_weighting")


def resolve_model(spec: ModelSpec, parent_arch: dict | None) -> dict:
    """Architecture to build: the parent's (manifest must agree), else spec over defaults."""
    given = {k: v for k, v in asdict(spec).items() if v is not None}
    if parent_arch is None:
        return {**MODEL_DEFAULTS, **given}
    for name in ARCH_FIELDS:
        if name in given and name in parent_arch and given[name] != parent_arch[name]:
            raise ManifestError(f"model.{name}", f"is {given[name]!r} but the parent "
                                f"checkpoint's args.json has {parent_arch[name]!r}")
    return {**MODEL_DEFAULTS, **parent_arch, **{k: v for k, v in given.items()
                                                 if k not in ARCH_FIELDS}}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _tn(v) -> str:
    return type(v).__name__
