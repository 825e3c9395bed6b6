"""Bring your own training code (issue 28): a parent names a git repository, a commit and an
entry point beside its card (forge-family.yaml); the host pins exactly that commit and runs
it in the same jail under the same contract.

- the template (`forge trainers new`) passes its own test, and, committed to a scratch git
  repository, trains a candidate through train_model_version, recorded with that
  repository's URL, commit and entry point;
- an origin the operator does not allow, a missing commit, a missing entry point and a
  commit a force-push made unreachable are typed refusals before any debit;
- a repository whose .git/config and hooks try to run code at fetch or archive time runs
  nothing on the host; an entry point that tries to leave the jail stays in it;
- a card requiring a package the job's environment lacks fails typed, settled.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import operator_conf

from runner import api
from runner.cli import write_family_template
from runner.errors import ForgeError
from runner.jobs import parents
from runner.jobs.datasets import builtin_citation
from runner.registry import catalog, ledger
from trainers import family as families

DATASET = "dataset-geo-GSE100866"
AGENT = "agent-byo"
PARENT = "model-demo-family-base"
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run([*GIT, "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def family_repo(root: Path, name: str = "demo_family", edit=None,
                folder: str | None = None) -> tuple[Path, str]:
    """`forge trainers new NAME` committed to a scratch repository (repos/FOLDER, else
    repos/NAME) on branch main."""
    repo = root / "repos" / (folder or name)
    write_family_template(name, repo)
    if edit is not None:
        edit(repo)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", name)
    return repo, git(repo, "rev-parse", "HEAD")


def checkpoint(root: Path) -> str:
    """A parent checkpoint of the template's layout whose genes match no dataset: the job
    starts from random weights (train.py _warm_start) and never loads model.pt."""
    folder = root / "parent-checkpoint"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"never loaded")
    (folder / "meta.json").write_text(json.dumps({"genes": [], "label_names": [],
                                                  "hidden": 0}))
    return folder.as_uri()


def allow(tmp_path: Path, monkeypatch, *origins: str) -> Path:
    """The operator's code.allowed_origins (conf/local/default.yaml)."""
    return operator_conf(tmp_path, monkeypatch,
                         f"code:\n  allowed_origins: {json.dumps(list(origins))}\n")


@pytest.fixture
def registry(sqlite_url, committed_code, tmp_path, monkeypatch):
    """CBMC, agent-byo with 10 credits, this checkout's committed code as the runtime, the
    scratch repositories' folder allowed."""
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    allow(tmp_path, monkeypatch, str(tmp_path / "repos"))
    catalog.register_dataset(DATASET, "CBMC CITE-seq", builtin_citation("cbmc"))
    ledger.grant(AGENT, "10")
    return sqlite_url


def allocations(url: str) -> list[dict]:
    with sa.create_engine(url).connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(
            "SELECT id, status, debited, refunded FROM resource_allocations"))]


# --- the template -------------------------------------------------------------------------

@pytest.mark.train
def test_the_template_passes_its_own_test(tmp_path):
    done = subprocess.run([sys.executable, "-m", "runner.cli", "trainers", "new", "demo_family",
                           "--dir", str(tmp_path / "demo_family")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "demo_family").iterdir()) == [
        "README.md", "forge-family.yaml", "test_train.py", "train.py"]
    own = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                         cwd=tmp_path / "demo_family", capture_output=True, text=True,
                         timeout=300)
    assert own.returncode == 0, own.stdout[-3000:] + own.stderr[-2000:]
    assert "1 passed" in own.stdout


def test_a_template_name_must_be_a_new_family():
    for name in ("linear", "Demo", "1x", "a" * 40):
        with pytest.raises(ForgeError) as info:
            write_family_template(name, Path("/nonexistent/never-made"))
        assert info.value.field == "name"


# --- trained through train_model_version -------------------------------------------------

@pytest.mark.sandbox
@pytest.mark.train
def test_an_external_family_trains_a_candidate(registry, tmp_path):
    repo, sha = family_repo(tmp_path)
    row = parents.register_parent(PARENT, checkpoint(tmp_path), code=f"{repo}@main:train.py")
    parent = catalog.get_model_version(PARENT)
    assert row["metadata"]["family"] == "demo_family"
    assert parent["version"]["code_commit_sha"] == sha  # the ref, resolved now
    assert parent["metadata"]["code"] == {"repo_url": str(repo), "commit_sha": sha,
                                          "entrypoint": "train.py"}

    dry = api.train_model_version(PARENT, DATASET, None, AGENT, dry_run=True,
                                  overrides=["training.lr=0.01"], wall_time_cap_min=10)
    assert dry["would_launch"], dry["reasons"]
    assert "family" in dry["sandbox"]["inputs_planned"]
    assert dry["config"]["training"]["lr"] == 0.01  # a key the card shares with scGPT's

    result = api.train_model_version(PARENT, DATASET, None, AGENT, wall_time_cap_min=10,
                                     vram_cap_gb=1,
                                     overrides=["training.lr=0.01", "training.hidden=16"])
    version = catalog.get_model_version(result["artifact_id"])
    # a key only the card declares reached the job: its manifest and the network it built
    from runner.jobs import weights

    [alloc] = allocations(registry)
    manifest = json.loads((Path(os.environ["FORGE_HOME"]) / "runs" / alloc["id"]
                           / "manifest.json").read_text())
    assert manifest["training"]["hidden"] == 16 and manifest["training"]["lr"] == 0.01
    meta = json.loads((weights.weights_dir(result["artifact_id"]) / "meta.json").read_text())
    assert meta["hidden"] == 16
    assert version["version"]["training_params_json"]["training"]["hidden"] == 16
    assert version["lifecycle_state"] == "candidate" and version["parent_version_id"] == PARENT
    assert version["version"]["code_repo_url"] == str(repo)
    assert version["version"]["code_commit_sha"] == sha
    assert version["version"]["code_entrypoint"] == "train.py"
    assert version["metadata"]["family"] == "demo_family"
    runtime = git(Path(os.environ["FORGE_CODE_REPO"]), "rev-parse", "HEAD")
    assert version["metadata"]["runtime_commit_sha"] == runtime != sha  # ours, beside it
    assert version["metadata"]["code"]["commit_sha"] == sha  # its children run it too
    subprocess.run(["git", "-C", str(repo), "cat-file", "-e", sha], check=True)
    metrics = result["eval_metrics"]  # measured by the host on the held-out cells
    assert 0.5 < metrics["test_macro_f1"] <= 1.0, metrics
    [alloc] = allocations(registry)
    assert alloc["status"] == "settled"

    # not yet: the gate predicts with built-in families only; refused before any debit
    balance = ledger.balance(AGENT)
    with pytest.raises(ForgeError) as info:
        api.evaluate_candidate(result["artifact_id"], AGENT, "default")
    assert info.value.reason == "not_gateable", info.value.to_dict()
    assert ledger.balance(AGENT) == balance and len(allocations(registry)) == 1


# --- one process, many repositories ------------------------------------------------------

def test_two_cards_of_one_name_each_judge_their_own_parent(registry, tmp_path):
    """Two labs' repositories whose cards are both `demo_family`, with different ranges for
    max_epochs (<= 1000 and <= 20), planned at the same time in one process (as forge serve
    does): each request is judged by its own parent's card, never by the card read last."""
    import threading

    def narrow(repo: Path) -> None:
        card = repo / "forge-family.yaml"
        card.write_text(card.read_text().replace("maximum: 1000", "maximum: 20"))

    other = "model-demo-family-other"
    repo_a, _ = family_repo(tmp_path)
    repo_b, _ = family_repo(tmp_path, edit=narrow, folder="lab_b")
    parents.register_parent(PARENT, checkpoint(tmp_path / "a"), code=f"{repo_a}@main:train.py")
    parents.register_parent(other, checkpoint(tmp_path / "b"), code=f"{repo_b}@main:train.py")

    def verdict(parent: str) -> str:
        try:
            dry = api.train_model_version(parent, DATASET, None, AGENT, dry_run=True,
                                          overrides=["training.max_epochs=50"],
                                          wall_time_cap_min=10)
        except ForgeError as exc:
            return f"{exc.field}: {exc.message}"
        return "would launch" if dry["would_launch"] else str(dry["reasons"][0])

    verdicts: dict[str, list[str]] = {PARENT: [], other: []}
    start = threading.Barrier(2)

    def plan_many(parent: str) -> None:
        start.wait()
        for _ in range(6):
            verdicts[parent].append(verdict(parent))

    threads = [threading.Thread(target=plan_many, args=(p,)) for p in verdicts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert verdicts[PARENT] == ["would launch"] * 6, verdicts[PARENT]
    assert len(verdicts[other]) == 6 and all(
        v.startswith("training.max_epochs: ") and "<= 20, got 50" in v
        for v in verdicts[other]), verdicts[other]
    assert ledger.balance(AGENT) == Decimal("10") and allocations(registry) == []


# --- refusals before any debit -------------------------------------------------------------

def _refusal(dry_run: bool) -> ForgeError | dict:
    try:
        out = api.train_model_version(PARENT, DATASET, None, AGENT, dry_run=dry_run,
                                      wall_time_cap_min=10)
    except ForgeError as exc:
        return exc
    return out


def _assert_refused(url: str, reason: str, field: str) -> None:
    for dry_run in (True, False):
        out = _refusal(dry_run)
        if dry_run:
            assert isinstance(out, dict) and not out["would_launch"], out
            [first, *_] = out["reasons"]
        else:
            assert isinstance(out, ForgeError), out
            first = out.to_dict()
        assert first["reason"] == reason and first["field"] == field, first
    assert ledger.balance(AGENT) == Decimal("10") and allocations(url) == []


def test_an_origin_the_operator_does_not_allow(registry, tmp_path, monkeypatch):
    repo, _ = family_repo(tmp_path)
    parents.register_parent(PARENT, checkpoint(tmp_path), code=f"{repo}@main:train.py")
    allow(tmp_path, monkeypatch, str(tmp_path / "elsewhere"))
    _assert_refused(registry, "origin_not_allowed", "code.allowed_origins")
    with pytest.raises(ForgeError) as info:  # registering it again: refused before a fetch
        parents.register_parent("model-other", checkpoint(tmp_path / "x"),
                                code=f"{repo}@main:train.py")
    assert info.value.reason == "origin_not_allowed"


def test_a_caller_cannot_allow_an_origin(registry):
    for config, overrides in ((None, ["code.allowed_origins=[/]"]),
                              ({"code": {"allowed_origins": ["/"]}}, None)):
        with pytest.raises(ForgeError) as info:
            api.train_model_version(PARENT, DATASET, config, AGENT, dry_run=True,
                                    overrides=overrides)
        err = info.value
        assert err.reason == "invalid_override" and "operator setting" in err.message, \
            err.to_dict()
    assert ledger.balance(AGENT) == Decimal("10")


def _by_hand(tmp_path: Path, repo: Path, sha: str, entrypoint: str = "train.py") -> None:
    """A parent record naming `sha` and `entrypoint` of `repo` (as if registered when they
    were there), with the template's checkpoint files as its weights."""
    from runner.jobs import weights

    catalog.register_model(artifact_id=PARENT, title=PARENT, created_by="test", metadata={
        "family": "demo_family", "framework": "pytorch-lightning",
        "code": {"repo_url": str(repo), "commit_sha": sha, "entrypoint": entrypoint}})
    folder = weights.weights_dir(PARENT)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.pt").write_bytes(b"never loaded")
    (folder / "meta.json").write_text("{}")


def test_a_missing_commit(registry, tmp_path):
    repo, _ = family_repo(tmp_path)
    _by_hand(tmp_path, repo, "0123456789abcdef0123456789abcdef01234567")
    _assert_refused(registry, "unknown_commit", "code.commit")
    with pytest.raises(ForgeError) as info:
        parents.register_parent("model-other", checkpoint(tmp_path), code=f"{repo}@nope:train.py")
    assert info.value.reason == "unknown_commit"


def test_a_missing_entry_point(registry, tmp_path):
    repo, sha = family_repo(tmp_path)
    _by_hand(tmp_path, repo, sha, "models/train.py")
    _assert_refused(registry, "missing_entrypoint", "code.entrypoint")


def test_a_rewritten_commit(registry, tmp_path):
    """Registered at commit A; the branch is amended and force-moved, so A is reachable from
    no ref of the origin (the host's mirror may still hold its objects)."""
    repo, sha = family_repo(tmp_path)
    parents.register_parent(PARENT, checkpoint(tmp_path), code=f"{repo}@main:train.py")
    assert api.train_model_version(PARENT, DATASET, None, AGENT, dry_run=True,
                                   wall_time_cap_min=10)["would_launch"]
    (repo / "train.py").write_text((repo / "train.py").read_text() + "\n# rewritten\n")
    git(repo, "commit", "-qa", "--amend", "-m", "rewritten")
    git(repo, "reflog", "expire", "--expire=now", "--all")
    git(repo, "gc", "-q", "--prune=now")
    assert git(repo, "rev-parse", "HEAD") != sha
    _assert_refused(registry, "commit_not_in_origin", "code.commit")


# --- attacks ------------------------------------------------------------------------------

HOOKS = ("post-checkout", "pre-commit", "post-merge", "reference-transaction",
         "post-index-change", "fsmonitor-watchman", "pre-auto-gc", "post-rewrite", "pre-push",
         "push-to-checkout", "update", "post-update", "pre-receive", "post-receive")


@pytest.mark.sandbox
@pytest.mark.train
def test_a_repository_config_and_hooks_run_nothing_on_the_host(registry, tmp_path):
    marker = tmp_path / "RAN-ON-HOST"

    def on_import(repo: Path) -> None:  # the host never imports it (in the jail: no path)
        text = (repo / "train.py").read_text()
        (repo / "train.py").write_text(text.replace("\ndef train(", (
            f"\ntry:\n    open({str(marker)!r}, 'w').close()\nexcept OSError:\n    pass\n"
            "\n\ndef train("), 1))

    repo, _ = family_repo(tmp_path, edit=on_import)
    run = f"touch {marker}"
    for hook in HOOKS:
        path = repo / ".git" / "hooks" / hook
        path.write_text(f"#!/bin/sh\n{run}\n")
        path.chmod(0o755)
    with open(repo / ".git" / "config", "a") as f:
        f.write(f'[core]\n\tfsmonitor = {run}\n\tsshCommand = {run}\n\tpager = {run}\n'
                f'[uploadpack]\n\tpackObjectsHook = {run}; git pack-objects\n'
                f'[filter "x"]\n\tsmudge = {run}\n\tclean = {run}\n'
                f'[diff]\n\texternal = {run}\n[tar "tar"]\n\tcommand = {run}\n')
    (repo / ".gitattributes").write_text("* filter=x\n")
    git(repo, "add", ".gitattributes")
    git(repo, "-c", "core.hooksPath=/dev/null", "commit", "-qm", "attributes")
    marker.unlink(missing_ok=True)  # our own commit above may have run their filter

    parents.register_parent(PARENT, checkpoint(tmp_path), code=f"{repo}@main:train.py")
    dry = api.train_model_version(PARENT, DATASET, None, AGENT, dry_run=True,
                                  wall_time_cap_min=10)
    assert dry["would_launch"], dry["reasons"]
    api.train_model_version(PARENT, DATASET, None, AGENT, wall_time_cap_min=10,
                            vram_cap_gb=1, overrides=["training.max_epochs=1"])
    assert not marker.exists()
    # the control: git run in that repository the ordinary way does run its code
    subprocess.run(["git", "-C", str(repo), "status"], capture_output=True, timeout=60)
    assert marker.exists()


ESCAPE = '''

def train(m, state):
    import json, os, socket, stat
    from pathlib import Path
    report = {}
    for name, path in (("secret", SECRET), ("passwd", "/etc/shadow"),
                       ("registry", REGISTRY)):
        try:
            report[name] = Path(path).read_text()[:40]
        except OSError as exc:
            report[name] = type(exc).__name__
    try:
        socket.create_connection(("127.0.0.1", PORT), timeout=3).close()
        report["socket"] = "connected"
    except OSError as exc:
        report["socket"] = type(exc).__name__
    for name, path in (("escape", ESCAPE_TO), ("code", "/job/code/x"),
                       ("family", "/job/in/family/x")):
        try:
            Path(path).write_text("x")
            report["write_" + name] = "written"
        except OSError as exc:
            report["write_" + name] = type(exc).__name__
    print("REPORT " + json.dumps(report), flush=True)
    result = original_train(m, state)
    weights = Path(m.output_dir) / "checkpoint" / "model.pt"
    weights.unlink()
    os.mkfifo(weights)  # a host reader that opened it would hang
    return result
'''


@pytest.mark.sandbox
@pytest.mark.train
def test_an_entry_point_that_tries_to_leave_the_jail_stays_in_it(registry, tmp_path):
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host secret 42")
    escape = tmp_path / "escaped.txt"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    registry_file = registry.removeprefix("sqlite:///")

    def plant(repo: Path) -> None:
        text = (repo / "train.py").read_text().replace("def train(m, state",
                                                       "def original_train(m, state")
        consts = (f"\nSECRET, REGISTRY, PORT, ESCAPE_TO = {str(secret)!r}, "
                  f"{registry_file!r}, {port}, {str(escape)!r}\n")
        (repo / "train.py").write_text(text + consts + ESCAPE)

    repo, _ = family_repo(tmp_path, edit=plant)
    parents.register_parent(PARENT, checkpoint(tmp_path), code=f"{repo}@main:train.py")
    try:
        with pytest.raises(ForgeError) as info:
            api.train_model_version(PARENT, DATASET, None, AGENT, wall_time_cap_min=10,
                                    vram_cap_gb=1, overrides=["training.max_epochs=1"])
    finally:
        listener.close()

    assert not escape.exists()
    [alloc] = allocations(registry)
    assert alloc["status"] in ("failed", "settled"), alloc
    log = (Path(os.environ["FORGE_HOME"]) / "runs" / alloc["id"] / "job.log").read_text()
    [line] = [x for x in log.splitlines() if x.startswith("REPORT ")]
    report = json.loads(line.removeprefix("REPORT "))
    assert report["secret"] in ("FileNotFoundError", "PermissionError"), report
    assert report["registry"] in ("FileNotFoundError", "PermissionError"), report
    assert report["passwd"] in ("FileNotFoundError", "PermissionError"), report
    assert report["socket"] != "connected", report
    assert all(report[f"write_{k}"] != "written" for k in ("escape", "code", "family")), report
    assert "host secret 42" not in log
    err = info.value  # the FIFO was removed at the hand-back: no model.pt came out
    assert (err.reason, err.field) == ("invalid_checkpoint", "checkpoint.model.pt"), \
        err.to_dict()
    assert [m["id"] for m in catalog.list_model_versions()] == [PARENT]
    assert ledger.balance(AGENT) < Decimal("10")  # the seconds it ran are charged, once


@pytest.mark.sandbox
@pytest.mark.train  # tests/tiers.py: starting the jail is the training tier
def test_a_missing_dependency_fails_typed_and_settled(registry, tmp_path):
    def needs(repo: Path) -> None:
        card = repo / "forge-family.yaml"
        card.write_text(card.read_text().replace(
            "requirements: [torch, pytorch_lightning]",
            "requirements: [torch, no_such_pkg_xyz]"))

    repo, _ = family_repo(tmp_path, edit=needs)
    parents.register_parent(PARENT, checkpoint(tmp_path), code=f"{repo}@main:train.py")
    with pytest.raises(ForgeError) as info:
        api.train_model_version(PARENT, DATASET, None, AGENT, wall_time_cap_min=10,
                                vram_cap_gb=1)
    err = info.value
    assert err.reason == "missing_dependency" and err.field == "no_such_pkg_xyz", err.to_dict()
    assert "no_such_pkg_xyz" in err.message and "operator installs it" in err.fix
    [alloc] = allocations(registry)
    assert alloc["status"] == "failed" and Decimal(alloc["refunded"]) > 0, alloc


# --- the card, as data ----------------------------------------------------------------------

def test_a_card_is_data_checked_by_the_same_function_on_both_sides(tmp_path):
    repo, _ = family_repo(tmp_path)
    import yaml

    card = yaml.safe_load((repo / "forge-family.yaml").read_text())
    fam = families.Family.from_card(card, repo)
    assert fam.training_keys()[-4:] == ("lr", "max_epochs", "batch_size", "hidden")
    assert fam.defaults("finetune_celltype")["hidden"] == 64
    assert fam.ranges["lr"] == {"exclusiveMinimum": 0}
    for bad, field in (({**card, "name": "scgpt"}, "name"),
                       ({**card, "entry_point": "../train.py"}, "entry_point"),
                       ({**card, "requirements": ["os; rm -rf /"]}, "requirements.0"),
                       ({**card, "training": {"lr": {"type": "int", "default": 0.5}}},
                        "training.lr.default"),
                       ({**card, "training": {"seed": {"type": "int", "default": 1}}},
                        "training"),
                       ({**card, "training": {"act": {"type": "str", "default": "relu",
                                                      "minimum": 0}}}, "training.act"),
                       ({**card, "training": {"act": {"type": "str", "default": "relu",
                                                      "choices": ["gelu"]}}},
                        "training.act.choices"),
                       ({**card, "run": "echo"}, "<root>")):
        with pytest.raises(families.CardError) as info:
            families.Family.from_card(bad, repo)
        assert info.value.field == field, (field, str(info.value))


def test_allowed_origins_match_whole_folders_and_plain_urls(tmp_path):
    from runner.jobs import external_code

    (tmp_path / "code" / "lab").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    allowed = [str(tmp_path / "code"), "https://git.example.org/lab/", "ssh://git@*/lab/*"]
    for ok in (tmp_path / "code" / "lab", f"file://{tmp_path}/code/lab",
               "https://git.example.org/lab/m.git", "ssh://git@host/lab/m.git"):
        assert external_code.check_origin(str(ok), allowed)
    for refused, reason in ((tmp_path / "code-evil", "origin_not_allowed"),
                            (tmp_path / "code" / ".." / "x", "origin_not_allowed"),
                            (tmp_path / "link", "origin_not_allowed"),  # resolved first
                            ("https://git.example.org/lab/../evil.git", "invalid_code"),
                            ("https://git.example.org/laboratory.git", "origin_not_allowed"),
                            ("code/lab", "invalid_code")):
        with pytest.raises(ForgeError) as info:
            external_code.check_origin(str(refused), allowed)
        assert info.value.reason == reason, (refused, info.value.to_dict())
    with pytest.raises(ForgeError) as info:
        external_code.check_origin(str(tmp_path / "code"), [])  # the default: none
    assert info.value.reason == "origin_not_allowed"


def test_forge_models_register_code_records_the_sha_a_ref_names(registry, tmp_path):
    from click.testing import CliRunner

    from runner.cli import main

    repo, sha = family_repo(tmp_path)
    git(repo, "tag", "v1")
    out = CliRunner().invoke(main, ["models", "register", PARENT, checkpoint(tmp_path),
                                    "--code", f"{repo}@v1:train.py", "--json"])
    assert out.exit_code == 0, out.output
    row = json.loads(out.output)
    assert row["metadata"]["family"] == "demo_family"
    assert row["metadata"]["code"] == {"repo_url": str(repo), "commit_sha": sha,
                                       "entrypoint": "train.py"}
    assert row["version"]["code_commit_sha"] == sha
    bad = CliRunner().invoke(main, ["models", "register", "model-x", checkpoint(tmp_path / "x"),
                                    "--code", f"{repo}@v1:nope.py"])
    assert bad.exit_code != 0 and "has no file nope.py" in bad.output, bad.output


def test_the_dry_run_checks_training_keys_by_the_card(registry, tmp_path):
    repo, _ = family_repo(tmp_path)
    parents.register_parent(PARENT, checkpoint(tmp_path), code=f"{repo}@main:train.py")
    messages = []
    for override, field in (("training.lr=-1.0", "training.lr"),  # exclusiveMinimum: 0
                            ("training.max_epochs=5000", "training.max_epochs"),  # maximum
                            ("training.max_seq_len=65", "training.max_seq_len")):  # scGPT's
        with pytest.raises(ForgeError) as info:
            api.train_model_version(PARENT, DATASET, None, AGENT, dry_run=True,
                                    overrides=[override], wall_time_cap_min=10)
        assert info.value.field == field, info.value.to_dict()
        messages.append(info.value.message)
    assert "must be >= 1 and <= 1000, got 5000" in messages[1]  # the card's range
    assert "is a setting of family scgpt, not of demo_family" in messages[2]
    assert ledger.balance(AGENT) == Decimal("10") and allocations(registry) == []


def test_a_cards_own_training_key_is_settable_and_checked_by_the_card(registry, tmp_path):
    """`hidden` is no key of a built-in family, only of the template's card (int, 1..4096):
    a caller sets it like any training key; the card types and bounds it, before any
    debit, and a key neither the card nor a built-in family declares is refused."""
    repo, _ = family_repo(tmp_path)
    parents.register_parent(PARENT, checkpoint(tmp_path), code=f"{repo}@main:train.py")
    dry = api.train_model_version(PARENT, DATASET, None, AGENT, dry_run=True,
                                  overrides=["training.hidden=32"], wall_time_cap_min=10)
    assert dry["would_launch"], dry["reasons"]
    assert dry["config"]["training"]["hidden"] == 32
    flat = api.train_model_version(PARENT, DATASET, {"hidden": 8}, AGENT, dry_run=True,
                                   wall_time_cap_min=10)
    assert flat["would_launch"] and flat["config"]["training"]["hidden"] == 8
    assert flat["request_key"] != dry["request_key"]  # another model: another request
    for overrides, config, field, words in (
            (["training.hidden=5000"], None, "training.hidden", "must be >= 1 and <= 4096"),
            (None, {"training": {"hidden": 0}}, "training.hidden", "must be >= 1"),
            (["training.hidden=wide"], None, "training.hidden", "int"),
            (["training.hidden=[1,2]"], None, "training.hidden", "single value"),
            (["training.hiddn=3"], None, "training.hiddn", "did you mean training.hidden"),
            (["training.Hidden=3"], None, "training.Hidden", "no such training setting")):
        with pytest.raises(ForgeError) as info:
            api.train_model_version(PARENT, DATASET, config, AGENT, dry_run=True,
                                    overrides=overrides, wall_time_cap_min=10)
        err = info.value
        assert err.field == field and words in err.message + " " + err.fix, err.to_dict()
    assert ledger.balance(AGENT) == Decimal("10") and allocations(registry) == []
