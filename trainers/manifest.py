"""The run manifest: the one input crossing from the host (runner/) into the sandbox.

Plain data, no torch. The host derives its training config schema from the specs here, reads
the exit codes and primary metrics, and checks every manifest it builds with
`parse_manifest()` in the dry run; the trainer reads it with `load_manifest()`. Both return
a `Manifest` or raise `ManifestError`, whose `field` is the dotted path of the offending
entry (e.g. `training.lr`). Unknown fields are errors too, so a typo never goes unnoticed.

Example (every field shown; only task, output_dir and dataset are required; `model` and
`training` hold the settings of the manifest's `family` (trainers/family.py; for scGPT,
trainers/scgpt/settings.py), with the family's pilot values as defaults):

    {
      "manifest_version": 1,
      "family": "scgpt",                      # scgpt | scvi | linear (trainers/family.py)
      "task": "finetune_celltype",            # one of the family's tasks
      "seed": 0,
      "device": "auto",                       # "cpu" | "cuda" | "auto" (default; cuda
                                              # falls back to cpu when no GPU is visible)
      "devices": 1,                           # data-parallel processes (Lightning DDP over
                                              # loopback: gloo on cpu, NCCL on cuda), one
                                              # per GPU on cuda; rank 0 writes the outputs
      "vram_cap_gb": 24,                      # cuda: per-process memory cap (default null)
      "num_threads": null,                    # CPU threads per process; null = the
                                              # CPUs available / devices
      "output_dir": "/job/out",
      "metrics_path": "/job/out/metrics.jsonl",  # metric points as JSON lines, for the
                                              # host to relay (null: output_dir/metrics.jsonl)
      "experiment_name": "scgpt-cbmc",
      "run_name": null,
      "parent": {"checkpoint_dir": "/job/in/parent"},  # the family's folder, or null
      "vocab_path": null,                     # scgpt from scratch only: a vocab.json to use
      "dataset": {"name": "cbmc", "path": "/job/in/dataset", "format": "cbmc_mat",
                  "label_key": null, "gene_key": null, "use_raw": null},
      "model": {"n_layers": 4, "d_model": 64, "n_heads": 2, "d_hid": 128,
                "dropout": 0.0, "n_bins": 51, "input_emb_style": "category"},
      "training": {"lr": 2e-3, "max_epochs": 15, "batch_size": 64, "val_fraction": 0.1,
                   "test_fraction": 0.1, "split_seed": 0, ...},
      "family_code": null                     # an external family (a model's own pinned
                                              # repository): {"path": "/job/in/family",
                                              # "card": {forge-family.yaml as data}}
    }

With a parent checkpoint, the checkpoint decides the architecture: model fields given in the
manifest must equal the parent's (the family's `arch_fields`). A training key of another
family is refused, naming the family whose key it is.

This module is the one declaration of the trainer's contract across families: the manifest's
fields, the exit codes, the tasks and the primary metric per task; each family declares its
settings with their types, ranges and rules. The host derives its config schema
(runner/config/schema.py) from the families and runs `parse_manifest` on the manifest it
would send in every dry run, so whatever the trainer would refuse is refused before any debit.
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
from typing import Any

from trainers import family as families
from trainers.family import FAMILIES

MANIFEST_VERSION = 1
TASKS = ("pretrain_mgm", "pretrain_scvi", "finetune_celltype")  # every family's
FINETUNE = "finetune_celltype"  # scored per cell: the host measures its test metrics
EVAL_TASK = "evaluate_celltype"  # the eval gate's job (EvalManifest), not a training task
DEVICES = ("cpu", "cuda", "auto")
PRECISIONS = ("32", "bf16-mixed", "16-mixed", "auto")  # auto: bf16 where it is fast
DATASET_FORMATS = ("cbmc_mat", "h5ad", "mat", "csv")
SEED_MAX = 2**32 - 1  # numpy's seeds
MAX_DEVICES = 64  # processes of one job on one host (the host's policy.max_devices is lower)
# Manifest fields the host's config keeps with the training settings (config `training.*`).
CONFIG_TRAINING_FIELDS = ("task", "seed", "num_threads")
# The metric a run is judged by, per task: registration needs it, sweeps optimise it.
PRIMARY_METRIC = {"pretrain_mgm": "test_mse", "pretrain_scvi": "test_elbo",
                  "finetune_celltype": "test_macro_f1"}
# How trainers.entrypoint exits, and the reason the host records for each failure.
EXIT_OK, EXIT_ERROR, EXIT_INVALID, EXIT_NAN, EXIT_OOM, EXIT_CHECKPOINT = 0, 1, 2, 3, 4, 5
EXIT_MISSING_DEPENDENCY = 6  # an external family needs a package the job's environment lacks
EXIT_REASONS = {EXIT_INVALID: "invalid_manifest", EXIT_NAN: "nan_loss", EXIT_OOM: "oom",
                EXIT_CHECKPOINT: "invalid_checkpoint",
                EXIT_MISSING_DEPENDENCY: "missing_dependency"}


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


_COMPARE = {"minimum": (">=", lambda v, b: v >= b), "exclusiveMinimum": (">", lambda v, b: v > b),
            "maximum": ("<=", lambda v, b: v <= b), "exclusiveMaximum": ("<", lambda v, b: v < b)}


def in_range(value, bounds: dict) -> bool:
    return value is None or all(_COMPARE[k][1](value, b) for k, b in bounds.items())


def range_text(bounds: dict) -> str:
    """{"minimum": 0, "exclusiveMaximum": 1} -> ">= 0 and < 1"."""
    return " and ".join(f"{_COMPARE[k][0]} {b}" for k, b in bounds.items())


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
    family: str = "scgpt"  # trainers/family.py: whose settings model and training are
    model: dict = field(default_factory=dict)  # the family's architecture keys given
    training: Any = None  # an instance of the family's training dataclass
    family_code: dict | None = None  # external family: {"path": folder, "card": {...}}

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
    families: dict[str, str] = field(default_factory=dict)  # model name -> family (scgpt)
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
    for name, family in m.families.items():
        need(name in m.models, f"families.{name}", "names no model")
        need(family in FAMILIES, f"families.{name}",
             f"must be one of {', '.join(FAMILIES)}, got {family!r}")
    s = m.split
    need(0 <= s.seed <= SEED_MAX, "split.seed", f"must be in [0, {SEED_MAX}]")
    need(0 < s.val_fraction < 1 and 0 < s.test_fraction < 1
         and s.val_fraction + s.test_fraction < 1, "split.test_fraction",
         "fractions must lie in (0, 1) and sum to < 1")
    need(bool(re.fullmatch(r"[0-9a-f]{64}", s.test_sha256)), "split.test_sha256",
         "must be a sha256 hex digest")
    return m


def need(ok: bool, where: str, msg: str) -> None:
    if not ok:
        raise ManifestError(where, msg)


_need = need


def parse_manifest(raw: dict) -> Manifest:
    """The manifest, its model and training read with the settings of its family."""
    if not isinstance(raw, dict):
        raise ManifestError("<root>", f"must be an object, got {_tn(raw)}")
    raw = dict(raw)
    model, training = raw.pop("model", {}), raw.pop("training", {})
    code = raw.pop("family_code", None)
    m = _build(Manifest, raw, "")
    if code is not None:
        m.family_code = _external_family(code, m.family)
    try:
        fam = families.get(m.family)
    except families.UnknownFamily:
        raise ManifestError("family", f"must be one of {', '.join(FAMILIES)}, "
                                      f"got {m.family!r}") from None
    need(m.task in fam.tasks, "task", f"must be one of {', '.join(fam.tasks)} for family "
                                      f"{fam.name}, got {m.task!r}")
    for part, given, spec in (("model", model, fam.architecture),
                              ("training", training, fam.training)):
        if not isinstance(given, dict):
            raise ManifestError(part, f"must be an object, got {_tn(given)}")
        known = [f.name for f in fields(spec)]
        for key in given:
            if key not in known:
                others = [f for f in families.of_key(key) if f != fam.name] \
                    if part == "training" else []
                raise ManifestError(f"{part}.{key}", (
                    f"is a setting of family {', '.join(others)}, not of {fam.name}"
                    if others else "unknown field") + f" (known: {', '.join(known)})")
    m.model = {k: v for k, v in asdict(_build(fam.architecture, model, "model")).items()
               if v is not None}
    task_defaults = {k: v for k, v in fam.task_defaults.get(m.task, {}).items()
                     if k not in training}
    m.training = _build(fam.training, {**task_defaults, **training}, "training")
    _check(m, fam)
    if m.metrics_path is None:
        m.metrics_path = str(Path(m.output_dir) / "metrics.jsonl")
    return m


def _external_family(code: object, name: str) -> dict:
    """`family_code`: the card (plain data) of an external family and the folder holding its
    entry point; the family it declares becomes the one families.get knows for this job
    (Family.from_card, bind_external)."""
    if not isinstance(code, dict) or set(code) != {"path", "card"}:
        raise ManifestError("family_code", "must be an object with path and card")
    need(isinstance(code["path"], str) and code["path"].startswith("/"), "family_code.path",
         "must be an absolute path")
    try:
        fam = families.Family.from_card(code["card"], code["path"])
    except families.CardError as exc:
        raise ManifestError(f"family_code.card.{exc.field}", str(exc)) from None
    need(fam.name == name, "family", f"is {name!r} but the card names {fam.name!r}")
    families.bind_external(fam)
    return code


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


def _check(m: Manifest, fam) -> None:
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

    choice(m.dataset.format, DATASET_FORMATS, "dataset.format")
    need(bool(m.dataset.path), "dataset.path", "must not be empty")
    if m.task == FINETUNE and m.dataset.format in ("h5ad", "csv"):
        need(bool(m.dataset.label_key), "dataset.label_key",
             f"is required to fine-tune on a {m.dataset.format} dataset")

    t = m.training
    for name, bounds in fam.ranges.items():
        value = getattr(t, name)
        need(in_range(value, bounds), f"training.{name}",
             f"must be {range_text(bounds)}, got {value!r}")
    for name, options in fam.choices.items():
        if name in m.model:
            choice(m.model[name], options, f"model.{name}")
        elif hasattr(t, name):
            choice(getattr(t, name), options, f"training.{name}")
    need(t.val_fraction + t.test_fraction < 1, "training.test_fraction",
         "val_fraction + test_fraction must be < 1")
    fam.check(m)


def resolve_model(fam, given: dict, parent_arch: dict | None) -> dict:
    """The architecture to build for family `fam`: the parent's (the manifest must agree on
    the family's arch_fields), else `given` over the family's defaults."""
    given = {k: v for k, v in given.items() if v is not None}
    if parent_arch is None:
        return {**fam.arch_defaults, **given}
    for name in fam.arch_fields:
        if name in given and name in parent_arch and given[name] != parent_arch[name]:
            raise ManifestError(f"model.{name}", f"is {given[name]!r} but the parent "
                                f"{fam.arch_source} has {parent_arch[name]!r}")
    return {**fam.arch_defaults, **parent_arch,
            **{k: v for k, v in given.items() if k not in fam.arch_fields}}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _tn(v) -> str:
    return type(v).__name__
