"""train_model_version(dry_run=True): validate -> compose -> pin code -> estimate, no launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import git
import pytest
import sqlalchemy as sa
from helpers import count_rows, stand_in_weights

from runner import api, tools
from runner.errors import (
    CapOutOfPolicy,
    CodePinError,
    InvalidArtifactId,
    InvalidInput,
    InvalidOverride,
)
from runner.jobs import codepin
from runner.registry import catalog, db, ledger
from runner.registry.schema import tool_calls

PARENT, DATASET, OTHER_DATASET = ("model-scgpt-cbmc-base", "dataset-geo-GSE100866",
                                  "dataset-10x-pbmc68k-reduced")
FORGE_TRAIN = [sys.executable, "-c", "from runner.train_app import main; main()"]
MOVEMENT = ("resource_allocations", "token_ledger", "token_accounts", "artifacts",
            "model_versions", "events")


def citation(fmt: str, sha: str) -> dict:
    return {"source": "test", "external_id": "x", "url": "https://example.org/data",
            "license": "CC0", "format": fmt, "row_count": 10, "schema_summary": "cells x genes",
            "sha256": sha}


@pytest.fixture
def code_repo(tmp_path, monkeypatch) -> git.Repo:
    """A clean checkout with one commit and an origin; FORGE_CODE_REPO points at it."""
    path = tmp_path / "code"
    repo = git.Repo.init(path, initial_branch="main")
    (path / "train.py").write_text("print('train')\n")
    repo.index.add(["train.py"])
    repo.index.commit("initial", author=git.Actor("t", "t@example.org"),
                      committer=git.Actor("t", "t@example.org"))
    repo.create_remote("origin", "https://example.org/forge-runner.git")
    monkeypatch.setenv("FORGE_CODE_REPO", str(path))
    return repo


@pytest.fixture
def registry(db_url, code_repo):
    """Parent model, two datasets and agent a1 with 10 credits."""
    catalog.register_model(artifact_id=PARENT, title="scGPT CBMC base", created_by="test",
                           metadata={"family": "scgpt", "framework": "scgpt"})
    stand_in_weights(PARENT)
    from runner.jobs.datasets import builtin_citation

    catalog.register_dataset(DATASET, "CBMC", builtin_citation("cbmc"))
    catalog.register_dataset(OTHER_DATASET, "PBMC 68k", builtin_citation("pbmc68k_reduced"))
    ledger.grant("a1", "10")
    return db_url


def dry(parent=PARENT, dataset=DATASET, **kw) -> dict:
    kw.setdefault("agent_id", "a1")
    kw.setdefault("dry_run", True)
    return api.train_model_version(parent, dataset, **kw)


def audit_rows(url) -> list[dict]:
    with db.get_engine(url).connect() as conn:
        return [dict(r) for r in conn.execute(
            sa.select(tool_calls).order_by(tool_calls.c.created_at)).mappings()]


def movement(url) -> dict:
    rows = count_rows(url)
    return {k: rows[k] for k in MOVEMENT}


# --- the happy path -------------------------------------------------------------------------------

def test_dry_run_would_launch_and_writes_only_its_audit_row(registry, code_repo):
    before = count_rows(registry)
    result = dry()
    assert result["would_launch"] is True and result["reasons"] == []
    assert result["estimate"] == {"amount": "1.00", "currency": "credits",
                                  "price_per_hour": "0.50", "hours": "2.00", "devices": 1,
                                  "device": "cpu"}  # money: decimal strings, JSON-safe
    assert Decimal(result["balance"]["amount"]) == Decimal("10")
    assert result["balance"]["currency"] == "credits"
    assert result["code"]["sha"] == code_repo.head.commit.hexsha
    assert result["code"]["dirty"] is False
    assert result["code"]["repo_url"] == "https://example.org/forge-runner.git"
    config = result["config"]
    assert config["parent"]["artifact_id"] == PARENT and config["agent_id"] == "a1"
    assert config["training"]["task"] == "finetune_celltype" and config["dry_run"] is True
    json.dumps(result)  # plain data all the way down
    assert "argv" not in result["sandbox"] and "sandbox" not in config  # bulk: verbose only
    caps = result["sandbox"]["caps"]  # SIGTERM, then the grace period, within the 2 h cap
    assert caps["wall_time_s"] + caps["grace_s"] == 7200.0 and caps["grace_s"] == 10.0
    assert len(result["request_key"]) == 64
    after = count_rows(registry)
    assert after["tool_calls"] == before["tool_calls"] + 1
    assert {k: v for k, v in after.items() if k != "tool_calls"} == \
        {k: v for k, v in before.items() if k != "tool_calls"}
    call = audit_rows(registry)[-1]
    assert call["success"] is True and call["agent_id"] == "a1"
    assert call["input_params"]["dry_run"] is True
    assert call["output_summary"]["would_launch"] is True
    assert call["output_summary"]["estimate"]["amount"] == "1.00"
    assert "config" not in call["output_summary"] and call["duration_ms"] >= 0
    argv = dry(verbose=True)["sandbox"]["argv"]  # the bulk, when asked for
    assert argv[-2:] == ["trainers.entrypoint", "/job/in/manifest.json"]


def test_overrides_training_config_and_group_choice_by_artifact_id(registry):
    result = dry(dataset=OTHER_DATASET, overrides=["training=pretrain_mgm", "training.lr=1e-4"],
                 training_config={"training": {"max_epochs": 2}}, wall_time_cap_min=30,
                 vram_cap_gb=40)
    config = result["config"]
    assert config["dataset"]["format"] == "h5ad" and config["dataset"]["label_key"] == \
        "bulk_labels"
    assert config["training"]["task"] == "pretrain_mgm"
    assert config["training"]["lr"] == pytest.approx(1e-4)
    assert config["training"]["max_epochs"] == 2
    assert config["wall_time_cap_min"] == 30 and config["vram_cap_gb"] == 40
    assert Decimal(result["estimate"]["amount"]) == Decimal("0.25") and result["would_launch"]


def test_device_prices(registry):
    result = dry(device="h200", wall_time_cap_min=60)
    assert result["estimate"]["price_per_hour"] == "3.00"
    assert result["estimate"]["amount"] == "3.00"
    # This host has no H200: the job would run (and be billed) on something else, so no.
    assert not result["would_launch"]
    assert [r["reason"] for r in result["reasons"]] == ["device_unavailable"]


def test_request_key_ignores_volatile_fields_and_tracks_the_rest(registry):
    key = dry()["request_key"]
    assert dry()["request_key"] == key
    assert dry(allow_dirty=True)["request_key"] == key  # a clean tree: nothing else changes
    assert dry(overrides=["training.lr=1e-4"])["request_key"] != key
    assert dry(wall_time_cap_min=60)["request_key"] != key


def test_registry_architecture_for_parents_without_a_conf_option(registry):
    catalog.register_model(
        artifact_id="model-scgpt-wide", title="wide", created_by="test",
        metadata={"family": "scgpt", "framework": "scgpt",
                  "architecture": {"n_layers": 2, "d_model": 64, "n_heads": 8}})
    stand_in_weights("model-scgpt-wide")
    result = dry(parent="model-scgpt-wide")
    parent = result["config"]["parent"]
    assert parent["artifact_id"] == "model-scgpt-wide" and parent["family"] == "scgpt"
    assert parent["d_model"] == 64 and parent["n_heads"] == 8 and parent["n_layers"] == 2
    assert result["would_launch"]


# --- requests that would not launch: reasons, no movement -----------------------------------------

def reasons(result) -> dict:
    return {r["reason"]: r for r in result["reasons"]}


def test_unknown_agent(registry):
    before = movement(registry)
    result = dry(agent_id="ghost")
    assert result["would_launch"] is False and result["balance"] is None
    assert reasons(result)["unknown_agent"]["field"] == "agent_id"
    assert movement(registry) == before


def test_insufficient_balance(registry):
    ledger.grant("poor", "0.40")
    before = movement(registry)
    result = dry(agent_id="poor")
    r = reasons(result)["insufficient_balance"]
    assert result["would_launch"] is False
    assert r["balance"] == "0.400000" and r["estimate"] == "1.00"
    assert movement(registry) == before


@pytest.mark.parametrize("kw,field", [
    (dict(wall_time_cap_min=1441), "wall_time_cap_min"),
    (dict(wall_time_cap_min=10**9), "wall_time_cap_min"),
    (dict(vram_cap_gb=500), "vram_cap_gb"),
    (dict(devices=9), "devices"),
])
def test_caps_over_policy(registry, kw, field):
    before = movement(registry)
    result = dry(**kw)
    r = reasons(result)["cap_out_of_policy"]
    assert r["field"] == field and result["would_launch"] is False
    assert movement(registry) == before


@pytest.mark.parametrize("kw,field", [
    (dict(wall_time_cap_min=-5), "wall_time_cap_min"),
    (dict(wall_time_cap_min=0), "wall_time_cap_min"),
    (dict(wall_time_cap_min=1.5), "wall_time_cap_min"),
    (dict(wall_time_cap_min="120"), "wall_time_cap_min"),
    (dict(wall_time_cap_min=True), "wall_time_cap_min"),
    (dict(wall_time_cap_min=None), "wall_time_cap_min"),
    (dict(wall_time_cap_min=10**30), "wall_time_cap_min"),
    (dict(vram_cap_gb=0), "vram_cap_gb"),
    (dict(vram_cap_gb=-24), "vram_cap_gb"),
    (dict(vram_cap_gb=2.5), "vram_cap_gb"),
    (dict(devices=0), "devices"),
])
def test_malformed_caps_raise_naming_the_field(registry, kw, field):
    before = movement(registry)
    with pytest.raises(CapOutOfPolicy) as info:
        dry(**kw)
    assert info.value.field == field
    assert movement(registry) == before
    call = audit_rows(registry)[-1]
    assert call["success"] is False and call["error_code"] == "cap_out_of_policy"


def test_missing_and_mistyped_artifacts(registry):
    result = dry(parent="model-nope", dataset=PARENT)
    r = reasons(result)
    assert r["not_found"]["field"] == "parent_artifact_id"
    assert r["wrong_artifact_type"]["field"] == "dataset_artifact_id"
    assert result["would_launch"] is False


@pytest.mark.parametrize("parent", ["../etc/passwd", "", "a b", None, "x" * 200])
def test_malformed_artifact_ids_raise(registry, parent):
    before = movement(registry)
    with pytest.raises(InvalidArtifactId):
        dry(parent=parent)
    assert movement(registry) == before


@pytest.mark.parametrize("kw,problem", [
    (dict(training_config={"training": {"learning_rate": 1}}), "unknown_key"),
    (dict(training_config={"trainer": {"lr": 1}}), "unknown_key"),
    (dict(overrides=["training.lrr=1"]), "unknown_key"),
    (dict(overrides=["training.lr=abc"]), "type"),
    (dict(overrides=["wall_time_cap_min=60"]), "argument"),
    (dict(overrides=["parent=scgpt_cbmc_base"]), "argument"),
    (dict(training_config={"agent_id": "someone-else"}), "argument"),
    (dict(overrides="training.lr=1"), "type"),
])
def test_bad_config_input_raises_invalid_override(registry, kw, problem):
    before = movement(registry)
    with pytest.raises(InvalidOverride) as info:
        dry(**kw)
    assert info.value.details["problem"] == problem
    assert movement(registry) == before


@pytest.mark.parametrize("kw", [dict(agent_id=None), dict(agent_id="sys:x"),
                                dict(dry_run="yes"), dict(budget=3)])
def test_other_malformed_arguments(registry, kw):
    with pytest.raises(InvalidInput):
        dry(**kw)


def test_dirty_tree_is_a_reason_unless_allowed(registry, code_repo):
    clean_key = dry()["request_key"]
    Path(code_repo.working_tree_dir, "train.py").write_text("print('changed')\n")
    result = dry()
    r = reasons(result)["dirty_tree"]
    assert r["field"] == "allow_dirty" and result["code"]["dirty"] is True
    assert r["diff_sha256"] == result["code"]["diff_sha256"]
    allowed = dry(allow_dirty=True)
    assert allowed["would_launch"] is True and allowed["request_key"] != clean_key
    Path(code_repo.working_tree_dir, "train.py").write_text("print('changed again')\n")
    assert dry(allow_dirty=True)["request_key"] != allowed["request_key"]


def test_code_commit_pins_an_earlier_commit_even_on_a_dirty_tree(registry, code_repo):
    first = code_repo.head.commit.hexsha
    Path(code_repo.working_tree_dir, "train.py").write_text("print('v2')\n")
    code_repo.index.add(["train.py"])
    code_repo.index.commit("v2", author=git.Actor("t", "t@x"), committer=git.Actor("t", "t@x"))
    Path(code_repo.working_tree_dir, "train.py").write_text("print('uncommitted')\n")
    result = dry(code_commit=first[:12])
    assert result["would_launch"] is True, result["reasons"]
    assert result["code"] == {**result["code"], "sha": first, "dirty": False,
                              "diff_sha256": None}
    assert result["request_key"] != dry(code_commit=code_repo.head.commit.hexsha)["request_key"]
    assert reasons(dry())["dirty_tree"]  # without code_commit: HEAD plus the dirty tree


def test_bad_code_commit_is_a_reason_naming_the_field(registry):
    r = reasons(dry(code_commit="0" * 40))["unknown_commit"]
    assert r["field"] == "code_commit" and "git log" in r["fix"]


@pytest.mark.parametrize("sha", ["main", "ABCDEF1", 7])
def test_malformed_code_commit_raises_naming_the_field(registry, sha):
    with pytest.raises(InvalidInput) as info:  # the declaration's pattern: 7-40 lowercase hex
        dry(code_commit=sha)
    assert info.value.field == "code_commit"


def test_not_a_git_repo_is_a_reason(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(tmp_path / "plain"))
    (tmp_path / "plain").mkdir()
    r = reasons(dry())
    assert r["not_a_git_repo"]["fix"]


def test_code_pin(tmp_path):
    with pytest.raises(CodePinError) as info:
        codepin.pin_code(tmp_path)
    assert info.value.reason == "not_a_git_repo"
    git.Repo.init(tmp_path / "empty")
    with pytest.raises(CodePinError) as info:
        codepin.pin_code(tmp_path / "empty")
    assert info.value.reason == "no_commit" and "commit" in info.value.fix


def test_code_pin_without_origin_uses_the_path(tmp_path):
    repo = git.Repo.init(tmp_path / "r", initial_branch="main")
    (tmp_path / "r" / "f").write_text("x")
    repo.index.add(["f"])
    repo.index.commit("c", author=git.Actor("t", "t@x"), committer=git.Actor("t", "t@x"))
    pin = codepin.pin_code(tmp_path / "r")
    assert pin.repo_url == str(tmp_path / "r") and pin.branch == "main"
    assert pin.dirty is False and pin.diff_sha256 is None
    (tmp_path / "r" / "new").write_text("untracked")  # never part of what runs
    assert codepin.pin_code(tmp_path / "r").dirty is False
    (tmp_path / "r" / "f").write_text("changed")
    assert codepin.pin_code(tmp_path / "r").dirty is True
    repo.git.checkout(repo.head.commit.hexsha)  # detached
    assert codepin.pin_code(tmp_path / "r").branch is None


def test_a_real_run_that_cannot_pay_moves_nothing(registry):
    ledger.grant("poor", "0.1")
    before = movement(registry)
    with pytest.raises(Exception) as info:
        api.train_model_version(PARENT, DATASET, agent_id="poor")
    assert getattr(info.value, "reason", None) == "insufficient_balance"
    assert movement(registry) == before


def test_two_devices_are_one_job_priced_per_device(registry):
    """devices=2 on this CPU host: one job of two processes (DDP over the jail's loopback),
    estimated at price x hours x 2; more than policy.max_devices is refused (above)."""
    before = count_rows(registry)
    result = dry(devices=2, verbose=True)
    assert result["would_launch"] is True and result["reasons"] == []
    assert result["estimate"] == {"amount": "2.00", "currency": "credits",
                                  "price_per_hour": "0.50", "hours": "2.00", "devices": 2,
                                  "device": "cpu"}
    assert result["config"]["devices"] == 2
    sandbox = result["sandbox"]
    assert sandbox["devices"] == 2 and sandbox["device"] == "cpu"
    assert "--unshare-net" in sandbox["argv"] and sandbox["network"].startswith("loopback only")
    after = count_rows(registry)
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {"tool_calls": 1}


# --- the dry run stays light --------------------------------------------------------------------

def test_dry_run_never_imports_torch_lightning_or_mlflow(registry):
    code = (
        "import sys, json\n"
        "from runner.api import train_model_version\n"
        "at_import = sorted(m for m in ('numpy', 'scipy') if m in sys.modules)\n"
        f"r = train_model_version({PARENT!r}, {DATASET!r}, agent_id='a1', dry_run=True)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'lightning', 'pytorch_lightning', 'mlflow'))\n"
        "print(json.dumps({'would_launch': r['would_launch'], 'heavy': heavy, "
        "'at_import': at_import}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    # numpy loads only when a dry run first reads a dataset's genes (then cached), not with
    # the API: the special tokens live in trainers/scgpt/checkpoint_args.py, numpy-free
    assert report == {"would_launch": True, "heavy": [], "at_import": []}


# --- forge-train -------------------------------------------------------------------------------

CLI = ["parent=scgpt_cbmc_base", "dataset=cbmc", "training=finetune_celltype", "agent_id=a1",
       "dry_run=true"]


def forge_train(*args, cwd=None):
    return subprocess.run([*FORGE_TRAIN, *args], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ), cwd=cwd)


def test_cli_dry_run_prints_json_and_matches_the_api(registry, tmp_path):
    out = forge_train(*CLI, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed["would_launch"] is True and printed["estimate"]["amount"] == "1.00"
    from_api = tools.jsonable(dry())
    assert printed["config"] == from_api["config"]
    assert printed["request_key"] == from_api["request_key"]
    assert not (Path(os.environ["FORGE_HOME"]) / "runs").exists()  # a dry run sets nothing up


def test_cli_exit_codes(registry, tmp_path):
    out = forge_train(*CLI[:-2], "agent_id=ghost", "dry_run=true", cwd=tmp_path)
    assert out.returncode == 3 and json.loads(out.stdout)["reasons"][0]["reason"] == \
        "unknown_agent"
    out = forge_train(*CLI, "wall_time_cap_min=-1", cwd=tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "wall_time_cap_min" in out.stderr
    out = forge_train(*CLI, "training=nope", cwd=tmp_path)
    assert out.returncode == 2 and "finetune_celltype, pretrain_mgm" in out.stderr


def test_cli_multirun_gives_each_job_its_own_run_dir(registry, tmp_path):
    out = forge_train("-m", *CLI, "training.lr=1e-3,1e-4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    home = Path(os.environ["FORGE_HOME"])
    jobs = sorted(p.name for p in home.glob("runs/*/*/job*"))
    assert jobs == ["job0", "job1"]
    assert len({p.parent for p in home.glob("runs/*/*/job*")}) == 1
    assert out.stdout.count("would launch") == 2  # the sweep summary, one row per job
    calls = [c for c in audit_rows(registry) if c["success"]]
    assert len(calls) == 2


def test_snapshot_holds_exactly_the_pinned_code(code_repo, tmp_path):
    root = Path(code_repo.working_tree_dir)
    (root / ".gitignore").write_text("secret.txt\n")
    code_repo.index.add([".gitignore"])
    code_repo.index.commit("ignore", author=git.Actor("t", "t@x"),
                           committer=git.Actor("t", "t@x"))
    clean = codepin.pin_code(root)
    snap = codepin.snapshot(clean, tmp_path / "cache")
    assert sorted(p.name for p in snap.iterdir()) == [".gitignore", "train.py"]
    assert codepin.snapshot(clean, tmp_path / "cache") == snap  # cached
    (root / "train.py").write_text("print('edited')\n")
    (root / "extra.py").write_text("x = 1\n")
    (root / "secret.txt").write_text("ignored\n")
    assert (snap / "train.py").read_text() == "print('train')\n"
    dirty = codepin.pin_code(root)
    dsnap = codepin.snapshot(dirty, tmp_path / "cache")
    assert dsnap != snap and (dsnap / "train.py").read_text() == "print('edited')\n"
    # untracked files, ignored or not, stay out (tests/test_security_snapshot.py)
    assert not (dsnap / "extra.py").exists() and not (dsnap / "secret.txt").exists()
