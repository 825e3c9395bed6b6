"""The seam every model family implements, and the one registry of families.

A family is a folder under `trainers/` whose `family.py` declares `FAMILY = Family(...)`:

- its settings as plain data: `architecture` (the parent's `model.*` keys; a checkpoint's
  own files decide them when there is a parent) and `training` (the training keys), both
  dataclasses whose defaults are the family's pilot values, `task_defaults` over them per
  task, `ranges` (JSON Schema words) and `choices` for the host's schema and messages, and
  `check(manifest)` for the rules across fields;
- `inspect(checkpoint_dir) -> Inspection`: what the host's dry run and registration may
  know about a checkpoint, from small JSON files only: torch-free and unpickle-free;
- `recipe`: the module, imported inside the jail only, with `train(manifest, state) ->
  result` and `predict(checkpoint_dir, data, cells, options) -> Predicted` (one label per
  held-out cell, for the family-blind gate);
- its tasks with their primary metric, and its MLflow model code (`mlflow_model`, a path in
  the pinned code).

`get(name)` is the one lookup. A family may also come with a model's own pinned repository:
its card `forge-family.yaml` (plain data, `CARD_SCHEMA`) becomes a Family with `from_card`,
the same on the host (dry run) and in the jail, and `bind_external` makes it known to `get`
in the current context only (`external_scope`: one call's plan or launch). The parent's
registry record names the family (the operator or the registry), never a caller string;
this module itself imports no family package, so that the host (runner/), which may import
this module, never does either: a family's `family.py` is loaded by name from `FAMILIES`.
Plain data: no numpy, no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Family name -> the module declaring FAMILY. Adding a family is a folder and a line here.
FAMILIES = {
    "scgpt": "trainers.scgpt.family",
    "scvi": "trainers.scvi.family",
    "linear": "trainers.linear.family",
}
NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used. `field` names the file at fault, with the key
    where there is one (`vocab.json`, `args.json.pre_norm`); the message says what is wrong."""

    def __init__(self, message: str, field: str = "checkpoint"):
        super().__init__(message)
        self.field = field


class NonFiniteLoss(FloatingPointError):
    """Training produced a NaN or infinite loss: the job fails as `nan_loss`."""

    def __init__(self, stage: str, step: int, value: float, where: str = ""):
        self.stage, self.step, self.value = stage, step, value
        super().__init__(f"non-finite {stage} loss ({value}{where}) at global step {step}")


class MissingDependency(ImportError):
    """An external family's card requires a package (an import name) the job's environment
    lacks: the job fails as `missing_dependency`, naming it."""

    def __init__(self, package: str):
        self.package = package
        super().__init__(f"the family requires {package!r}, which this environment lacks")


@dataclass
class SplitSettings:
    """The training keys every family has: the train/val/test split, which the host rebuilds
    to measure the held-out cells itself (runner/jobs/truth.py). A family's `training`
    dataclass extends this one."""
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int | None = None  # the train/val/test split; null: the manifest's seed


SPLIT_RANGES = {"val_fraction": {"exclusiveMinimum": 0, "exclusiveMaximum": 1},
                "test_fraction": {"exclusiveMinimum": 0, "exclusiveMaximum": 1},
                "split_seed": {"minimum": 0, "maximum": 2**32 - 1}}


@dataclass(frozen=True)
class Problem:
    """One reason a checkpoint cannot be used: what (`field`), why, and the reason code
    (unsupported_checkpoint | invalid_checkpoint | vocab_specials | vocab_gaps)."""
    reason: str
    field: str
    message: str


@dataclass
class Inspection:
    """What a checkpoint's small files say, read on the host without torch or unpickling."""
    architecture: dict = field(default_factory=dict)  # in the family's `architecture` names
    genes: list[str] | None = None  # the genes it reads (None: it does not say)
    label_names: list[str] | None = None  # a classifier's classes (None: not a classifier)
    metadata: dict = field(default_factory=dict)  # registry metadata (vocabulary digest, ...)
    problems: list[Problem] = field(default_factory=list)


MAX_JSON_BYTES = 64 * 1024**2  # a whole-human vocab.json is ~1.5 MB


def read_json(path: Path, cap: int = MAX_JSON_BYTES) -> tuple[object, str]:
    """A checkpoint's JSON file and its sha256: not a link, a regular file under `cap`, valid
    JSON (someone else's file: parsed, never executed). CheckpointError names the file."""
    import hashlib
    import json
    import os
    import stat

    path = Path(path)
    try:  # O_NONBLOCK: a FIFO in its place must not hang the reader
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} has no {path.name}", path.name) from None
    except OSError as exc:
        raise CheckpointError(f"{path.name} cannot be read: {exc.strerror}", path.name) from exc
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > cap:
            raise CheckpointError(f"{path.name} is not a regular file under {cap >> 20} MiB",
                                  path.name)
        raw = f.read(cap + 1)
    try:
        return json.loads(raw), hashlib.sha256(raw).hexdigest()
    except ValueError as exc:
        raise CheckpointError(f"{path.name} is not valid JSON: {exc}", path.name) from exc


def gene_overlap(known: list[str] | set[str], genes: list[str], examples: int = 10) -> dict:
    """How many of the dataset's genes a checkpoint reads: count, fraction, unmatched."""
    known = set(known)
    genes = list(dict.fromkeys(genes))
    unmatched = [g for g in genes if g not in known]
    matched = len(genes) - len(unmatched)
    return {"dataset_genes": len(genes), "matched": matched,
            "fraction": round(matched / len(genes), 4) if genes else 0.0,
            "unmatched_examples": unmatched[:examples]}


@dataclass(frozen=True)
class Family:
    name: str
    summary: str
    tasks: dict[str, str]  # task -> primary metric (what registration needs, sweeps optimise)
    architecture: type  # dataclass: the model.* keys, None fields = the parent's or default
    training: type  # dataclass: training keys with the pilot's defaults
    inspect: Callable[[Path], Inspection]
    recipe: str  # module imported in the jail: train(m, state), predict(...)
    mlflow_model: str  # the MLflow model code, relative to the pinned code's root
    checkpoint_files: tuple[str, ...]  # what a checkpoint folder must hold
    framework: str  # registry metadata: the library whose layout the checkpoint follows
    task_defaults: dict[str, dict] = field(default_factory=dict)
    ranges: dict[str, dict] = field(default_factory=dict)  # training key -> JSON Schema bounds
    choices: dict[str, tuple] = field(default_factory=dict)  # key -> allowed strings
    arch_fields: tuple[str, ...] = ()  # architecture keys a manifest must not change
    arch_defaults: dict = field(default_factory=dict)
    arch_source: str = "checkpoint"  # where a parent's architecture is read, for messages
    check: Callable[[Any], None] = lambda m: None  # rules across fields (ManifestError)
    requirements: tuple[str, ...] = ()  # pip packages its MLflow model needs beyond numpy,
    #                                     scipy, scikit-learn, pandas and mlflow
    classifier_task: str | None = "finetune_celltype"  # the task scored per cell
    entry_path: str | None = None  # external family: its entry point file (else `recipe`)
    imports: tuple[str, ...] = ()  # external family: import names the jail checks first

    def training_keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.training))

    def architecture_keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.architecture))

    def defaults(self, task: str) -> dict:
        """The training settings' values for `task` when nothing else sets them."""
        base = {f.name: f.default for f in dataclasses.fields(self.training)}
        return {**base, **self.task_defaults.get(task, {})}

    def load_recipe(self):
        if self.entry_path is None:
            return importlib.import_module(self.recipe)
        return _load_entry_point(Path(self.entry_path))

    @classmethod
    def from_card(cls, card: object, code_dir: str | Path) -> Family:
        """The family an external repository's card declares (plain data, checked against
        CARD_SCHEMA; CardError names the key at fault), with its entry point under
        `code_dir`. Nothing of the repository is imported here."""
        card = check_card(card)
        training, ranges, choices = [], dict(SPLIT_RANGES), {}
        for key, spec in card.get("training", {}).items():
            tp = _CARD_TYPES[spec["type"]]
            default = spec["default"]
            if tp is float and isinstance(default, int):
                default = float(default)
            if not _fits(tp, default):
                raise CardError(f"training.{key}.default", f"must be a {spec['type']}, "
                                                           f"got {default!r}")
            bounds = {k: spec[k] for k in _BOUNDS if k in spec}
            if bounds and tp not in (int, float):
                raise CardError(f"training.{key}", "only an int or float key has a range")
            if bounds:
                ranges[key] = bounds
            if "choices" in spec:
                if tp is not str or default not in spec["choices"]:
                    raise CardError(f"training.{key}.choices", "only a str key has choices, "
                                                               "and they hold its default")
                choices[key] = tuple(spec["choices"])
            training.append((key, tp, field(default=default)))
        name = card["name"]
        return cls(
            name=name, summary=card.get("summary", f"external family {name}"),
            tasks={task: "test_" + metric.removeprefix("test_")
                   for task, metric in card["tasks"].items()},
            architecture=dataclasses.make_dataclass(f"{name}_architecture", []),
            training=dataclasses.make_dataclass(f"{name}_training", training,
                                                bases=(SplitSettings,)),
            inspect=functools.partial(inspect_files, tuple(card["checkpoint_files"])),
            recipe="", mlflow_model="", checkpoint_files=tuple(card["checkpoint_files"]),
            framework=card["framework"], ranges=ranges, choices=choices,
            arch_source=CARD_FILE, entry_path=str(Path(code_dir) / card["entry_point"]),
            imports=tuple(card.get("requirements", ())))


# --- external families: a repository's card ------------------------------------------------------

CARD_FILE = "forge-family.yaml"  # beside the entry point in the repository
MAX_CARD_BYTES = 64 * 1024
MAX_CHECKPOINT_FILE_BYTES = 16 * 1024**3
_CARD_TYPES = {"float": float, "int": int, "str": str, "bool": bool}
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
CARD_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")  # a card's training key
_FILE = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$"  # a plain file name: no folder, no leading dot
CARD_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["name", "entry_point", "tasks", "checkpoint_files", "framework"],
    "properties": {
        "name": {"type": "string", "pattern": NAME.pattern},
        "summary": {"type": "string", "maxLength": 300},
        # a module beside the card: train(manifest, state) -> result, predict(...) optional
        "entry_point": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]{0,99}\.py$"},
        # the tasks it trains and their primary metric (the host measures it: truth.py)
        "tasks": {"type": "object", "minProperties": 1, "additionalProperties": False,
                  "properties": {"finetune_celltype": {"enum": ["macro_f1", "test_macro_f1"]}}},
        "checkpoint_files": {"type": "array", "minItems": 1, "maxItems": 32, "uniqueItems": True,
                             "items": {"type": "string", "pattern": _FILE}},
        "framework": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
        "requirements": {"type": "array", "maxItems": 64, "items": {
            "type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"}},
        "training": {"type": "object", "maxProperties": 64,
                     # not the split keys every family has, nor the manifest's own
                     "propertyNames": {"pattern": CARD_KEY.pattern,
                                       "not": {"enum": ["val_fraction", "test_fraction",
                                                        "split_seed", "task", "seed",
                                                        "num_threads"]}},
                     "additionalProperties": {
                         "type": "object", "additionalProperties": False,
                         "required": ["type", "default"],
                         "properties": {
                             "type": {"enum": list(_CARD_TYPES)},
                             "default": {"type": ["number", "string", "boolean"]},
                             "description": {"type": "string", "maxLength": 500},
                             "choices": {"type": "array", "minItems": 1, "maxItems": 64,
                                         "items": {"type": "string"}},
                             **{b: {"type": "number"} for b in _BOUNDS}}}},
    },
}


class CardError(ValueError):
    """A card that is not a family: `field` names the key at fault."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{CARD_FILE}: {field}: {message}")


def check_card(card: object) -> dict:
    """The card, checked against CARD_SCHEMA and the built-in names; CardError otherwise."""
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(CARD_SCHEMA).iter_errors(card),
                    key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.absolute_path) or "<root>"
        raise CardError(where, first.message[:300])
    if card["name"] in FAMILIES:
        raise CardError("name", f"{card['name']!r} is a built-in family's name")
    return card


def _fits(tp: type, value: object) -> bool:
    if tp is float:
        return isinstance(value, float) and value == value and abs(value) != float("inf")
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def inspect_files(names: tuple[str, ...], folder: Path) -> Inspection:
    """An external family's checkpoint, as the host may see it: each named file is there as a
    regular file (not a link, not a FIFO) under MAX_CHECKPOINT_FILE_BYTES. Nothing is read."""
    import os
    import stat

    sizes = {}
    for name in names:
        try:
            info = os.lstat(Path(folder) / name)
        except OSError:
            raise CheckpointError(f"{folder} has no {name}", name) from None
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_CHECKPOINT_FILE_BYTES:
            raise CheckpointError(f"{name} is not a regular file under "
                                  f"{MAX_CHECKPOINT_FILE_BYTES >> 30} GiB", name)
        sizes[name] = info.st_size
    return Inspection(metadata={"files": sizes})


def _load_entry_point(path: Path):
    """An external family's entry point, imported from its file (in the jail only); its folder
    goes last on sys.path, so its own modules import but never shadow `trainers`."""
    import importlib.util
    import sys

    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.append(folder)
    spec = importlib.util.spec_from_file_location(f"forge_external_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class UnknownFamily(ValueError):
    def __init__(self, name: object):
        self.name = name
        super().__init__(f"no family {name!r} (families: {', '.join(FAMILIES)})")


def get(name: str) -> Family:
    """The family called `name`: the external family bound in this context (external_scope)
    when it has that name, else a built-in one loaded from its folder; UnknownFamily
    otherwise."""
    bound = _bound.get()
    if bound is not None and bound.name == name:
        return bound
    if not isinstance(name, str) or name not in FAMILIES:
        raise UnknownFamily(name)
    return _load(name)


_loaded: dict[str, Family] = {}
# The external family of the call in progress, by context, never by process: two repositories
# whose cards share a name, planned at once in one process (forge serve), each see their own.
_bound: ContextVar[Family | None] = ContextVar("forge_external_family", default=None)


@contextmanager
def external_scope(fam: Family | None = None):
    """A scope (a plan, a launch, a registration) in which `fam`, or what bind_external binds
    later in it, is the external family get() knows; on leaving, what was before."""
    token = _bound.set(None if fam is None else _checked(fam))
    try:
        yield
    finally:
        _bound.reset(token)


def bind_external(fam: Family) -> Family:
    """Make an external family (Family.from_card) the one get() knows in this context: within
    an external_scope on the host; for the whole job in the jail (one job per process)."""
    _bound.set(_checked(fam))
    return fam


def _checked(fam: Family) -> Family:
    if fam.name in FAMILIES:
        raise CardError("name", f"{fam.name!r} is a built-in family's name")
    return fam


def _load(name: str) -> Family:
    if name not in _loaded:
        found = importlib.import_module(FAMILIES[name]).FAMILY
        assert found.name == name, f"{FAMILIES[name]} declares {found.name!r}, not {name!r}"
        _loaded[name] = found
    return _loaded[name]


def all_families() -> list[Family]:
    return [get(name) for name in FAMILIES]


def of_key(key: str) -> list[str]:
    """The families with a training key called `key` (for 'a key of another family')."""
    return [f.name for f in all_families() if key in f.training_keys()]
