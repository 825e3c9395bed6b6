"""Where things live. Everything defaults under FORGE_HOME (./outputs)."""

from __future__ import annotations

import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]  # the repository this package runs from


def config_dir() -> Path:
    """conf/ at the repository root, or FORGE_CONFIG_DIR."""
    env = os.environ.get("FORGE_CONFIG_DIR")
    return (Path(env) if env else CHECKOUT / "conf").resolve()


def code_repo() -> Path:
    """FORGE_CODE_REPO, else the checkout this package lives in."""
    env = os.environ.get("FORGE_CODE_REPO")
    return Path(env) if env else CHECKOUT


def forge_home() -> Path:
    return Path(os.environ.get("FORGE_HOME", "outputs")).resolve()


def db_url() -> str:
    return os.environ.get("FORGE_DB_URL") or f"sqlite:///{forge_home() / 'forge.db'}"


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
