"""The code a job runs, seen by an attacker: a caller's `allow_dirty` must not carry the
operator's untracked files (a `.env`, conf/local/ with passwords) into the jail.

The snapshot of a dirty tree holds the tracked files as they are now, nothing else; its
digest (`diff_sha256`) is the sha256 of the one patch that turns the pinned commit into it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import textwrap
from pathlib import Path

import git
import pytest
from helpers import scratch_code_repo

from runner import settings
from runner.jobs import codepin
from runner.sandbox import SandboxJob, gpu_launch

SECRET = "PGPASSWORD=hunter2-operator-only\n"
LOCAL_CONF = "tracking:\n  password: tracking-secret\n"
# A tracked module that reports every file under its own code mount, and tries the secrets.
LEAK = """
    import json, os
    seen = sorted(os.path.relpath(os.path.join(d, f), "/job/code")
                  for d, _, files in os.walk("/job/code") for f in files)
    tried = {}
    for name in (".env", "conf/local/default.yaml"):
        try:
            tried[name] = open(os.path.join("/job/code", name)).read()
        except OSError as exc:
            tried[name] = type(exc).__name__
    json.dump({"seen": seen, "tried": tried}, open("/job/out/leak.json", "w"))
"""


@pytest.fixture
def dirty_repo(tmp_path, monkeypatch) -> Path:
    """The operator's checkout: a tracked change, and untracked secrets nothing ignores."""
    root = scratch_code_repo(tmp_path, monkeypatch)
    repo = git.Repo(root)
    (root / "leak.py").write_text(textwrap.dedent(LEAK))
    repo.index.add(["leak.py"])
    who = git.Actor("t", "t@example.org")
    repo.index.commit("leak probe", author=who, committer=who)
    (root / "train.py").write_text("print('edited by the operator')\n")
    (root / ".env").write_text(SECRET)
    (root / "conf" / "local").mkdir(parents=True)
    (root / "conf" / "local" / "default.yaml").write_text(LOCAL_CONF)
    return root


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".git" not in p.parts}


def test_allow_dirty_snapshots_tracked_changes_and_never_untracked_files(dirty_repo, tmp_path):
    pin = codepin.pin_code(dirty_repo)
    assert pin.dirty
    snap = codepin.snapshot(pin, tmp_path / "cache")
    assert sorted(files_under(snap)) == ["leak.py", "train.py"]
    assert (snap / "train.py").read_text() == "print('edited by the operator')\n"

    # The digest is the patch's, and the patch on the pinned commit is the snapshot, exactly.
    patch = codepin.diff_patch(pin)
    assert hashlib.sha256(patch).hexdigest() == pin.diff_sha256
    assert b"hunter2" not in patch and b"tracking-secret" not in patch
    applied = tmp_path / "applied"
    subprocess.run(["git", "clone", "-q", str(dirty_repo), str(applied)], check=True)
    subprocess.run(["git", "apply", "-"], input=patch, cwd=applied, check=True)
    assert files_under(applied) == files_under(snap)

    # An untracked file is not part of the code that runs: it does not move the digest.
    (dirty_repo / ".env").write_text("PGPASSWORD=another\n")
    assert codepin.pin_code(dirty_repo).diff_sha256 == pin.diff_sha256


def test_untracked_secrets_alone_leave_the_tree_clean(dirty_repo, tmp_path):
    git.Repo(dirty_repo).git.checkout("--", "train.py")
    pin = codepin.pin_code(dirty_repo)
    assert not pin.dirty and pin.diff_sha256 is None
    assert sorted(files_under(codepin.snapshot(pin, tmp_path / "cache"))) == ["leak.py",
                                                                              "train.py"]


@pytest.mark.sandbox
def test_the_jail_of_a_dirty_run_has_no_untracked_secret(dirty_repo, tmp_path):
    """A job on the allow_dirty snapshot walks its code mount and tries the secrets' paths."""
    pin = codepin.pin_code(dirty_repo)
    job = SandboxJob(module="leak", code_dir=codepin.snapshot(pin, tmp_path / "cache"),
                     output_dir=tmp_path / "out", log_path=tmp_path / "job.log",
                     wall_time_cap_s=60, grace_s=1, on_line=lambda line: None)
    result = gpu_launch(job)
    assert result.reason == "ok", (tmp_path / "job.log").read_text()
    report = json.loads((tmp_path / "out" / "leak.json").read_text())
    assert ".env" not in report["seen"] and "conf/local/default.yaml" not in report["seen"]
    assert "train.py" in report["seen"]
    assert report["tried"] == {".env": "FileNotFoundError",
                               "conf/local/default.yaml": "FileNotFoundError"}


@pytest.mark.parametrize("name", [
    "conf/local/default.yaml", "conf/local/anything.yaml", ".env", ".env.production",
    "deploy/.env", "server.pem", "tls/server.key", ".netrc", ".pgpass", "id_rsa",
    "id_ed25519", "credentials.json", ".npmrc", ".pypirc", "secrets.yaml"])
def test_the_checkout_ignores_the_usual_secret_files(name):
    """What `git check-ignore` says in forge-runner's own checkout: never part of a snapshot,
    nor committed by a `git add -A`."""
    out = subprocess.run(["git", "check-ignore", "-q", "--no-index", name],
                         cwd=settings.CHECKOUT, check=False)
    assert out.returncode == 0, f"{name} is not in .gitignore"


# --- one process, many callers: the MCP server pins code in many threads at once --------------

def test_threads_pinning_one_repository_at_once_all_get_its_commit(tmp_path, monkeypatch):
    """A GitPython Repo is not thread-safe: its persistent `git cat-file` process answers
    whichever thread reads first. Shared unguarded by the server's threads, one agent's dry
    run could take another's answer and leave that call blocked on the pipe for good (seen:
    an MCP train call hung until its client gave up)."""
    import threading
    import time

    root = scratch_code_repo(tmp_path, monkeypatch)
    expected = git.Repo(root).head.commit.hexsha
    got: list[str] = []
    failures: list[BaseException] = []

    def pin_many() -> None:
        try:
            for _ in range(150):
                got.append(codepin.pin_code(root).sha)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=pin_many, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60  # about 2 s when nothing blocks
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = sum(thread.is_alive() for thread in threads)
    assert hung == 0 and not failures, f"{hung} threads blocked; failures: {failures[:3]}"
    assert got == [expected] * 8 * 150
