"""Pin the code a job runs: HEAD commit, remote, branch and dirty state (GitPython).

The sandbox runs exactly the pinned commit. A dirty tree (uncommitted changes to tracked
files, or untracked files that are not ignored) is refused unless the caller allows it; then
`diff_sha256` fingerprints the changes so two runs from different dirty trees never look alike.
`pin_commit()` pins a named earlier commit instead of HEAD: a sweep pins once and every job
runs that commit, whatever is committed while the sweep runs.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tarfile
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from runner import settings
from runner.errors import CodePinError
from runner.jobs.archive import extract_tar

_repos: dict[str, object] = {}
_SHA = re.compile(r"^[0-9a-f]{7,40}$")
_lock = threading.Lock()


@dataclass(frozen=True)
class CodePin:
    sha: str
    repo_url: str  # remote origin URL, or the repository path when there is no origin
    dirty: bool
    diff_sha256: str | None
    branch: str | None  # None on a detached HEAD
    repo_path: str

    def to_dict(self) -> dict:
        return asdict(self)


def default_repo_path() -> Path:
    return settings.code_repo()


def _repo(path: Path):
    """The GitPython Repo for `path`, cached per process (opening one reads config files)."""
    import git

    key = str(path.resolve())
    with _lock:
        repo = _repos.get(key)
        if repo is None:
            try:
                repo = git.Repo(key, search_parent_directories=True)
            except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
                raise CodePinError(
                    f"{key} is not inside a git repository", field="repo_path",
                    reason="not_a_git_repo",
                    fix="run from a git checkout of the training code (git init && git commit), "
                        "or set FORGE_CODE_REPO") from exc
            _repos[key] = repo
        return repo


def pin_code(repo_path: str | Path | None = None) -> CodePin:
    """HEAD sha, origin URL (or repo path), branch, dirty flag and a digest of the changes."""
    import git

    repo = _repo(Path(repo_path) if repo_path is not None else default_repo_path())
    root = repo.working_tree_dir or repo.git_dir
    try:
        sha = repo.head.commit.hexsha
    except ValueError as exc:  # unborn HEAD: `git init` without a commit
        raise CodePinError(f"{root} has no commit yet", field="repo_path", reason="no_commit",
                           fix="commit the training code first (git add -A && git commit)") from exc
    try:
        status = repo.git.status("--porcelain=v1", "-z", "--untracked-files=all")
        diff_sha256 = None
        if status:
            digest = hashlib.sha256()
            digest.update(repo.git.diff("HEAD", "--binary", stdout_as_string=False))
            for entry in status.split("\0"):
                if entry.startswith("?? "):  # untracked: its name and content
                    name = entry[3:]
                    digest.update(b"\0untracked\0" + name.encode())
                    file = Path(root) / name
                    if file.is_file():
                        digest.update(hashlib.sha256(file.read_bytes()).digest())
            diff_sha256 = digest.hexdigest()
    except git.GitCommandError as exc:
        raise CodePinError(f"git failed in {root}: {exc.stderr.strip() or exc}",
                           field="repo_path", reason="git_failed",
                           fix="check the repository with `git status`") from exc
    try:
        branch = repo.active_branch.name
    except TypeError:  # detached HEAD
        branch = None
    return CodePin(sha=sha, repo_url=_origin_url(repo, root), dirty=bool(status), diff_sha256=diff_sha256,
                   branch=branch, repo_path=str(root))


def pin_commit(sha: str, repo_path: str | Path | None = None) -> CodePin:
    """A clean pin of commit `sha` (full or abbreviated hex) of the repository."""
    import git

    if not isinstance(sha, str) or not _SHA.match(sha):
        raise CodePinError(f"code_commit must be a commit sha (7 to 40 lowercase hex digits), "
                           f"got {sha!r}", field="code_commit", reason="bad_commit",
                           fix="pass a sha that `git log --format=%H` prints, or leave "
                               "code_commit out to run HEAD")
    repo = _repo(Path(repo_path) if repo_path is not None else default_repo_path())
    root = repo.working_tree_dir or repo.git_dir
    try:  # rev-parse --verify checks the object exists and is a commit (repo.commit does not)
        full = repo.git.rev_parse("--verify", "--quiet", f"{sha}^{{commit}}")
    except git.GitCommandError as exc:
        raise CodePinError(f"commit {sha} is not in {root}", field="code_commit",
                           reason="unknown_commit",
                           fix="pass a sha that `git log --format=%H` prints in that "
                               "repository, or leave code_commit out to run HEAD") from exc
    return CodePin(sha=full.strip(), repo_url=_origin_url(repo, root), dirty=False, diff_sha256=None,
                   branch=None, repo_path=str(root))


def _origin_url(repo, root) -> str:
    """The remote origin's URL, or the repository path when there is none."""
    reader = repo.config_reader()  # plain file reads, no subprocess
    return reader.get_value('remote "origin"', "url", default="") or str(root)


def dirty_error(pin: CodePin) -> CodePinError:
    """The refusal for a dirty tree without allow_dirty."""
    return CodePinError(f"the working tree {pin.repo_path} has uncommitted changes",
                        field="allow_dirty", reason="dirty_tree", diff_sha256=pin.diff_sha256,
                        fix="commit your changes (the sandbox runs the pinned commit), "
                            "or pass allow_dirty=True")


def diff_patch(pin: CodePin) -> bytes:
    """What a dirty tree runs on top of its pinned commit, as one `git apply`-able patch:
    the changes to tracked files, then every untracked, not ignored file as a new file."""
    repo = _repo(Path(pin.repo_path))
    parts = [repo.git.diff("HEAD", "--binary", stdout_as_string=False)]
    untracked = repo.git.ls_files("-z", "--others", "--exclude-standard")
    for name in sorted(filter(None, untracked.split("\0"))):
        # --no-index exits 1 when the files differ, which is the point here
        status, out, err = repo.git.diff("--no-index", "--binary", "--", "/dev/null", name,
                                         with_extended_output=True, with_exceptions=False,
                                         stdout_as_string=False)
        if status not in (0, 1):
            raise CodePinError(f"git diff failed for an untracked file: {err!r}",
                               field="allow_dirty", reason="git_failed",
                               fix="check the repository with `git status`")
        parts.append(out)
    return b"\n".join(p.rstrip(b"\n") for p in parts if p) + b"\n"


def snapshot_path(pin: CodePin, root: str | Path) -> Path:
    """Where `snapshot(pin, root)` puts (or finds) the pinned code; builds nothing."""
    name = pin.sha if not pin.dirty else f"{pin.sha}-{(pin.diff_sha256 or 'dirty')[:16]}"
    return Path(root) / name


def snapshot(pin: CodePin, root: str | Path) -> Path:
    """A directory holding exactly the pinned code, for the sandbox to mount read-only.

    Clean pin: `git archive` of the commit. Dirty pin (allow_dirty): the tracked and untracked,
    not ignored, files as they are now. Cached under `root` by sha (+ diff digest); built in a
    temporary directory and renamed into place, so concurrent launches never see half a copy.
    """
    dest = snapshot_path(pin, root)
    name, root = dest.name, dest.parent
    if dest.is_dir():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    repo = _repo(Path(pin.repo_path))
    tmp = Path(tempfile.mkdtemp(prefix=f".{name[:12]}-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the sandbox's unprivileged uid must read it
    try:
        if not pin.dirty:
            data = repo.git.archive(pin.sha, format="tar", stdout_as_string=False)
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                extract_tar(tar, tmp)
        else:
            listed = repo.git.ls_files("-z", "--cached", "--others", "--exclude-standard")
            for rel in filter(None, listed.split("\0")):
                src = Path(pin.repo_path) / rel
                if src.is_file() and not src.is_symlink():
                    target = tmp / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target)
        try:
            os.replace(tmp, dest)
        except OSError:  # another launch put the same snapshot in place first
            if not dest.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
