"""conf/ on disk: where it is, and the options each config group offers.

An option is a .yaml file in conf/<group>/ (hydra/launcher also offers the launchers that
installed plugins register). What is read here is memoised per stamp of the config files,
so an edit to conf/ is seen by the next call.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from runner import settings

# The config groups of conf/ that conf/train.yaml's defaults choose from.
GROUPS = ("parent", "dataset", "training", "sandbox", "tracking", "registry", "pricing")


def config_dir() -> Path:
    return settings.config_dir()


@lru_cache(maxsize=32)
def _group_options(conf: str, group: str, _stamp: tuple) -> tuple[str, ...]:
    folder = Path(conf) / group
    if not folder.is_dir():
        return ()
    return tuple(sorted(p.stem for p in folder.glob("*.yaml")))


def group_options(group: str) -> list[str]:
    """The options of a config group: the .yaml files in conf/<group>/."""
    conf = config_dir()
    return list(_group_options(str(conf), group, _stamp(conf)))


@lru_cache(maxsize=8)
def config_groups(conf: str, stamp: tuple) -> frozenset[str]:
    """The config groups of conf/ (`stamp`: its `_stamp()`): its folders, as Hydra names them
    (`hydra/launcher`)."""
    return frozenset(os.path.relpath(root, conf) for root, _dirs, _files in os.walk(conf)
                     if root != conf)


@lru_cache(maxsize=32)
def _artifact_options(conf: str, group: str, stamp: tuple) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in _group_options(conf, group, stamp):
        node = OmegaConf.load(Path(conf) / group / f"{name}.yaml")
        artifact_id = node.get("artifact_id") if isinstance(node, DictConfig) else None
        if isinstance(artifact_id, str):
            out.setdefault(artifact_id, name)
    return out


def option_for_artifact(group: str, artifact_id: str) -> str | None:
    """The option of `group` (parent, dataset) whose artifact_id is `artifact_id`, if any."""
    conf = config_dir()
    return _artifact_options(str(conf), group, _stamp(conf)).get(artifact_id)


def _stamp(conf: Path) -> tuple:
    """Names, sizes and mtimes of every config file: an edit invalidates what we cached."""
    out = []
    for root, _dirs, files in os.walk(conf):
        for name in files:
            if name.endswith(".yaml"):
                st = os.stat(os.path.join(root, name))
                out.append((root, name, st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


@lru_cache(maxsize=1)
def _installed_launchers() -> tuple[str, ...]:
    """Launchers Hydra and its installed plugins register (basic, submitit_local, ...)."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # imports hydra_plugins.*, which register their configs
    return tuple(name.removesuffix(".yaml")
                 for name in ConfigStore.instance().list("hydra/launcher"))


def launcher_options() -> list[str]:
    """conf/hydra/launcher/ and the launchers installed plugins provide."""
    return sorted({*group_options("hydra/launcher"), *_installed_launchers()})
