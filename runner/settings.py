"""Where things live. Everything lives under one home: FORGE_HOME, else the folder the nearest
forge.toml (walking up from the working directory) names; else no home, and a clear error."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from runner.errors import NoForgeHome

CHECKOUT = Path(__file__).resolve().parents[1]  # the repository this package runs from
HOME_FILE = "forge.toml"  # marks a forge home: `home = "outputs"`, relative to its folder


def config_dir() -> Path:
    """conf/ at the repository root, or FORGE_CONFIG_DIR."""
    env = os.environ.get("FORGE_CONFIG_DIR")
    return (Path(env) if env else CHECKOUT / "conf").resolve()


def code_repo() -> Path:
    """FORGE_CODE_REPO, else the checkout this package lives in."""
    env = os.environ.get("FORGE_CODE_REPO")
    return Path(env) if env else CHECKOUT


def find_home_file(start: Path | None = None) -> Path | None:
    """The nearest forge.toml in `start` (the working directory) or a folder above it."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / HOME_FILE).is_file():
            return folder / HOME_FILE
    return None


def home_from_file(path: Path) -> Path:
    """The home a forge.toml names: its `home` key (default "outputs"), relative to its folder."""
    try:
        home = tomllib.loads(path.read_text()).get("home", "outputs")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise NoForgeHome(f"cannot read {path}: {exc}", field="forge.toml",
                          fix=f'make {path} valid TOML, e.g. home = "outputs"') from exc
    if not isinstance(home, str) or not home:
        raise NoForgeHome(f"{path}: home must be a folder name, not {home!r}", field="home",
                          fix=f'write home = "outputs" in {path}')
    return (path.parent / home).resolve()


def forge_home() -> Path:
    """FORGE_HOME; else the home of the nearest forge.toml; else NoForgeHome (never a guess:
    a guessed home would get an empty registry of its own)."""
    env = os.environ.get("FORGE_HOME")
    if env:
        return Path(env).resolve()
    found = find_home_file()
    if found is None:
        raise NoForgeHome(
            f"no forge home here: FORGE_HOME is not set and no {HOME_FILE} is in "
            f"{Path.cwd()} or a folder above it",
            fix="run `forge init [DIR]`, cd into a forge home, or set FORGE_HOME")
    return home_from_file(found)


def db_url() -> str:
    """FORGE_DB_URL, else the SQLite registry in the home."""
    return os.environ.get("FORGE_DB_URL") or sqlite_url(forge_home())


def sqlite_url(home: Path) -> str:
    return f"sqlite:///{home / 'forge.db'}"


def db_lock_timeout_s() -> float:
    """How long a registry statement waits for a lock another session holds before it fails
    (SQLite busy timeout, PostgreSQL lock_timeout): FORGE_DB_LOCK_TIMEOUT_S, else 60."""
    try:
        value = float(os.environ.get("FORGE_DB_LOCK_TIMEOUT_S") or 60)
    except ValueError:
        value = 60.0
    return value if value > 0 else 60.0


def cache_dir() -> Path:
    return Path(os.environ.get("FORGE_CACHE_DIR") or forge_home() / "cache").resolve()
