"""Is a composed config one the host and the trainer accept? `validate_config()` resolves it,
checks every field the schema declares is there, the host's own ranges (the rules table
below) and, with the trainer's own parser, the manifest the host would send: whatever the
trainer would refuse after the debit is refused here, naming the config key that set it.

Struct mode and the schema's types (runner/config/schema.py) have checked keys and types
by then; this is about values.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.config.manifest import build_manifest
from runner.config.overrides import _first_line, _problem, override_key
from runner.config.schema import _schema_paths
from runner.errors import InvalidOverride
from runner.registry.ids import AGENT_ID
from trainers import family as families
from trainers import manifest as contract  # the trainer's settings, declared once

INT_MAX = 2**31 - 1  # caps live in INTEGER columns


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= INT_MAX


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# (field, check, what it must be): the host's own settings. The trainer's (training.*, the
# architecture parent.*, the dataset's format) are the trainer's rules: _check_manifest().
_RULES: list[tuple[str, Any, str]] = [
    ("parent.artifact_id", lambda v: isinstance(v, str) and v != "", "a registry artifact id"),
    ("dataset.artifact_id", lambda v: isinstance(v, str) and v != "", "a registry artifact id"),
    ("sandbox.grace_s", lambda v: _finite(v) and 0 <= v <= 3600, "seconds in [0, 3600]"),
    ("sandbox.max_processes", _positive_int, "an integer >= 1"),
    ("sandbox.tmp_size_gb", lambda v: _finite(v) and v > 0, "a number > 0"),
    ("pricing.price_per_hour", lambda v: _finite(v) and v >= 0, "a number >= 0"),
    ("registry.blob_threshold_mb", lambda v: _finite(v) and v >= 0, "a number >= 0 (MB)"),
    ("registry.dry_run_hash_mb", lambda v: _finite(v) and v >= 0, "a number >= 0 (MB)"),
    ("agent_id", lambda v: v is None or (isinstance(v, str) and bool(AGENT_ID.match(v))),
     f"null or an id matching {AGENT_ID.pattern}"),
    ("wall_time_cap_min", _positive_int, "an integer >= 1 (minutes)"),
    ("vram_cap_gb", _positive_int, "an integer >= 1 (GiB)"),
    ("devices", _positive_int, "an integer >= 1"),
    ("policy.max_wall_time_cap_min", _positive_int, "an integer >= 1"),
    ("policy.max_vram_gb", _positive_int, "an integer >= 1"),
    ("policy.max_devices", _positive_int, "an integer >= 1"),
    ("policy.min_gene_overlap", lambda v: _finite(v) and 0 <= v <= 1, "a fraction in [0, 1]"),
]


def validate_config(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Check resolved values against the rules above; return the resolved plain dict.

    Raises InvalidOverride with `field` (and the override string that set it, when there is
    one among `overrides`).
    """
    by_key = {override_key(line): line for line in overrides or []}
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        raise InvalidOverride(
            f"{key or 'config'}: {_first_line(exc)}", field=key or None,
            override=by_key.get(key), problem="type" if _problem(exc) == "type" else "unresolved",
            fix=f"give {key or 'every key'} a literal value"
                + (" (it is required)" if "Missing mandatory" in str(exc) else "")) from None
    assert isinstance(plain, dict)
    for path in _schema_paths():
        if _get(plain, path, _ABSENT) is _ABSENT:
            raise InvalidOverride(f"{path} is missing from the config", field=path,
                                  override=_deleting(overrides, path), problem="missing",
                                  fix=f"keep {path}: set it to a value instead of deleting it")
    for path, check, must_be in _RULES:
        value = _get(plain, path)
        if not check(value):
            raise InvalidOverride(f"{path} must be {must_be}, got {value!r}", field=path,
                                  override=by_key.get(path), problem="value",
                                  fix=f"set {path} to {must_be}")
    _check_manifest(plain, by_key)
    for name, price in (plain["pricing"].get("per_device") or {}).items():
        if not _finite(price) or price < 0:
            raise InvalidOverride(f"pricing.per_device.{name} must be a number >= 0",
                                  field=f"pricing.per_device.{name}", problem="value",
                                  fix="give a price per device-hour")
    devices = sorted(plain["pricing"].get("per_device") or {})
    if plain["device"] != "auto" and plain["device"] not in devices:
        raise InvalidOverride(
            f"device {plain['device']!r} has no price", field="device",
            override=by_key.get("device"), problem="unknown_option", options=["auto", *devices],
            fix=f"use device=auto or one of {', '.join(devices)}")
    return plain


# Manifest fields (trainers/manifest.py) and the config keys they come from, where the
# names differ (runner/config/manifest.py build_manifest); model.* is parent.*, the rest keep
# theirs.
_MANIFEST_SOURCES = {**{name: f"training.{name}" for name in contract.CONFIG_TRAINING_FIELDS},
                     "dataset.name": "dataset.source",
                     "experiment_name": "tracking.experiment_name"}


def _check_manifest(plain: dict, by_key: dict[str, str], *, final: bool = False,
                    from_parent: bool = False) -> None:
    """Build the manifest the host would send for `plain` and check it with the trainer's
    own parser: what the trainer would refuse after the debit is refused here, naming the
    config key that set it. Until the parent's family and whether there is a parent are
    `final` (the registry may name another family than conf/'s option; the operator may train
    from scratch), a training key of another family and the parent's rules wait for
    check_family()."""
    if not final and (plain["parent"]["family"] or "scgpt") not in families.FAMILIES:
        return  # a registry record naming an unknown family: check_family()'s caller refuses it
    manifest = build_manifest(plain, "dry-run", "cpu", from_parent=from_parent)
    if not final:
        fam = families.get(manifest["family"])
        if manifest["task"] not in fam.tasks and manifest["task"] in contract.TASKS:
            return  # the task of another family: check_family() decides, with the registry's
        own = set(fam.training_keys())
        manifest["training"] = {k: v for k, v in manifest["training"].items() if k in own}
    try:
        contract.parse_manifest(manifest)
    except contract.ManifestError as exc:
        where = exc.field
        path = _MANIFEST_SOURCES.get(where) or (
            f"parent.{where[len('model.'):]}" if where.startswith("model.") else where)
        message = str(exc).split(f"{where}: ", 1)[-1]
        rule = message.split(", got ", 1)[0]
        if rule.startswith("is a setting of family"):  # trainers/manifest.py parse_manifest
            raise InvalidOverride(
                f"{path} {rule}", field=path, override=by_key.get(path), problem="family",
                fix=f"drop {path}: the parent's family is {manifest['family']} "
                    "(describe_options lists each family's keys)") from None
        raise InvalidOverride(f"{path} {rule}, got {_get(plain, path)!r}", field=path,
                              override=by_key.get(path), problem="value",
                              fix=(f"set {path} to {rule.removeprefix('must be ')}"
                                   if rule.startswith("must be ")
                                   else f"change {path} ({rule})")) from None


def check_family(plain: dict, overrides: list[str] | None = None, *,
                 from_parent: bool = True) -> None:
    """The manifest for `plain`, whose parent's family is now known, checked whole: a training
    key of another family is refused, naming the family it belongs to."""
    by_key = {override_key(line): line for line in overrides or []}
    _check_manifest(plain, by_key, final=True, from_parent=from_parent)


_ABSENT = object()


def _get(plain: dict, path: str, default: Any = None) -> Any:
    node: Any = plain
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _deleting(overrides: list[str] | None, path: str) -> str | None:
    for line in overrides or []:
        key = override_key(line)
        if line.startswith("~") and (path == key or path.startswith(key + ".")):
            return line
    return None
