"""One home (issue 27): FORGE_HOME, else the nearest forge.toml walking up from the working
directory, else a typed refusal; `forge init` makes a home; no command creates a registry by
accident (a SQLite registry that is not there is a typed error naming its path).

The CLI runs as a person runs it: `.venv/bin/forge` in a real subprocess, from folders
outside this checkout, with no FORGE_* variable set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner import settings
from runner.errors import ForgeError, NoForgeHome
from runner.registry import db

FORGE = str(Path(sys.executable).with_name("forge"))


def _env() -> dict:
    """The environment of a person who set nothing forge-specific."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env


def forge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([FORGE, *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=120)


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- settings.forge_home() --------------------------------------------------------------------

@pytest.fixture
def no_forge_env(monkeypatch):
    for name in ("FORGE_HOME", "FORGE_DB_URL", "FORGE_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_forge_home_wins_over_a_forge_toml(tmp_path, monkeypatch, no_forge_env):
    (tmp_path / "forge.toml").write_text('home = "elsewhere"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "set"))
    assert settings.forge_home() == tmp_path / "set"


def test_the_nearest_forge_toml_above_the_cwd_names_the_home(tmp_path, monkeypatch,
                                                             no_forge_env):
    (tmp_path / "forge.toml").write_text('home = "data/forge"\n')
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "forge.toml").write_text("# home defaults to outputs\n")
    monkeypatch.chdir(tmp_path / "a" / "b")
    assert settings.forge_home() == tmp_path / "a" / "outputs"  # the nearest one
    monkeypatch.chdir(tmp_path)
    assert settings.forge_home() == tmp_path / "data" / "forge"  # relative to its folder
    assert settings.db_url() == f"sqlite:///{tmp_path / 'data' / 'forge' / 'forge.db'}"
    monkeypatch.setenv("FORGE_DB_URL", "sqlite:////elsewhere/forge.db")
    assert settings.db_url() == "sqlite:////elsewhere/forge.db"  # still the override


def test_no_home_is_a_typed_refusal_saying_how_to_make_one(tmp_path, monkeypatch,
                                                           no_forge_env):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NoForgeHome) as err:
        settings.forge_home()
    assert err.value.reason == "no_forge_home" and str(tmp_path) in str(err.value)
    assert "forge init" in err.value.fix and "FORGE_HOME" in err.value.fix
    with pytest.raises(NoForgeHome):
        settings.db_url()
    with pytest.raises(NoForgeHome):
        settings.cache_dir()
    assert settings.config_dir() == settings.CHECKOUT / "conf"  # conf/ is the checkout's


@pytest.mark.parametrize("text", ["home = [1, 2]\n", "home = \n", 'home = ""\n'])
def test_a_broken_forge_toml_is_a_typed_error(tmp_path, monkeypatch, no_forge_env, text):
    (tmp_path / "forge.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NoForgeHome) as err:
        settings.forge_home()
    assert "forge.toml" in str(err.value) and "home" in err.value.fix


# --- no registry by accident --------------------------------------------------------------------

def test_a_missing_sqlite_registry_is_refused_and_never_created(tmp_path):
    path = tmp_path / "nowhere" / "forge.db"
    url = f"sqlite:///{path}"
    with pytest.raises(db.RegistryMissing) as err:
        db.get_engine(url)
    assert err.value.reason == "no_registry" and str(path) in str(err.value)
    assert f"forge db upgrade` (creates {path})" in err.value.fix and "forge init" in \
        err.value.fix
    with pytest.raises(db.RegistryMissing), db.transaction(url=url):
        pass
    assert not path.exists() and not path.parent.exists()  # not even its folder


def test_the_registry_is_created_on_purpose_by_upgrade(tmp_path):
    url = f"sqlite:///{tmp_path / 'made' / 'forge.db'}"
    try:
        assert db.upgrade(url) == db.current_revision(url)
        assert (tmp_path / "made" / "forge.db").is_file()
    finally:
        db.get_engine(url).dispose()
        db._engine.cache_clear()


def test_an_unmigrated_registry_names_what_forge_db_upgrade_would_migrate(tmp_path,
                                                                           monkeypatch):
    import sqlalchemy as sa

    monkeypatch.setenv("FORGE_DB_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    typed = db.unavailable(sa.exc.OperationalError("SELECT 1", {}, Exception("no such table")))
    assert typed is not None and "forge db upgrade" in typed.fix
    assert str(tmp_path / "empty.db") in typed.fix


# --- the CLI, as a person runs it -------------------------------------------------------------

@pytest.mark.parametrize("args", [("models", "list"), ("db", "upgrade"), ("datasets", "list"),
                                  ("tools", "calls"), ("ledger", "balance", "a1")])
def test_forge_outside_any_home_refuses_and_writes_nothing(tmp_path, args):
    out = forge(*args, cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: NoForgeHome: "), out.stderr
    assert "forge init" in lines[0] and "Traceback" not in out.stderr
    assert _tree(tmp_path) == []  # no outputs/, no forge.db


def test_the_demo_outside_any_home_refuses_and_writes_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "runner.demo", "smoke"], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "NoForgeHome" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and _tree(tmp_path) == []


def test_forge_init_makes_a_home_that_commands_below_it_find(tmp_path):
    out = forge("init", "proj", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    home = tmp_path / "proj"
    assert (home / "forge.toml").read_text().splitlines()[-1] == 'home = "outputs"'
    assert (home / "outputs" / "forge.db").is_file()
    assert out.stdout.splitlines()[-1] == f"next: cd {home} && forge datasets list"

    listed = forge("models", "list", cwd=home)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0] == "no models registered yet"
    assert listed.stdout.splitlines()[-1].startswith("next: ")
    (home / "deep" / "er").mkdir(parents=True)
    below = forge("datasets", "list", "--json", cwd=home / "deep" / "er")
    assert below.returncode == 0 and below.stdout.strip() == "[]", below.stderr
    assert _tree(home / "deep") == ["er"]  # nothing written where it ran

    again = forge("init", str(home), cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "Conflict" in again.stderr


def test_a_home_whose_registry_is_gone_says_which_path_and_how_to_create_it(tmp_path):
    (tmp_path / "forge.toml").write_text('home = "store"\n')
    out = forge("models", "show", "model-x", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    path = tmp_path / "store" / "forge.db"
    assert out.stderr.startswith(f"error: RegistryMissing: no registry at {path}")
    assert f"forge db upgrade` (creates {path})" in out.stderr
    assert not (tmp_path / "store").exists()
    made = forge("db", "upgrade", cwd=tmp_path)
    assert made.returncode == 0 and path.is_file(), made.stderr
    assert made.stdout.startswith(f"registry {path} at revision ")


def test_the_cli_exports_the_home_it_found_and_puts_the_environment_back(tmp_path, monkeypatch,
                                                                         no_forge_env):
    """The home found through forge.toml is FORGE_HOME for the command (conf/'s
    ${oc.env:FORGE_HOME} and the processes a command starts agree with it), and only for it."""
    from click.testing import CliRunner

    from runner.cli import main

    (tmp_path / "forge.toml").write_text('home = "h"\n')
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    db.upgrade(settings.sqlite_url(tmp_path / "h"))
    try:
        result = CliRunner().invoke(main, ["tools", "calls", "--json"])
        assert result.exit_code == 0, result.output
        assert "FORGE_HOME" not in os.environ
    finally:
        db._engine.cache_clear()


def test_forge_errors_stay_typed(tmp_path, monkeypatch, no_forge_env):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ForgeError):
        db.get_engine()


def test_the_config_puts_runs_and_tracking_in_the_found_home_from_any_folder(
        tmp_path, monkeypatch, no_forge_env):
    """conf/ names the home through `${forge_home:}` (runner.settings), not `./outputs` of the
    working directory: forge-train and the Python API from a subfolder of a home (or a home
    whose forge.toml names another folder) write where `forge` reads."""
    from runner.config import compose

    (tmp_path / "forge.toml").write_text('home = "data/forge"\n')
    (tmp_path / "deep" / "er").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "deep" / "er")
    cfg = compose.compose_config([])
    home = tmp_path / "data" / "forge"
    assert cfg.tracking.tracking_uri == f"sqlite:///{home}/mlflow.db"
    assert cfg.tracking.artifact_root == f"{home}/mlartifacts"
    assert _tree(tmp_path / "deep") == ["er"]  # nothing written where it ran
