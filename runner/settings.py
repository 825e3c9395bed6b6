"""Where things live. Everything defaults under FORGE_HOME (./outputs)."""

from __future__ import annotations

import os
from pathlib import Path


def forge_home() -> Path:
    return Path(os.environ.get("FORGE_HOME", "outputs")).resolve()


def db_url() -> str:
    return os.environ.get("FORGE_DB_URL") or f"sqlite:///{forge_home() / 'forge.db'}"


def cache_dir() -> Path:
    return Path(os.environ.get("FORGE_CACHE_DIR") or forge_home() / "cache").resolve()
